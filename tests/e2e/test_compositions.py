"""Adapter arithmetic on a live server: per-request compositions (the `model` expression and the
`adapters` / `merge` fields) against the adapter that `loraplex merge` (merge_directories) writes for the
same recipe, served side by side in one batch with plain-adapter and base requests; stored merges
(POST /v1/adapters/merge); the composition cache and its invalidation; bad recipes."""

from __future__ import annotations

import json
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from server_harness import ADMIN_KEY, API_KEY

from loraplex.arithmetic import MergeParams
from loraplex.merging import Source, merge_directories

USER = {"Authorization": f"Bearer {API_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
FILES = ("adapter_config.json", "adapter_model.safetensors")
PROMPTS = ["Once upon a time", "The capital of", "1 2 3 4", "In the beginning"]


def complete(server, model: str, prompt: str = PROMPTS[0], **extra) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/completions", headers=USER, timeout=120,
                      json={"model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0, **extra})


def upload(server, name: str, directory: Path) -> httpx.Response:
    parts = [("files", (f, (directory / f).read_bytes())) for f in FILES]
    return httpx.post(f"{server.url}/v1/adapters", headers=ADMIN, data={"name": name}, files=parts, timeout=60)


def offline(demo_dir: Path, out: Path, params: MergeParams, inputs: list[tuple[str, float]]) -> Path:
    sources = [Source(name=n, path=demo_dir / "adapters" / n, weight=w) for n, w in inputs]
    merge_directories(sources, params, out)
    return out


def batch(server, requests: list[tuple[str, str, dict]]) -> list[str]:
    """Sends every (model, prompt, extra) at once, so they share batches; returns the texts."""
    with ThreadPoolExecutor(len(requests)) as pool:
        responses = list(pool.map(lambda r: complete(server, r[0], r[1], **r[2]), requests))
    for r in responses:
        assert r.status_code == 200, r.text
    return [r.json()["choices"][0]["text"] for r in responses]


def metric(server, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return float(re.search(rf"^{name}(?:_total)? (\S+)$", text, re.M).group(1))


def test_a_model_expression_equals_the_offline_cat_merge_in_a_mixed_batch(live_server, demo_dir, tmp_path):
    recipe = [("alpha", 0.7), ("beta", -0.5)]
    assert upload(live_server, "cat-offline", offline(demo_dir, tmp_path / "cat", MergeParams("cat"), recipe)
                  ).status_code == 201
    expression = "alpha*0.7+beta*-0.5"
    mixed = [(m, p, {}) for p in PROMPTS for m in (expression, "cat-offline", "demo", "gamma")]
    texts = batch(live_server, mixed)
    by_model = {m: [t for (mm, _, _), t in zip(mixed, texts, strict=True) if mm == m] for m in dict.fromkeys(
        m for m, _, _ in mixed)}
    assert by_model[expression] == by_model["cat-offline"]
    # the composition really changes the output: it is neither the base model nor one input alone
    assert by_model[expression] != by_model["demo"]
    assert by_model[expression] != batch(live_server, [("alpha", p, {}) for p in PROMPTS])
    # the same composition spelled as `adapters` is the same registration
    spelled = batch(live_server, [("demo", p, {"adapters": [{"name": "alpha", "weight": 0.7},
                                                             {"name": "beta", "weight": -0.5}]}) for p in PROMPTS])
    assert spelled == by_model[expression]


def test_a_ties_composition_equals_the_stored_merge_of_the_same_recipe(live_server):
    merge = {"method": "ties", "density": 0.5}
    stored = httpx.post(f"{live_server.url}/v1/adapters/merge", headers=ADMIN, timeout=120, json={
        "name": "ties-stored", "sources": [{"name": "alpha"}, {"name": "beta", "weight": 0.5}], **merge})
    assert stored.status_code == 201, stored.text
    info = stored.json()
    assert info["source"] == "merge" and info["recipe"]["method"] == "ties" and info["recipe"]["density"] == 0.5
    assert [i["name"] for i in info["recipe"]["inputs"]] == ["alpha", "beta"]
    listed = httpx.get(f"{live_server.url}/v1/adapters/ties-stored", headers=USER, timeout=10).json()
    assert listed["recipe"] == info["recipe"]
    composed = {"adapters": [{"name": "alpha"}, {"name": "beta", "weight": 0.5}], "merge": merge}
    texts = batch(live_server, [r for p in PROMPTS for r in (("demo", p, composed), ("ties-stored", p, {}),
                                                             ("beta", p, {}))])
    assert texts[0::3] == texts[1::3]
    assert texts[0::3] != texts[2::3]


def test_compositions_are_cached_and_dropped_when_an_input_is_deleted(live_server, demo_dir):
    for name in ("tmp-a", "tmp-b"):
        assert upload(live_server, name, demo_dir / "adapters" / ("alpha" if name == "tmp-a" else "beta")
                      ).status_code == 201
    builds, hits, dropped = (metric(live_server, f"loraplex_composition_{k}") for k in ("builds", "hits", "dropped"))
    first = complete(live_server, "tmp-a*2+tmp-b").json()["choices"][0]["text"]
    again = complete(live_server, "tmp-a*2+tmp-b").json()["choices"][0]["text"]
    assert first == again
    # one metrics label for every composition (recipes are unbounded)
    assert 'adapter="composition"' in httpx.get(f"{live_server.url}/metrics", timeout=10).text
    assert metric(live_server, "loraplex_composition_builds") == builds + 1
    assert metric(live_server, "loraplex_composition_hits") == hits + 1
    assert httpx.delete(f"{live_server.url}/v1/adapters/tmp-a", headers=ADMIN, timeout=30).status_code == 200
    assert metric(live_server, "loraplex_composition_dropped") == dropped + 1
    gone = complete(live_server, "tmp-a*2+tmp-b")
    assert gone.status_code == 404 and gone.json()["error"]["param"] == "model"
    # a new registration under the old name is a new composition (built again, from the new weights)
    assert upload(live_server, "tmp-a", demo_dir / "adapters" / "beta").status_code == 201
    replaced = complete(live_server, "tmp-a*2 + -tmp-b*-1").json()["choices"][0]["text"]  # same recipe
    assert metric(live_server, "loraplex_composition_builds") == builds + 2
    assert replaced == complete(live_server, "beta*3").json()["choices"][0]["text"]


def test_a_composition_over_max_lora_rank_is_a_400_that_says_how_to_fix_it(live_server):
    resp = complete(live_server, "beta+beta*0.5+alpha")  # q_proj: 8 + 8 + 4 = 20 > 16
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == "model" and "rank 20" in error["message"] and "svd" in error["message"]
    assert error["code"] == "composition_rank_too_large"


@pytest.mark.parametrize(("body", "status", "param"), [
    ({"model": "alpha*0.5+nosuch"}, 404, "model"),
    ({"model": "alpha*abc+beta"}, 400, "model"),
    ({"model": "alpha*nan+beta"}, 400, "model"),
    ({"model": "alpha*inf+beta"}, 400, "model"),
    ({"model": "+".join(["alpha"] * 17)}, 400, "model"),
    ({"model": "demo", "adapters": [{"name": "nosuch"}]}, 404, "adapters"),
    ({"model": "alpha", "adapters": [{"name": "beta"}]}, 400, "model"),
    ({"model": "demo", "adapters": [{"name": "alpha"}, {"name": "beta"}], "merge": {"method": "nope"}}, 400,
     "merge.method"),
    ({"model": "demo", "adapters": [{"name": "alpha"}, {"name": "beta"}], "merge": {"method": "ties",
                                                                                   "density": 1.5}}, 400,
     "merge.density"),
    ({"model": "alpha", "merge": {"method": "ties"}}, 400, "merge"),
])
def test_bad_recipes_are_4xx_naming_the_field(live_server, body, status, param):
    resp = httpx.post(f"{live_server.url}/v1/completions", headers=USER, timeout=60,
                      json={"prompt": "hi", "max_tokens": 2, **body})
    assert resp.status_code == status, resp.text
    assert resp.json()["error"]["param"] == param


@pytest.mark.parametrize(("body", "status", "param"), [
    ({"name": "m1", "method": "ties", "sources": [{"name": "nosuch"}]}, 404, "sources"),
    ({"name": "m1", "method": "bogus", "sources": [{"name": "alpha"}]}, 400, "method"),
    ({"name": "m1", "method": "ties", "density": 0, "sources": [{"name": "alpha"}]}, 400, "density"),
    ({"name": "alpha", "method": "cat", "sources": [{"name": "beta"}]}, 409, "name"),
    ({"name": "m1", "method": "cat", "sources": [{"name": "beta"}, {"name": "beta"}, {"name": "beta"}]}, 400,
     "rank"),
])
def test_bad_stored_merges_are_refused_and_store_nothing(live_server, body, status, param):
    resp = httpx.post(f"{live_server.url}/v1/adapters/merge", headers=ADMIN, timeout=60, json=body)
    assert resp.status_code == status, resp.text
    assert resp.json()["error"]["param"] == param
    assert "m1" not in {a["id"] for a in httpx.get(f"{live_server.url}/v1/adapters", headers=USER).json()["data"]}


def test_a_stored_merge_needs_the_admin_key(live_server):
    resp = httpx.post(f"{live_server.url}/v1/adapters/merge", headers=USER, timeout=60,
                      json={"name": "m2", "method": "cat", "sources": [{"name": "alpha"}]})
    assert resp.status_code == 403


def test_a_stored_mwa_merge_reads_the_uploaded_trainer_states(live_server, demo_dir, tmp_path):
    states = {"ck-a": 2.0, "ck-b": 0.5}
    for name, loss in states.items():
        directory = tmp_path / name
        shutil.copytree(demo_dir / "adapters" / "alpha", directory)
        (directory / "trainer_state.json").write_text(json.dumps(
            {"global_step": 10, "log_history": [{"loss": 9.0, "step": 1}, {"loss": loss, "step": 10}]}))
        parts = [("files", (f, (directory / f).read_bytes())) for f in (*FILES, "trainer_state.json")]
        resp = httpx.post(f"{live_server.url}/v1/adapters", headers=ADMIN, data={"name": name}, files=parts,
                          timeout=60)
        assert resp.status_code == 201, resp.text
    resp = httpx.post(f"{live_server.url}/v1/adapters/merge", headers=ADMIN, timeout=60, json={
        "name": "ck-mwa", "method": "mwa", "penalty": 1.0, "sources": [{"name": "ck-a"}, {"name": "ck-b"}]})
    assert resp.status_code == 201, resp.text
    inputs = resp.json()["recipe"]["inputs"]
    assert [i["loss"] for i in inputs] == [2.0, 0.5]  # the last logged loss of each trainer state
    assert [i["mwa_weight"] for i in inputs] == pytest.approx([0.2, 0.8])  # (1/2) / (1/2 + 2), 2 / 2.5
    # given in the request, the metrics win over the trainer states
    resp = httpx.post(f"{live_server.url}/v1/adapters/merge", headers=ADMIN, timeout=60, json={
        "name": "ck-mwa2", "method": "mwa", "sources": [{"name": "ck-a", "loss": 1.0}, {"name": "ck-b", "loss": 1.0}]})
    assert [i["mwa_weight"] for i in resp.json()["recipe"]["inputs"]] == pytest.approx([0.5, 0.5])
