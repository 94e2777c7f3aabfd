"""loraplex on Ray Serve, on a local Ray cluster on the CPU: two replicas of the tiny demo model behind the
ingress. Outputs equal the single engine's (base, adapter, composition, streamed); an upload through the
ingress reaches both replicas, a delete reaches both before it is acknowledged; every replica's metrics
are exported; a replica killed mid-run is replaced and no request hangs."""

from __future__ import annotations

import concurrent.futures
import json
import socket
import time
from pathlib import Path

import httpx
import pytest

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install -e '.[ray]')")
serve = pytest.importorskip("ray.serve")

from loraplex import LLM, SamplingParams  # noqa: E402
from loraplex.config import ServerConfig  # noqa: E402
from loraplex.models.demo import DEMO_ADAPTERS  # noqa: E402

PROMPTS = ["Once upon a time", "The capital of", "1 2 3 4"]
FILES = ("adapter_config.json", "adapter_model.safetensors")
MAX_TOKENS = 8
USER = {"Authorization": "Bearer user-key-123"}
ADMIN = {"Authorization": "Bearer admin-key-123"}
COMPOSITION = [("alpha", 0.7), ("beta", -0.5)]
EXPRESSION = "alpha*0.7+beta*-0.5"


@pytest.fixture(scope="module")
def cluster(demo_dir, tmp_path_factory):
    from loraplex.distributed.cluster import APP_NAME, NAMESPACE, application

    options = {"model": str(demo_dir), "dtype": "float32", "device": "cpu", "max_model_len": 256,
               "kv_cache_memory": "32MiB", "data_dir": str(tmp_path_factory.mktemp("cluster-home")),
               "max_loras": 2, "max_cpu_adapters": 4, "threads": 1,
               "adapters": {name: str(demo_dir / "adapters" / name) for name in DEMO_ADAPTERS}}
    ray.init(num_cpus=2, namespace=NAMESPACE, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}})
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = ServerConfig(api_key="user-key-123", admin_key="admin-key-123", max_body_size="64KiB")
        serve.run(application(options, config, replicas=2, replica_cpus=0.5), name=APP_NAME,
                  route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def engine(demo_dir, tmp_path_factory):
    """The single engine, with the demo adapters and `cat-offline`: the offline cat merge of the composition
    the tests request (`loraplex merge`'s code), which one server serves equal to the composition."""
    from loraplex.arithmetic import MergeParams
    from loraplex.merging import Source, merge_directories

    merged = tmp_path_factory.mktemp("merged") / "cat"
    merge_directories([Source(name=n, path=demo_dir / "adapters" / n, weight=w) for n, w in COMPOSITION],
                      MergeParams("cat"), merged)
    adapters = {name: str(demo_dir / "adapters" / name) for name in DEMO_ADAPTERS} | {"cat-offline": str(merged)}
    return LLM(model=str(demo_dir), dtype="float32", device="cpu", max_model_len=256, kv_cache_memory="32MiB",
               max_loras=2, adapters=adapters)


def expected(engine: LLM, model: str, prompt: str) -> str:
    adapter = None if model == engine.served_model_name else model
    out = engine.generate(prompt, SamplingParams(max_tokens=MAX_TOKENS, temperature=0), adapter=adapter)
    return out[0].text


def complete(url: str, model: str, prompt: str = PROMPTS[0], **extra) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", timeout=120, headers=USER,
                      json={"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, **extra})


def replicas_seen(url: str, probe, want: int = 2, tries: int = 60) -> dict[str, object]:
    """Call `probe()` (a response carrying x-loraplex-replica) until `want` replicas answered; {id: result}."""
    seen: dict[str, object] = {}
    for _ in range(tries):
        response = probe()
        seen.setdefault(response.headers["x-loraplex-replica"], response)
        if len(seen) >= want:
            return seen
    raise AssertionError(f"only replicas {sorted(seen)} answered in {tries} tries")


def test_outputs_equal_the_single_engine(cluster, engine):
    base = engine.served_model_name
    for model in (base, "alpha", "beta"):
        for prompt in PROMPTS:
            response = complete(cluster, model, prompt)
            assert response.status_code == 200, response.text
            assert response.json()["choices"][0]["text"] == expected(engine, model, prompt)
    # a composition (model expression) is composed on the replica as on one server: equal to the offline merge
    for prompt in PROMPTS:
        composed = complete(cluster, EXPRESSION, prompt)
        assert composed.status_code == 200, composed.text
        assert composed.json()["choices"][0]["text"] == expected(engine, "cat-offline", prompt)
    assert expected(engine, "cat-offline", PROMPTS[0]) not in (expected(engine, base, PROMPTS[0]),
                                                                expected(engine, "alpha", PROMPTS[0]))


def test_streaming_through_the_ingress_equals_the_whole_answer(cluster, engine):
    with httpx.stream("POST", f"{cluster}/v1/completions", timeout=120, headers=USER, json={
            "model": "alpha", "prompt": PROMPTS[1], "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])
    assert len(events) > 2 and text == expected(engine, "alpha", PROMPTS[1])


def test_an_upload_reaches_every_replica_and_a_delete_too(cluster, engine, demo_dir: Path):
    parts = [("files", (f, (demo_dir / "adapters" / "beta" / f).read_bytes())) for f in FILES]
    created = httpx.post(f"{cluster}/v1/adapters", headers=ADMIN, data={"name": "shared"}, files=parts,
                         timeout=60)
    assert created.status_code == 201, created.text
    # every replica lists it and serves it (non-routed requests reach either replica at random)
    listings = replicas_seen(cluster, lambda: httpx.get(f"{cluster}/v1/adapters", headers=USER, timeout=60))
    for response in listings.values():
        assert "shared" in [a["id"] for a in response.json()["data"]]
    answer = complete(cluster, "shared", PROMPTS[2])
    assert answer.status_code == 200 and answer.json()["choices"][0]["text"] == expected(engine, "beta", PROMPTS[2])
    # used on both replicas: "shared" has one home replica, but scaled copies of it ("shared*1.0",
    # "shared*1.00", ...) are other names, homed by their hash, composed from the replica's own copy
    used: dict[str, str] = {}
    for digits in range(1, 40):
        response = complete(cluster, "shared*1." + "0" * digits, PROMPTS[2])
        assert response.status_code == 200, response.text
        used.setdefault(response.headers["x-loraplex-replica"], response.json()["choices"][0]["text"])
        if len(used) == 2:
            break
    assert len(used) == 2 and set(used.values()) == {expected(engine, "beta", PROMPTS[2])}

    deleted = httpx.delete(f"{cluster}/v1/adapters/shared", headers=ADMIN, timeout=60)
    assert deleted.status_code == 200, deleted.text
    listings = replicas_seen(cluster, lambda: httpx.get(f"{cluster}/v1/adapters", headers=USER, timeout=60))
    for response in listings.values():
        assert "shared" not in [a["id"] for a in response.json()["data"]]
    gone: set[str] = set()  # on both replicas at once: "shared" itself has one home; scaled names land on each
    for digits in range(1, 40):
        response = complete(cluster, "shared*1." + "0" * digits)
        assert response.status_code == 404, response.text
        gone.add(response.headers["x-loraplex-replica"])
        if len(gone) == 2:
            break
    assert len(gone) == 2 and complete(cluster, "shared").status_code == 404


def test_every_replicas_metrics_are_exported(cluster):
    for prompt in PROMPTS:
        assert complete(cluster, "alpha", prompt).status_code == 200
    deadline = time.monotonic() + 30
    while True:
        text = httpx.get(f"{cluster}/metrics", timeout=30).text
        replicas = {line.split('replica="', 1)[1].split('"', 1)[0] for line in text.splitlines()
                    if line.startswith("loraplex_kv_cache_blocks{")}
        if len(replicas) == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(replicas) == 2, text[:2000]
    assert text.count("# TYPE loraplex_generation_tokens_total counter") == 1
    generated = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                 if line.startswith("loraplex_generation_tokens_total{")]
    assert sum(generated) >= len(PROMPTS) * MAX_TOKENS


def test_a_replica_killed_mid_run_is_replaced_and_no_request_hangs(cluster):
    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True)
                if "LoraplexReplica" in a["name"] and a["name"].startswith("SERVE_REPLICA")]
    assert len(replicas) == 2
    victim = ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"])

    def one(i: int) -> int:
        return complete(cluster, ("alpha", "beta", "demo")[i % 3], PROMPTS[i % 3], max_tokens=24).status_code

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(one, i) for i in range(16)]
        time.sleep(0.3)
        ray.kill(victim, no_restart=False)
        statuses = [f.result(timeout=120) for f in futures]  # none hangs
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) >= 8
    deadline = time.monotonic() + 120  # Serve starts a new replica; both serve again
    while time.monotonic() < deadline:
        status = serve.status().applications["loraplex"].deployments["LoraplexReplica"]
        if status.status == "HEALTHY" and status.replica_states.get("RUNNING", 0) == 2:
            break
        time.sleep(1)
    else:
        raise AssertionError(f"the replica was not replaced: {status}")
    assert complete(cluster, "alpha").status_code == 200


def test_the_ingress_restarting_loses_no_adapter(cluster, demo_dir: Path):
    parts = [("files", (f, (demo_dir / "adapters" / "gamma" / f).read_bytes())) for f in FILES]
    assert httpx.post(f"{cluster}/v1/adapters", headers=ADMIN, data={"name": "kept"}, files=parts,
                      timeout=60).status_code == 201
    ingress = next(a for a in ray.util.list_named_actors(all_namespaces=True)
                   if "LoraplexIngress" in a["name"] and a["name"].startswith("SERVE_REPLICA"))
    ray.kill(ray.get_actor(ingress["name"], namespace=ingress["namespace"]), no_restart=False)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            listed = httpx.get(f"{cluster}/v1/adapters", headers=USER, timeout=10)
            if listed.status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    assert "kept" in [a["id"] for a in listed.json()["data"]]
    assert complete(cluster, "kept").status_code == 200
    # and it is the catalog that holds it, not only the replicas' copies
    from loraplex.distributed.catalog import CATALOG_ACTOR
    from loraplex.distributed.cluster import NAMESPACE

    _, listing = ray.get(ray.get_actor(CATALOG_ACTOR, namespace=NAMESPACE).listing.remote())
    assert "kept" in listing


def test_keys_limits_and_conflicts_hold_through_the_ingress(cluster, demo_dir: Path):
    body = {"model": "alpha", "prompt": "x", "max_tokens": 1}
    assert httpx.post(f"{cluster}/v1/completions", json=body, timeout=60).status_code == 401
    parts = [("files", (f, (demo_dir / "adapters" / "alpha" / f).read_bytes())) for f in FILES]
    refused = httpx.post(f"{cluster}/v1/adapters", headers=USER, data={"name": "nope"}, files=parts, timeout=60)
    assert refused.status_code == 403  # the inference key may not change adapters
    too_big = httpx.post(f"{cluster}/v1/completions", headers=USER, timeout=60,
                         json={**body, "prompt": "x" * (70 << 10)})
    assert too_big.status_code == 413
    # a local (--adapter) adapter cannot be deleted on a cluster: every replica serves its own copy
    assert httpx.delete(f"{cluster}/v1/adapters/alpha", headers=ADMIN, timeout=60).status_code == 409
    assert complete(cluster, "alpha").status_code == 200
    # the same name uploaded twice without replace: the second is refused, as on one server
    assert httpx.post(f"{cluster}/v1/adapters", headers=ADMIN, data={"name": "twice"}, files=parts,
                      timeout=60).status_code == 201
    again = httpx.post(f"{cluster}/v1/adapters", headers=ADMIN, data={"name": "twice"}, files=parts, timeout=60)
    assert again.status_code == 409, again.text
