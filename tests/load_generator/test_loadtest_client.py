"""The load generator's HTTP side against a scripted server (httpx.MockTransport): what it sends, how it
reads streams and errors, open and closed loops, and the whole command line (adapters put in place and
removed, the JSON result, sweeps, plots, the loopback guard)."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

import loadtest.cli as cli
from loadtest.client import RequestOptions, Runner, execute
from loadtest.report import mask_keys
from loadtest.workload import Planned


def sse(*events) -> bytes:
    return b"".join(b"data: " + (e if isinstance(e, bytes) else json.dumps(e).encode()) + b"\n\n" for e in events)


def completion_stream(tokens: int, chat: bool = False) -> bytes:
    events = []
    if chat:
        events.append({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
    # the last chunk carries the last two tokens (as a server that coalesces does): chunks are not tokens
    chunks = [f" t{i}" for i in range(tokens - 2)] + ["".join(f" t{i}" for i in range(max(tokens - 2, 0), tokens))]
    for i, text in enumerate(chunks):
        piece = {"index": 0, "finish_reason": "length" if i == len(chunks) - 1 else None}
        piece.update({"delta": {"content": text}} if chat else {"text": text})
        events.append({"choices": [piece]})
    events.append({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": tokens,
                                            "total_tokens": 7 + tokens}})
    events.append(b"[DONE]")
    return sse(*events)


class FakeServer:
    """A scripted OpenAI-compatible server with loraplex's adapter endpoints."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.bodies: list[dict] = []
        self.headers: list[httpx.Headers] = []
        self.adapters: set[str] = set()
        self.uploads: list[str] = []
        self.deletes: list[str] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.hosts: set[str] = set()

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.hosts.add(request.url.host)
        path = request.url.path
        if path == "/v1/models":
            data = [{"id": "base", "parent": None}] + [{"id": a, "parent": "base"} for a in sorted(self.adapters)]
            return httpx.Response(200, json={"object": "list", "data": data})
        if path == "/v1/adapters" and request.method == "POST":
            body = request.content.decode("latin-1")
            name = body.split('name="name"\r\n\r\n', 1)[1].split("\r\n", 1)[0]
            assert 'filename="adapter_config.json"' in body and 'filename="adapter_model.safetensors"' in body
            if name in self.adapters:
                return httpx.Response(409, json={"error": {"message": "exists"}})
            self.adapters.add(name)
            self.uploads.append(name)
            return httpx.Response(201, json={"id": name})
        if path.startswith("/v1/adapters/") and request.method == "DELETE":
            name = path.rsplit("/", 1)[1]
            self.adapters.discard(name)
            self.deletes.append(name)
            return httpx.Response(200, json={"id": name, "deleted": True})
        if path in ("/v1/completions", "/v1/chat/completions"):
            body = json.loads(request.content)
            self.bodies.append(body)
            self.headers.append(request.headers)
            if body["model"] not in self.adapters | {"base"}:
                return httpx.Response(404, json={"error": {"message": "no such model"}})
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                await asyncio.sleep(self.delay)
            finally:
                self.in_flight -= 1
            chat = path.endswith("chat/completions")
            if body.get("stream"):
                return httpx.Response(200, content=completion_stream(body["max_tokens"], chat),
                                      headers={"content-type": "text/event-stream"})
            choice = {"message": {"role": "assistant", "content": "x"}} if chat else {"text": "x"}
            return httpx.Response(200, json={"choices": [{"index": 0, "finish_reason": "length", **choice}],
                                             "usage": {"prompt_tokens": 7, "completion_tokens": body["max_tokens"]}})
        return httpx.Response(404, json={"error": {"message": f"unknown {path}"}})


def runner_for(handler, options: RequestOptions, timeout: float = 5.0):
    client = httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://127.0.0.1:9")
    return client, Runner(client, "http://127.0.0.1:9/v1", "k-123", options, timeout)


def run(coro):
    return asyncio.run(coro)


OPTIONS = RequestOptions(model_names=("lt-0", "lt-1"), base_model="base", seed=3)


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_a_stream_is_measured_from_its_chunks_and_usage(endpoint):
    server = FakeServer()
    server.adapters |= {"lt-0", "lt-1"}
    options = RequestOptions(model_names=("lt-0", "lt-1"), base_model="base", endpoint=endpoint, seed=3)

    async def go():
        client, runner = runner_for(server, options)
        async with client:
            return await execute(runner, [Planned(0, 0.0, 1, 12, 6), Planned(1, 0.01, -1, 4, 1)], concurrency=None,
                                 duration=None)

    records, elapsed = run(go())
    a, b = records
    assert a.ok and a.adapter == "lt-1" and b.adapter == "base"
    assert a.output_tokens == 6 and a.prompt_tokens == 7 and a.usage_reported
    assert len(a.itl) == 4  # five content chunks (the chat role chunk is not one) for six tokens
    assert 0 < a.ttft <= a.e2e
    assert a.finish_reason == "length"
    assert b.itl == [] and b.output_tokens == 1
    assert elapsed >= max(r.start + r.e2e for r in records) - 1e-9
    body = server.bodies[0]
    assert body["max_tokens"] == 6 and body["temperature"] == 0 and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert "ignore_eos" not in body  # an extension: only when asked
    text = body["messages"][0]["content"] if endpoint == "chat" else body["prompt"]
    assert len(text.split()) == 12
    assert server.headers[0]["authorization"] == "Bearer k-123"


def test_ignore_eos_and_no_stream():
    server = FakeServer()
    server.adapters.add("lt-0")
    options = RequestOptions(model_names=("lt-0",), base_model="base", stream=False, ignore_eos=True)

    async def go():
        client, runner = runner_for(server, options)
        async with client:
            return await execute(runner, [Planned(0, 0.0, 0, 3, 9)], concurrency=None, duration=None)

    (r,), _ = run(go())
    assert server.bodies[0]["ignore_eos"] is True and server.bodies[0]["stream"] is False
    assert "stream_options" not in server.bodies[0]
    assert r.ok and r.output_tokens == 9 and r.ttft == r.e2e and r.itl == [] and r.tpot is None


def test_errors_by_kind():
    async def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        kind = body["model"]
        if kind == "lt-0":
            return httpx.Response(429, json={"error": {"message": "busy"}}, headers={"Retry-After": "1"})
        if kind == "lt-1":
            raise httpx.ConnectError("refused", request=request)
        if kind == "lt-2":
            await asyncio.sleep(2.0)
            return httpx.Response(200, content=completion_stream(2))
        if kind == "lt-3":
            return httpx.Response(200, content=sse({"choices": [{"index": 0, "text": "a"}]},
                                                   {"error": {"message": "shutting down"}}, b"[DONE]"))
        return httpx.Response(200, content=b"data: {not json\n\n")

    options = RequestOptions(model_names=tuple(f"lt-{i}" for i in range(5)), base_model="base")

    async def go():
        client, runner = runner_for(handler, options, timeout=0.3)
        async with client:
            return await execute(runner, [Planned(i, 0.0, i, 2, 2) for i in range(5)], concurrency=None,
                                 duration=None)

    records, _ = run(go())
    assert [r.error for r in records] == ["http_429", "connection", "timeout", "stream_error", "protocol"]
    assert not any(r.ok for r in records)
    assert "busy" in records[0].error_detail and "shutting down" in records[3].error_detail
    assert records[2].e2e == pytest.approx(0.3, abs=0.2)


def test_open_loop_sends_at_the_scheduled_times():
    server = FakeServer(delay=0.3)  # slower than the gaps: an open loop does not wait for answers
    server.adapters.add("lt-0")
    schedule = [Planned(i, 0.1 * i, 0, 2, 2) for i in range(5)]

    async def go():
        client, runner = runner_for(server, RequestOptions(model_names=("lt-0",), base_model="base"))
        async with client:
            return await execute(runner, schedule, concurrency=None, duration=None)

    records, _ = run(go())
    assert all(r.ok for r in records)
    for r in records:
        assert r.start == pytest.approx(r.scheduled, abs=0.05)
    assert server.max_in_flight >= 3


def test_the_duration_stops_an_open_loop():
    server = FakeServer()
    schedule = [Planned(i, 0.05 * i, -1, 2, 2) for i in range(100)]

    async def go():
        client, runner = runner_for(server, OPTIONS)
        async with client:
            return await execute(runner, schedule, concurrency=None, duration=0.5)

    records, _ = run(go())
    assert len(records) == 11  # times 0, 0.05, ..., 0.5
    assert all(r.scheduled <= 0.5 for r in records)


def test_a_closed_loop_keeps_its_concurrency():
    server = FakeServer(delay=0.05)
    schedule = [Planned(i, None, -1, 2, 2) for i in range(12)]

    async def go():
        client, runner = runner_for(server, OPTIONS)
        async with client:
            t = time.perf_counter()
            out = await execute(runner, schedule, concurrency=3, duration=None)
            return out, time.perf_counter() - t

    (records, _), wall = run(go())
    assert [r.index for r in records] == list(range(12))
    assert all(r.ok for r in records)
    assert server.max_in_flight == 3
    assert wall >= 4 * 0.05  # 12 requests, 3 at a time


@pytest.fixture
def fake(monkeypatch):
    """The command line's client talks to a FakeServer."""
    server = FakeServer()
    real = httpx.AsyncClient

    def client(**kwargs):
        assert kwargs.get("trust_env") is False and kwargs.get("follow_redirects") is False
        return real(transport=httpx.MockTransport(server), **kwargs)

    monkeypatch.setattr(cli.httpx, "AsyncClient", client)
    return server


@pytest.fixture
def adapter_dir(tmp_path):
    d = tmp_path / "adapter"
    d.mkdir()
    (d / "adapter_config.json").write_text('{"r": 4}')
    (d / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    return d


def test_the_command_line_uploads_runs_removes_and_writes_its_result(fake, adapter_dir, tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = cli.main(["--base-url", "http://127.0.0.1:8000/v1", "--api-key", "secret-key", "--adapters-from",
                   str(adapter_dir), "--num-adapters", "4", "--popularity", "zipf:1.2", "--rate", "200",
                   "--max-requests", "40", "--prompt-len", "4-8", "--output-len", "3", "--ignore-eos",
                   "--slo-ttft", "1", "--seed", "5", "--output", str(out), "--quiet"])
    assert rc == 0
    result = json.loads(out.read_text())
    used = result["runs"][0]["adapters"]["used"]
    assert sorted(fake.uploads) == used and set(used) <= {"lt-0", "lt-1", "lt-2", "lt-3"}
    assert sorted(fake.deletes) == used and not fake.adapters  # removed at the end
    s = result["summary"]
    assert s["requests"] == s["ok"] == 40 and s["output_tokens"] == 120
    assert s["slo"]["attainment"] == 1.0
    assert result["server"] == "http://127.0.0.1:8000/v1" and result["workload"]["seed"] == 5
    assert result["workload"]["popularity"] == "zipf:1.2"
    assert result["date"] and result["machine"]["cpus"]
    assert len(result["runs"][0]["requests"]) == 40
    assert "secret-key" not in out.read_text()  # keys are masked
    assert fake.hosts == {"127.0.0.1"}
    table = capsys.readouterr().out
    assert "40 sent, 40 ok" in table and "TTFT" in table


def test_keep_adapters_and_a_taken_name(fake, adapter_dir, tmp_path, capsys):
    args = ["--base-url", "http://127.0.0.1:8000/v1", "--adapters-from", str(adapter_dir), "--num-adapters", "1",
            "--max-requests", "3", "--rate", "100", "--prompt-len", "2", "--output-len", "2", "--quiet"]
    assert cli.main([*args, "--keep-adapters"]) == 0
    assert fake.adapters == {"lt-0"} and fake.deletes == []
    assert cli.main(args) == 1  # lt-0 exists: not overwritten
    assert "--keep-adapters" in capsys.readouterr().err
    assert fake.adapters == {"lt-0"}


def test_a_sweep_makes_one_run_per_value_in_one_result(fake, adapter_dir, tmp_path):
    out = tmp_path / "sweep.json"
    rc = cli.main(["--base-url", "http://localhost:1/v1", "--adapters-from", str(adapter_dir), "--sweep",
                   "adapters=1,3", "--popularity", "uniform", "--max-requests", "30", "--rate", "300",
                   "--prompt-len", "2", "--output-len", "2", "--output", str(out), "--quiet", "--endpoint", "chat"])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["sweep"] == {"param": "adapters", "values": [1, 3]}
    assert [r["sweep_value"] for r in result["runs"]] == [1, 3]
    assert [r["workload"]["num_adapters"] for r in result["runs"]] == [1, 3]
    assert result["runs"][0]["adapters"]["used"] == ["lt-0"]
    assert result["runs"][1]["adapters"]["used"] == ["lt-0", "lt-1", "lt-2"]
    assert not fake.adapters


def test_plots_are_drawn_or_refused_before_the_run(fake, tmp_path, capsys):
    plots_dir = tmp_path / "plots"
    args = ["--base-url", "http://127.0.0.1:1/v1", "--sweep", "rate=50,100", "--max-requests", "10",
            "--prompt-len", "2", "--output-len", "3", "--quiet", "--plots", str(plots_dir)]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert cli.main(args) == 2  # the loadtest extra is not installed: said before anything is sent
        assert "matplotlib" in capsys.readouterr().err and not fake.bodies
        return
    assert cli.main(args) == 0
    for name in ("latency_cdf.png", "sweep_throughput.png", "sweep_ttft.png"):
        assert (plots_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000/v1", "http://127.9.9.9/v1", "http://[::1]:8000/v1",
                                 "http://localhost:8000/v1", "https://LOCALHOST/v1"])
def test_loopback_urls_are_accepted(url):
    assert cli.check_base_url(url, allow_remote=False) == url.rstrip("/")


@pytest.mark.parametrize("url", ["http://10.0.0.5:8000/v1", "http://192.168.1.2/v1", "http://example.com/v1",
                                 "http://localhost.example.com/v1", "http://0.0.0.0:8000/v1",
                                 "http://[2001:db8::1]/v1", "http://127.0.0.1.nip.io/v1"])
def test_remote_urls_are_refused_unless_allowed(url):
    with pytest.raises(cli.UsageError, match="--allow-remote"):
        cli.check_base_url(url, allow_remote=False)
    assert cli.check_base_url(url, allow_remote=True) == url


@pytest.mark.parametrize("url", ["127.0.0.1:8000", "ftp://127.0.0.1/v1", "http:///v1", "http://127.0.0.1/v1?x=1"])
def test_malformed_urls_are_refused(url):
    with pytest.raises(cli.UsageError):
        cli.check_base_url(url, allow_remote=True)


def test_a_remote_url_is_refused_before_anything_is_sent(monkeypatch, capsys):
    def no_client(**kwargs):
        raise AssertionError("no client may be made for a refused URL")

    monkeypatch.setattr(cli.httpx, "AsyncClient", no_client)
    rc = cli.main(["--base-url", "http://203.0.113.7:8000/v1", "--max-requests", "5"])
    assert rc == 2
    assert "not a loopback address" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["--sweep", "batch=1,2"], ["--sweep", "rate=1,x"], ["--sweep", "adapters=1.5"],
                                  ["--sweep", "concurrency=1,2"], ["--num-adapters", "2"],
                                  ["--adapter-names", "a,b", "--num-adapters", "3"], ["--popularity", "zipf:-2"],
                                  ["--prompt-len", "0"], ["--timeout", "0"], ["--adapters-from", "/nonexistent"]])
def test_bad_command_lines_exit_2(monkeypatch, args, capsys):
    monkeypatch.setattr(cli.httpx, "AsyncClient", None)
    assert cli.main(["--max-requests", "3", *args]) == 2
    assert "loadtest: error:" in capsys.readouterr().err


def test_keys_are_masked_in_the_recorded_command():
    assert mask_keys(["--api-key", "a", "--admin-key=b", "--rate", "2"]) == \
        ["--api-key", "***", "--admin-key=***", "--rate", "2"]


def test_a_stream_without_usage_counts_its_chunks():
    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=sse(*({"choices": [{"index": 0, "text": f"t{i}"}]} for i in range(4)),
                                               b"[DONE]"))

    async def go():
        client, runner = runner_for(handler, OPTIONS)
        async with client:
            return await execute(runner, [Planned(0, 0.0, 0, 2, 4)], concurrency=None, duration=None)

    (r,), _ = run(go())
    assert r.ok and r.output_tokens == 4 and not r.usage_reported and r.prompt_tokens is None


def test_the_progress_line_is_throttled():
    import io

    from loadtest.client import Progress
    from loadtest.report import ProgressLine

    stream = io.StringIO()  # not a terminal: a line every 10 s at most, and the final one
    line = ProgressLine(stream, "[x] ")
    p = Progress(20)
    p.sent, p.done, p.failed, p.output_tokens = 12, 10, 1, 90
    for t in (1.0, 2.0, 5.0, 10.5, 12.0):
        line(p, t)
    line(p, 13.0, final=True)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3
    assert lines[0] == "[x] [    1s] 10/20 done, 10.00 req/s, 90 tok/s, 1 errors, 2 running"
