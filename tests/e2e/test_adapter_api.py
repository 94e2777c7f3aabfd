"""The adapter REST API on a live server: upload -> immediate use -> list -> delete -> 404; every bad
upload gets a clear 4xx and leaves the store exactly as it was; vLLM's load/unload endpoints."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import threading
import zipfile
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file
from server_harness import ADMIN_KEY, API_KEY

from loraplex import LLM, SamplingParams
from loraplex.models.demo import DEMO_ADAPTERS

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
USER = {"Authorization": f"Bearer {API_KEY}"}
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
FILES = (CONFIG, WEIGHTS)
MiB = 1 << 20


@pytest.fixture(scope="module")
def offline(demo_dir):
    adapters = {name: str(demo_dir / "adapters" / name) for name in DEMO_ADAPTERS}
    return LLM(model=str(demo_dir), dtype="float32", device="cpu", max_model_len=512, kv_cache_memory="64MiB",
               adapters=adapters)


def adapter_files(demo_dir: Path, name: str = "alpha") -> dict[str, bytes]:
    return {f: (demo_dir / "adapters" / name / f).read_bytes() for f in FILES}


def upload(server, name: str, files: dict[str, bytes], headers=ADMIN) -> httpx.Response:
    parts = [("files", (filename, data)) for filename, data in files.items()]
    return httpx.post(f"{server.url}/v1/adapters", headers=headers, data={"name": name}, files=parts, timeout=60)


def complete(server, model: str, prompt: str = "The quick brown fox", max_tokens: int = 8) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/completions", headers=USER, timeout=60,
                      json={"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})


def store_snapshot(server) -> tuple[list[str], list[str]]:
    """The catalog as the API lists it, and every file under the adapter store."""
    listed = [a["id"] for a in httpx.get(f"{server.url}/v1/adapters", headers=USER).json()["data"]]
    root = server.data_dir / "adapters"
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and "catalog" not in p.name)
    return listed, files


def expected_text(offline, adapter: str, prompt: str = "The quick brown fox", max_tokens: int = 8) -> str:
    return offline.generate(prompt, SamplingParams(temperature=0, max_tokens=max_tokens), adapter=adapter)[0].text


def test_upload_use_list_delete(live_server, demo_dir, offline):
    files = adapter_files(demo_dir, "alpha")
    resp = upload(live_server, "support-v1", files)
    assert resp.status_code == 201, resp.text
    info = resp.json()
    assert info["rank"] == DEMO_ADAPTERS["alpha"]["r"] and info["target_modules"] == ["q_proj", "v_proj"]
    assert info["sha256"] == hashlib.sha256(files["adapter_model.safetensors"]).hexdigest()
    assert info["format"] == "peft-lora" and info["size_bytes"] == sum(map(len, files.values()))
    assert info["parent"] == "demo" and info["created"] > 0

    out = complete(live_server, "support-v1")  # the very next request, no restart
    assert out.status_code == 200 and out.json()["choices"][0]["text"] == expected_text(offline, "alpha")

    assert "support-v1" in [a["id"] for a in httpx.get(f"{live_server.url}/v1/adapters", headers=USER).json()["data"]]
    models = httpx.get(f"{live_server.url}/v1/models", headers=USER).json()["data"]
    assert {"id": "support-v1", "parent": "demo"}.items() <= next(m for m in models if m["id"] == "support-v1").items()
    got = httpx.get(f"{live_server.url}/v1/adapters/support-v1", headers=USER).json()
    assert got["sha256"] == info["sha256"] and got["stored"] is True

    assert upload(live_server, "support-v1", files).status_code == 409

    deleted = httpx.delete(f"{live_server.url}/v1/adapters/support-v1", headers=ADMIN)
    assert deleted.status_code == 200 and deleted.json()["deleted"] is True
    assert complete(live_server, "support-v1").status_code == 404
    assert httpx.get(f"{live_server.url}/v1/adapters/support-v1", headers=USER).status_code == 404
    assert httpx.delete(f"{live_server.url}/v1/adapters/support-v1", headers=ADMIN).status_code == 404


def test_only_the_admin_key_changes_adapters(live_server, demo_dir):
    files = adapter_files(demo_dir)
    assert upload(live_server, "sneaky", files, headers=USER).status_code == 403
    assert upload(live_server, "sneaky", files, headers={}).status_code == 401
    assert httpx.delete(f"{live_server.url}/v1/adapters/alpha", headers=USER).status_code == 403
    assert "sneaky" not in store_snapshot(live_server)[0]


def _tar_gz(files: dict[str, bytes], prefix: str = "my-adapter/") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in files.items():
            member = tarfile.TarInfo(prefix + name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return buffer.getvalue()


def _zip(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
def test_archive_uploads(live_server, demo_dir, offline, kind):
    files = adapter_files(demo_dir, "beta")
    archive = _tar_gz(files) if kind == "tar.gz" else _zip(files)
    name = f"beta-{kind.replace('.', '')}"
    resp = upload(live_server, name, {f"adapter.{kind}": archive})
    assert resp.status_code == 201, resp.text
    assert complete(live_server, name).json()["choices"][0]["text"] == expected_text(offline, "beta")
    assert httpx.delete(f"{live_server.url}/v1/adapters/{name}", headers=ADMIN).status_code == 200


def _mutated(demo_dir: Path, tmp_path: Path, change) -> dict[str, bytes]:
    """alpha's files with `change(tensors, config)` applied."""
    tensors = load_file(demo_dir / "adapters" / "alpha" / "adapter_model.safetensors")
    config = json.loads((demo_dir / "adapters" / "alpha" / "adapter_config.json").read_text())
    change(tensors, config)
    save_file(tensors, tmp_path / "w.safetensors")
    return {"adapter_config.json": json.dumps(config).encode(),
            "adapter_model.safetensors": (tmp_path / "w.safetensors").read_bytes()}


def _nan(tensors, config):
    key = next(iter(tensors))
    tensors[key][0, 0] = float("nan")


def _wrong_shape(tensors, config):
    for key in list(tensors):
        if "lora_A" in key:
            tensors[key] = torch.cat([tensors[key], tensors[key]], dim=1)  # in_features doubled


def _rank_too_high(tensors, config):
    rank = 32  # the server allows 16
    for key in list(tensors):
        t = tensors[key]
        tensors[key] = torch.randn(rank, t.shape[1]) if "lora_A" in key else torch.randn(t.shape[0], rank)
    config["r"] = rank


# case: (files, status, param, words in the message). Over 8 MiB (--max-adapter-size) the store refuses an
# upload with 413 for its kind; over 9 MiB (plus the multipart allowance) the body limit refuses it unread.
BAD_UPLOADS = {
    "not safetensors": (lambda d, t: {**adapter_files(d), WEIGHTS: b"\x00garbage" * 64}, 400, WEIGHTS, "safetensors"),
    "pickle": (lambda d, t: {CONFIG: adapter_files(d)[CONFIG], "adapter_model.bin": b"\x80\x04pickle"}, 400, "files",
               "pickle"),
    "wrong shapes": (lambda d, t: _mutated(d, t, _wrong_shape), 400, WEIGHTS, "do not fit"),
    "rank too high": (lambda d, t: _mutated(d, t, _rank_too_high), 400, WEIGHTS, "max_lora_rank"),
    "NaN": (lambda d, t: _mutated(d, t, _nan), 400, WEIGHTS, "NaN"),
    "over the adapter size": (lambda d, t: {**adapter_files(d), WEIGHTS: bytes(8 * MiB + MiB // 2)}, 413, "files",
                              "--max-adapter-size"),
    "junk over the adapter size": (lambda d, t: {"a.tar.gz": _tar_gz({**adapter_files(d), "junk": bytes(9 * MiB)})},
                                   413, "files", "size limit"),
    "over the body size": (lambda d, t: {**adapter_files(d), WEIGHTS: bytes(9 * MiB)}, 413, None, "--max-body-size"),
    "traversal file name": (lambda d, t: {"../adapter_config.json": adapter_files(d)[CONFIG], WEIGHTS: b"x"}, 400,
                            "files", ".."),
    "traversal member": (lambda d, t: {"a.tar.gz": _tar_gz(adapter_files(d), prefix="../../")}, 400, "files",
                         "escapes"),
    "corrupt archive": (lambda d, t: {"a.tar.gz": _tar_gz(adapter_files(d))[:200]}, 400, "files", "archive"),
    "config not JSON": (lambda d, t: {**adapter_files(d), CONFIG: b"{nope"}, 400, CONFIG, "JSON"),
}


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_bad_uploads_are_refused_and_change_nothing(live_server, demo_dir, tmp_path, case):
    make, status, param, words = BAD_UPLOADS[case]
    before = store_snapshot(live_server)
    resp = upload(live_server, "bad-one", make(demo_dir, tmp_path))
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert error["param"] == param, error
    assert words.lower() in error["message"].lower(), error["message"]
    if param is not None:  # the message is the field's, as every refusal from inside says it
        assert error["message"].startswith(f"{param}: "), error["message"]
    assert store_snapshot(live_server) == before
    assert complete(live_server, "bad-one").status_code == 404


@pytest.mark.parametrize("name", ["../evil", "a/b", "", "x" * 65, "demo", "-lead"])
def test_bad_names_are_refused(live_server, demo_dir, name):
    before = store_snapshot(live_server)
    resp = upload(live_server, name, adapter_files(demo_dir))
    assert resp.status_code in (400, 409), resp.text
    assert resp.json()["error"]["param"] == "name"
    assert store_snapshot(live_server) == before


def test_vllm_load_and_unload(live_server, demo_dir, offline, tmp_path):
    url = live_server.url
    ok = httpx.post(f"{url}/v1/load_lora_adapter", headers=ADMIN,
                    json={"lora_name": "vllm-gamma", "lora_path": str(demo_dir / "adapters" / "gamma")})
    assert ok.status_code == 200 and "vllm-gamma" in ok.text
    assert complete(live_server, "vllm-gamma").json()["choices"][0]["text"] == expected_text(offline, "gamma")
    outside = httpx.post(f"{url}/v1/load_lora_adapter", headers=ADMIN,
                         json={"lora_name": "escape", "lora_path": str(demo_dir / "adapters" / ".." / "..")})
    assert outside.status_code == 403 and "outside" in outside.json()["error"]["message"]
    link = demo_dir / "adapters" / "link-out"
    link.symlink_to(tmp_path, target_is_directory=True)
    try:
        via_link = httpx.post(f"{url}/v1/load_lora_adapter", headers=ADMIN,
                              json={"lora_name": "escape", "lora_path": str(link)})
        assert via_link.status_code == 403
    finally:
        link.unlink()
    gone = httpx.post(f"{url}/v1/unload_lora_adapter", headers=ADMIN, json={"lora_name": "vllm-gamma"})
    assert gone.status_code == 200
    assert complete(live_server, "vllm-gamma").status_code == 404
    again = httpx.post(f"{url}/v1/unload_lora_adapter", headers=ADMIN, json={"lora_name": "vllm-gamma"})
    assert again.status_code == 404


def test_requests_running_on_a_deleted_adapter_finish(live_server, demo_dir, offline):
    assert upload(live_server, "short-lived", adapter_files(demo_dir, "gamma")).status_code == 201
    body = {"model": "short-lived", "prompt": "Once upon a time", "max_tokens": 60, "temperature": 0,
            "ignore_eos": True, "stream": True}
    chunks: list[str] = []
    first = threading.Event()
    with httpx.stream("POST", f"{live_server.url}/v1/completions", headers=USER, json=body, timeout=60) as stream:
        for line in stream.iter_lines():
            if line.startswith("data: {"):
                chunks.append(json.loads(line[6:])["choices"][0]["text"])
                if not first.is_set():
                    first.set()
                    assert httpx.delete(f"{live_server.url}/v1/adapters/short-lived", headers=ADMIN).status_code == 200
                    assert complete(live_server, "short-lived").status_code == 404
    expected = offline.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=60, ignore_eos=True),
                                adapter="gamma")[0].text
    assert "".join(chunks) == expected


def test_a_sparse_delta_upload_is_listed_with_its_kind_and_density_and_served(live_server, demo_dir, tmp_path):
    import torch

    from loraplex.adapters_store.sparse_format import from_dense, write_sparse_delta

    gen = torch.Generator().manual_seed(0)
    deltas = {}
    for layer in range(4):
        dense = torch.randn(256, 256, generator=gen) * (torch.rand(256, 256, generator=gen) < 0.01)
        deltas[f"model.layers.{layer}.self_attn.q_proj"] = from_dense(dense)
    path = write_sparse_delta(deltas, tmp_path / "sparse", "demo")
    parts = [("files", (f, (path / f).read_bytes())) for f in ("adapter_config.json", "adapter_model.safetensors")]
    resp = httpx.post(f"{live_server.url}/v1/adapters", headers=ADMIN, data={"name": "sparse-1"}, files=parts,
                      timeout=60)
    assert resp.status_code == 201, resp.text
    info = resp.json()
    nnz = sum(d.nnz for d in deltas.values())
    assert (info["kind"], info["format"], info["rank"], info["nnz"]) == ("sparse", "sparse-delta", 0, nnz)
    assert info["density"] == pytest.approx(nnz / (4 * 256 * 256))
    body = {"prompt": "Once upon a time", "max_tokens": 12, "temperature": 0}
    on_it = httpx.post(f"{live_server.url}/v1/completions", headers=USER, json={**body, "model": "sparse-1"})
    base = httpx.post(f"{live_server.url}/v1/completions", headers=USER, json={**body, "model": "demo"})
    assert on_it.status_code == 200 and on_it.json()["choices"][0]["text"] != base.json()["choices"][0]["text"]
    metrics = httpx.get(f"{live_server.url}/metrics").text  # resident in its slot, idle: its entries stay
    used = f'loraplex_sparse_pool_bytes{{state="used"}} {float(nnz * 20)}'  # CPU, fp32: int64 row and column + 4
    assert used in metrics, [line for line in metrics.splitlines() if "sparse_pool" in line]


def sparse_upload_parts(demo_dir, tmp_path):
    from loraplex.adapters_store.sparse_format import from_dense, write_sparse_delta

    gen = torch.Generator().manual_seed(1)
    dense = torch.randn(256, 256, generator=gen) * (torch.rand(256, 256, generator=gen) < 0.02)
    path = write_sparse_delta({"model.layers.0.self_attn.o_proj": from_dense(dense)}, tmp_path / "sp", "demo")
    parts = [("files", (f, (path / f).read_bytes())) for f in ("adapter_config.json", "adapter_model.safetensors")]
    return parts, int((dense != 0).sum())


def test_a_sparse_upload_too_big_for_the_pool_is_refused_and_not_stored(demo_dir, tmp_path):
    from server_harness import engine_options, run_server

    from loraplex.config import ServerConfig

    parts, nnz = sparse_upload_parts(demo_dir, tmp_path)
    probe = LLM(**{k: v for k, v in engine_options(demo_dir, tmp_path / "probe").items() if k != "adapters"})
    layers = [m for m in probe.engine.model.modules() if getattr(m, "lora", None) is not None]
    row_tables = sum(5 * (layer.out_features + 1) * 4 for layer in layers)  # max_loras 4, + the row of slot -1
    options = engine_options(demo_dir, tmp_path / "data", max_sparse_memory=row_tables + (nnz // 2) * 20)
    with run_server(options, ServerConfig(api_key=API_KEY, admin_key=ADMIN_KEY)) as server:
        resp = httpx.post(f"{server.url}/v1/adapters", headers=ADMIN, data={"name": "too-big"}, files=parts,
                          timeout=60)
        assert resp.status_code == 400, resp.text
        error = resp.json()["error"]
        assert error["param"] == "max_sparse_memory" and "larger --max-sparse-memory" in error["message"]
        listed = httpx.get(f"{server.url}/v1/adapters", headers=ADMIN).json()["data"]
        assert "too-big" not in {a["id"] for a in listed}
        assert not list((tmp_path / "data").rglob("*.safetensors"))  # nothing stored


def test_a_rosa_upload_is_listed_as_peft_rosa_and_served(live_server, demo_dir, tmp_path):
    """A LoRA with a sparse part added to one module, written in peft-rosa's layout (`write_rosa`)."""
    import dataclasses

    from loraplex.adapters_store.formats import load_peft_lora
    from loraplex.adapters_store.peft_export import write_rosa
    from loraplex.adapters_store.sparse_format import from_dense

    lora = load_peft_lora(demo_dir / "adapters" / "alpha", "alpha", None, 16)
    key = sorted(lora.modules)[0]
    module = lora.modules[key]
    gen = torch.Generator().manual_seed(2)
    shape = (module.b.shape[0], module.a.shape[1])
    dense = torch.randn(*shape, generator=gen) * (torch.rand(*shape, generator=gen) < 0.01)
    lora.modules[key] = dataclasses.replace(module, sparse=from_dense(dense))
    path = write_rosa(lora, tmp_path / "rosa")
    parts = [("files", (f, (path / f).read_bytes())) for f in ("adapter_config.json", "adapter_model.safetensors")]
    resp = httpx.post(f"{live_server.url}/v1/adapters", headers=ADMIN, data={"name": "rosa-1"}, files=parts,
                      timeout=60)
    assert resp.status_code == 201, resp.text
    info = resp.json()
    assert (info["kind"], info["format"], info["nnz"]) == ("rosa", "peft-rosa", int((dense != 0).sum()))
    body = {"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0, "model": "rosa-1"}
    assert httpx.post(f"{live_server.url}/v1/completions", headers=USER, json=body, timeout=60).status_code == 200
