"""What one client must not be able to do to a server: fail other clients' requests, make it build
huge work lists, read bodies without a key, load files from outside the allowed directory; and what
must hold when adapter changes fail half-way or a restart finds the store damaged."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest
from server_harness import ADMIN_KEY, API_KEY, engine_options, run_server

from loraplex.config import ServerConfig
from loraplex.models.demo import DEMO_ADAPTERS

USER = {"Authorization": f"Bearer {API_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
FILES = ("adapter_config.json", "adapter_model.safetensors")


def upload(server, name: str, adapter_dir) -> httpx.Response:
    parts = [("files", (f, (adapter_dir / f).read_bytes())) for f in FILES]
    return httpx.post(f"{server.url}/v1/adapters", headers=ADMIN, data={"name": name}, files=parts, timeout=60)


def complete(server, model: str, **extra) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/completions", headers=USER, timeout=60,
                      json={"model": model, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0,
                            **extra})


def test_a_bad_top_k_is_refused_without_failing_other_requests(live_server):
    result = {}

    def victim():
        result["resp"] = complete(live_server, "alpha", max_tokens=150, ignore_eos=True)

    thread = threading.Thread(target=victim)
    thread.start()
    time.sleep(0.2)
    bad = complete(live_server, "demo", top_k=2**64)
    thread.join(60)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "top_k"
    assert result["resp"].status_code == 200
    assert result["resp"].json()["choices"][0]["finish_reason"] == "length"


def test_huge_n_is_refused_before_any_work(live_server):
    start = time.perf_counter()
    resp = complete(live_server, "demo", n=10**9)
    assert resp.status_code == 400 and "--max-choices" in resp.json()["error"]["message"]
    many = complete(live_server, "demo", n=40, prompt=["a", "b"])  # 80 sequences > 64
    assert many.status_code == 400 and many.json()["error"]["param"] == "n"
    assert time.perf_counter() - start < 2


def test_keys_are_checked_before_the_body_is_read(live_server):
    garbage = b"{" * 100_000  # not JSON: only a server that parsed it could answer 400
    resp = httpx.post(f"{live_server.url}/v1/completions", content=garbage,
                      headers={"Content-Type": "application/json"})
    assert resp.status_code == 401
    resp = httpx.post(f"{live_server.url}/v1/adapters", headers={**USER, "Content-Type": "multipart/form-data"},
                      content=garbage)
    assert resp.status_code == 403


def test_load_lora_adapter_refuses_files_linked_from_outside(live_server, demo_dir, tmp_path):
    inside = demo_dir / "adapters" / "linked"
    inside.mkdir()
    try:
        for name in FILES:
            outside = tmp_path / name
            outside.write_bytes((demo_dir / "adapters" / "alpha" / name).read_bytes())
            (inside / name).symlink_to(outside)
        resp = httpx.post(f"{live_server.url}/v1/load_lora_adapter", headers=ADMIN,
                          json={"lora_name": "linked", "lora_path": str(inside)})
        assert resp.status_code == 403 and "links outside" in resp.json()["error"]["message"]
        nul = httpx.post(f"{live_server.url}/v1/load_lora_adapter", headers=ADMIN,
                         json={"lora_name": "nul", "lora_path": str(inside) + "\x00x"})
        assert nul.status_code == 400
    finally:
        for name in FILES:
            (inside / name).unlink(missing_ok=True)
        inside.rmdir()
    assert complete(live_server, "linked").status_code == 404


def test_a_failure_after_the_commit_leaves_the_store_as_it_was(live_server, demo_dir, monkeypatch):
    engine = live_server.state.engine
    real = engine.add_adapter

    async def broken(*args, **kwargs):
        raise RuntimeError("injected failure")

    before = sorted(r.name for r in live_server.state.registry.store.list())
    monkeypatch.setattr(engine, "add_adapter", broken)
    failed = upload(live_server, "half-way", demo_dir / "adapters" / "alpha")
    assert failed.status_code == 500 and failed.headers["connection"] == "close"
    assert failed.json()["error"]["type"] == "server_error"
    assert sorted(r.name for r in live_server.state.registry.store.list()) == before
    monkeypatch.setattr(engine, "add_adapter", real)
    assert upload(live_server, "half-way", demo_dir / "adapters" / "alpha").status_code == 201
    assert complete(live_server, "half-way").status_code == 200
    assert httpx.delete(f"{live_server.url}/v1/adapters/half-way", headers=ADMIN).status_code == 200


def test_restart_drops_an_adapter_whose_files_are_gone_and_survives_max_loras_0(demo_dir, tmp_path):
    home = tmp_path / "home"
    config = ServerConfig(api_key=API_KEY, admin_key=ADMIN_KEY)
    options = engine_options(demo_dir, home, adapters={})
    with run_server(options, config) as server:
        assert upload(server, "kept", demo_dir / "adapters" / "beta").status_code == 201
        assert upload(server, "lost", demo_dir / "adapters" / "gamma").status_code == 201
        lost_dir = server.state.registry.store.get("lost").path
    (lost_dir / "adapter_model.safetensors").unlink()
    with run_server(options, config) as server:
        names = [a["id"] for a in httpx.get(f"{server.url}/v1/adapters", headers=USER).json()["data"]]
        assert names == ["kept"]
        assert complete(server, "lost").status_code == 404
        assert upload(server, "lost", demo_dir / "adapters" / "gamma").status_code == 201, "name stuck"
        assert complete(server, "lost").status_code == 200
    with run_server({**options, "max_loras": 0}, config) as server:  # no adapter slots: starts, serves base
        assert complete(server, "demo").status_code == 200
        assert complete(server, "kept").status_code == 404
    with run_server(options, config) as server:  # and the stored adapters are all still there
        assert sorted(a["id"] for a in httpx.get(f"{server.url}/v1/adapters", headers=USER).json()["data"]) == [
            "kept", "lost"]


def test_a_second_server_on_the_same_data_dir_is_refused(live_server, demo_dir):
    with pytest.raises(ValueError, match="in use by another loraplex server"), \
            run_server(engine_options(demo_dir, live_server.data_dir), ServerConfig()):
        pass
    assert set(DEMO_ADAPTERS) <= {a["id"] for a in
                                  httpx.get(f"{live_server.url}/v1/adapters", headers=USER).json()["data"]}


def test_an_oversized_chunked_body_is_a_413(live_server):
    def chunks():
        yield b'{"model": "demo", "prompt": "'
        for _ in range(40):
            yield b"x" * 65536  # 2.5 MiB in all, sent without a Content-Length
        yield b'"}'

    resp = httpx.post(f"{live_server.url}/v1/completions", headers={**USER, "Content-Type": "application/json"},
                      content=chunks())
    assert resp.status_code == 413 and "--max-body-size" in resp.json()["error"]["message"]


def test_a_prompt_too_long_to_ever_fit_is_refused_unread(live_server):
    state = live_server.state
    text = "x" * (state.engine._max_prompt_bytes + 1)
    start = time.perf_counter()
    resp = complete(live_server, "demo", prompt=text)
    assert resp.status_code == 400 and "cannot fit in max_model_len" in resp.json()["error"]["message"]
    chat = httpx.post(f"{live_server.url}/v1/chat/completions", headers=USER, timeout=60,
                      json={"model": "demo", "messages": [{"role": "user", "content": text}]})
    assert chat.status_code == 400 and "cannot fit" in chat.json()["error"]["message"]
    assert time.perf_counter() - start < 5


def test_streamed_text_offsets_equal_the_whole_with_a_stop_string_held_back(live_server):
    body = {"model": "beta", "prompt": "Once upon a time", "max_tokens": 30, "temperature": 1.0, "seed": 7,
            "logprobs": 1, "stop": ["QQQQQQQQ"], "ignore_eos": True}
    whole = httpx.post(f"{live_server.url}/v1/completions", headers=USER, json=body, timeout=60).json()
    offsets = []
    with httpx.stream("POST", f"{live_server.url}/v1/completions", headers=USER, json={**body, "stream": True},
                      timeout=60) as stream:
        for line in stream.iter_lines():
            if line.startswith("data: {"):
                logprobs = json.loads(line[6:])["choices"][0]["logprobs"]
                offsets += logprobs["text_offset"] if logprobs else []
    assert offsets == whole["choices"][0]["logprobs"]["text_offset"]
    assert offsets == sorted(offsets)


def test_delete_succeeds_when_an_earlier_delete_was_cut_short(live_server, demo_dir):
    assert upload(live_server, "cut-short", demo_dir / "adapters" / "alpha").status_code == 201
    live_server.state.registry.store.delete("cut-short")  # the row went; the rest did not happen
    assert httpx.delete(f"{live_server.url}/v1/adapters/cut-short", headers=ADMIN).status_code == 200
    assert complete(live_server, "cut-short").status_code == 404


LONE_SURROGATE = "\ud800"  # valid in JSON ("\ud800" escaped), not encodable as UTF-8


def post_raw(server, path: str, body: dict, headers: dict) -> httpx.Response:
    """`body` as JSON with escapes (json.dumps' default): how a client sends a lone surrogate; httpx's
    json= (and so the openai client) cannot encode one."""
    return httpx.post(f"{server.url}{path}", content=json.dumps(body).encode(), timeout=60,
                      headers={**headers, "Content-Type": "application/json"})


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/chat/completions", {"model": LONE_SURROGATE, "messages": [{"role": "user", "content": "hi"}]}, "model"),
    ("/v1/completions", {"model": LONE_SURROGATE, "prompt": "hi"}, "model"),
    ("/v1/completions", {"model": f"alpha*0.5+{LONE_SURROGATE}", "prompt": "hi"}, "model"),
])
def test_a_lone_surrogate_in_model_is_a_4xx_on_model(live_server, path, body, param):
    resp = post_raw(live_server, path, body, USER)
    assert 400 <= resp.status_code < 500, resp.text
    assert resp.json()["error"]["param"] == param


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/load_lora_adapter", {"lora_name": LONE_SURROGATE, "lora_path": "{adapters}/alpha"}),
    ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": LONE_SURROGATE}),
    ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": f"{{adapters}}/{LONE_SURROGATE}"}),
    ("/v1/unload_lora_adapter", {"lora_name": LONE_SURROGATE}),
])
def test_a_lone_surrogate_in_lora_name_or_lora_path_is_a_4xx(live_server, demo_dir, path, body):
    body = {key: value.replace("{adapters}", str(demo_dir / "adapters")) for key, value in body.items()}
    resp = post_raw(live_server, path, body, ADMIN)
    assert 400 <= resp.status_code < 500, resp.text
    assert resp.json()["error"]["message"]


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/completions", {"model": "demo", "prompt": f"Once upon {LONE_SURROGATE}"}),
    ("/v1/chat/completions", {"model": "demo", "messages": [{"role": "user", "content": LONE_SURROGATE}]}),
])
def test_a_lone_surrogate_in_text_is_a_400(live_server, path, body):
    resp = post_raw(live_server, path, body, USER)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["type"] == "invalid_request_error"
    assert complete(live_server, "demo").status_code == 200


@pytest.mark.parametrize("parser", ["httptools", "h11"])
def test_idle_connections_are_capped_and_dropped_and_health_still_answers(demo_dir, tmp_path, monkeypatch, parser):
    """Slowloris and fd exhaustion: connections that send nothing (or half a header) are refused beyond
    --max-connections and dropped after --header-timeout; then a fresh /health is answered. Under both
    of uvicorn's HTTP protocols: httptools (the default) and h11 (where httptools is not installed)."""
    from loraplex.api import server as server_module

    if parser == "h11":
        monkeypatch.setattr(server_module, "HttpToolsProtocol", None)
    assert server_module.http_protocol().__name__ == {"httptools": "GuardedHttpToolsProtocol",
                                                      "h11": "GuardedH11Protocol"}[parser]
    config = ServerConfig(max_connections=8, header_timeout=1.0, timeout_keep_alive=1.0)
    with run_server(engine_options(demo_dir, tmp_path / "home", adapters={}), config) as server:
        port = int(server.url.rsplit(":", 1)[1])
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(8)]
        held[0].sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # half a header, the rest never comes
        time.sleep(0.2)
        refused = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
        for sock in refused:  # answered 503 and closed at once, before any request
            sock.settimeout(2)
            answer = read_until_closed(sock)
            assert answer.startswith(b"HTTP/1.1 503 ") and b'"too_many_connections"' in answer
        start = time.monotonic()
        for sock in held:  # dropped by the header timeout, not answered
            sock.settimeout(3)
            assert read_until_closed(sock) == b""
        assert time.monotonic() - start < 2
        assert httpx.get(f"{server.url}/health", timeout=2).status_code == 200
        for sock in held + refused:
            sock.close()


def test_a_stalled_body_is_a_408_that_closes_the_connection(demo_dir, tmp_path):
    """Slow body: a client that sends its headers and part of its body, then nothing, is answered 408 after
    --body-timeout and the connection is closed; other requests go on."""
    config = ServerConfig(body_timeout=1.0)
    with run_server(engine_options(demo_dir, tmp_path / "home", adapters={}), config) as server:
        port = int(server.url.rsplit(":", 1)[1])
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + API_KEY.encode()
                     + b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\": ")
        start = time.monotonic()
        sock.settimeout(5)
        answer = read_until_closed(sock)
        assert 0.9 < time.monotonic() - start < 4
        assert answer.startswith(b"HTTP/1.1 408 ") and b'"body_timeout"' in answer
        assert b"connection: close" in answer.lower()
        sock.close()
        assert complete(server, "demo").status_code == 200


def read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data
