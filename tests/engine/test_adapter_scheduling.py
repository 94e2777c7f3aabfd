"""Adapter-aware scheduling through the engine: slot limits, background loads, starvation, removal,
failed loads; every test ends with no slot held and every KV block free."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest

from loraplex import LLM, SamplingParams
from loraplex.engine import adapters as adapters_module
from loraplex.engine import scheduler as scheduler_module
from loraplex.models.demo import DEMO_ADAPTERS

ADAPTERS = tuple(DEMO_ADAPTERS)  # alpha, beta, gamma
ENGINE_OPTIONS = dict(dtype="float32", device="cpu", max_model_len=256, kv_cache_memory="32MiB")
PROMPTS = ("The lighthouse keeper", "Once upon a time", "In the garden there")
LONG_PROMPT = "The old lighthouse keeper walked along the rocky shore every morning, " * 3  # > 2 KV blocks
TIMEOUT_S = 10.0


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)


def _adapter_paths(demo_dir: Path) -> dict[str, str]:
    return {name: str(demo_dir / "adapters" / name) for name in ADAPTERS}


@pytest.fixture
def make_llm(demo_dir):
    llms = []

    def make(**options) -> LLM:
        llm = LLM(model=str(demo_dir), adapters=_adapter_paths(demo_dir), **{**ENGINE_OPTIONS, **options})
        llms.append(llm)
        return llm

    yield make
    for llm in llms:
        llm.engine.adapters.shutdown()


@pytest.fixture(scope="module")
def reference(demo_dir):
    """reference(prompt, adapter, max_tokens): the greedy tokens of that request run alone."""
    llm = LLM(model=str(demo_dir), adapters=_adapter_paths(demo_dir), max_loras=3, max_cpu_adapters=3,
              **ENGINE_OPTIONS)
    memo: dict[tuple[str, str | None, int], list[int]] = {}

    def run(prompt: str, adapter: str | None, max_tokens: int) -> list[int]:
        key = (prompt, adapter, max_tokens)
        if key not in memo:
            out = llm.generate(prompt, greedy(max_tokens), adapter=adapter)[0]
            assert out.finish_reason == "length"
            memo[key] = out.token_ids
        return memo[key]

    yield run
    llm.engine.adapters.shutdown()


def record_steps(llm: LLM) -> list[list[tuple[str, str | None, int]]]:
    """Wraps the runner: one entry per executed step, (request id, adapter, lora slot) per scheduled sequence."""
    steps: list[list[tuple[str, str | None, int]]] = []
    execute = llm.engine.runner.execute

    def recording(batch):
        steps.append([(seq.request_id, seq.adapter, seq.lora_slot) for seq, _ in batch.scheduled])
        return execute(batch)

    llm.engine.runner.execute = recording
    return steps


def run_to_completion(llm: LLM, max_steps: int = 500) -> dict:
    """Steps until nothing is unfinished; request id -> its final output."""
    finished = {}
    for _ in range(max_steps):
        if not llm.engine.has_unfinished_requests():
            return finished
        for out in llm.engine.step():
            if out.finished:
                assert out.request_id not in finished, f"{out.request_id} finished twice"
                finished[out.request_id] = out
    raise AssertionError(f"requests still unfinished after {max_steps} steps: "
                         f"waiting {list(llm.engine.scheduler.waiting)}, running {llm.engine.scheduler.running}")


def assert_drained(llm: LLM) -> None:
    engine = llm.engine
    assert not engine.has_unfinished_requests() and engine.num_unfinished_requests == 0
    assert engine.adapters.slots.users == {}, "an adapter slot is still held"
    assert all(slot >= 0 for slot in engine.adapters.slots.slot_of.values())
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks, f"{bm.num_blocks - bm.num_free_blocks} KV blocks leaked"


def assert_slot_limit(steps, max_loras: int) -> None:
    for i, step in enumerate(steps):
        adapters = {adapter for _, adapter, _ in step if adapter is not None}
        slots = {slot for _, adapter, slot in step if adapter is not None}
        assert len(adapters) <= max_loras, f"step {i}: {sorted(adapters)} share {max_loras} slot(s)"
        assert len(slots) == len(adapters) and all(0 <= s < max_loras for s in slots), f"step {i}: {step}"
        assert all(slot == -1 for _, adapter, slot in step if adapter is None), f"step {i}: base with a slot"


@pytest.fixture
def gate_loads(monkeypatch):
    """gate_loads() -> (gate, calls): from then on background adapter loads wait for `gate` (set it to
    let them finish); `calls` records them. Install it after the engine is built: registration loads too."""
    gate = threading.Event()
    calls: list[str] = []

    def install() -> tuple[threading.Event, list[str]]:
        real = adapters_module.load_peft_lora

        def slow(path, name, *args, **kwargs):
            calls.append(name)
            assert gate.wait(TIMEOUT_S), "the test never opened the gate"
            return real(path, name, *args, **kwargs)

        monkeypatch.setattr(adapters_module, "load_peft_lora", slow)
        return gate, calls

    yield install
    gate.set()  # never leave the loader thread blocked


# -- tests ---------------------------------------------------------------------------------------------


def test_one_slot_serves_three_adapters_and_the_base_model(make_llm, reference):
    llm = make_llm(max_loras=1, max_cpu_adapters=3)
    steps = record_steps(llm)
    requests = {}
    for prompt in PROMPTS[:2]:
        for adapter in (*ADAPTERS, None):
            requests[llm.engine.add_request(prompt, greedy(6), adapter=adapter)] = (prompt, adapter)
    finished = run_to_completion(llm)
    assert set(finished) == set(requests)
    for request_id, (prompt, adapter) in requests.items():
        out = finished[request_id]
        assert out.finish_reason == "length" and out.adapter == adapter
        assert out.token_ids == reference(prompt, adapter, 6), f"{adapter} on {prompt!r} differs from it alone"
    assert_slot_limit(steps, max_loras=1)
    assert {adapter for step in steps for _, adapter, _ in step} == {*ADAPTERS, None}
    mixed = [step for step in steps if {a for _, a, _ in step} - {None} and None in {a for _, a, _ in step}]
    assert mixed, "base-model requests never ran in the same step as adapter requests"
    assert llm.engine.adapters.slots.loads >= 3
    assert_drained(llm)


def test_two_slots_run_two_adapters_in_one_step(make_llm, reference):
    llm = make_llm(max_loras=2, max_cpu_adapters=3)
    steps = record_steps(llm)
    requests = {llm.engine.add_request(PROMPTS[0], greedy(5), adapter=a): a for a in (*ADAPTERS, None)}
    finished = run_to_completion(llm)
    for request_id, adapter in requests.items():
        assert finished[request_id].token_ids == reference(PROMPTS[0], adapter, 5)
    assert_slot_limit(steps, max_loras=2)
    assert {a for _, a, _ in steps[0]} == {"alpha", "beta", None}  # gamma waits for a slot
    assert_drained(llm)


def test_a_loading_adapter_does_not_hold_back_others(make_llm, reference, demo_dir, gate_loads):
    llm = make_llm(max_loras=1)
    gate, calls = gate_loads()
    llm.engine.adapters.register("slow", demo_dir / "adapters" / "alpha", validate=False)
    steps = record_steps(llm)
    slow_id = llm.engine.add_request(PROMPTS[0], greedy(6), adapter="slow")  # first in line
    base_id = llm.engine.add_request(PROMPTS[1], greedy(8))
    slow_seq = llm.engine._requests[slow_id].seq
    for step in range(8):  # the base request runs a token per step while "slow" loads
        outputs = llm.engine.step()
        assert [out.request_id for out in outputs] == [base_id], f"step {step}: {outputs}"
        assert len(outputs[0].token_ids) == step + 1
    base_out = outputs[0]
    assert base_out.finished and base_out.finish_reason == "length"
    assert base_out.token_ids == reference(PROMPTS[1], None, 8)
    assert slow_seq.num_tokens == slow_seq.num_prompt_tokens and slow_seq in llm.engine.scheduler.waiting
    assert calls == [llm.engine.adapters.key("slow")]  # one background load, however often it was asked
    gate.set()
    finished = run_to_completion(llm, max_steps=5000)  # idle steps sleep 1 ms while the load lands
    assert finished[slow_id].finish_reason == "length"
    assert finished[slow_id].token_ids == reference(PROMPTS[0], "alpha", 6)
    assert calls == [llm.engine.adapters.key("slow")] and llm.engine.adapters.disk_loads == 1
    assert_slot_limit(steps, max_loras=1)
    assert_drained(llm)


@pytest.mark.parametrize("max_skips", [None, 4], ids=["default", "4"])
def test_a_request_for_another_adapter_does_not_starve(make_llm, monkeypatch, max_skips):
    if max_skips is not None:
        monkeypatch.setattr(scheduler_module, "MAX_SKIPS", max_skips)
    bound_skips = scheduler_module.MAX_SKIPS
    llm = make_llm(max_loras=1)
    engine = llm.engine
    steps = record_steps(llm)
    a_tokens, b_tokens = 4, 3
    engine.add_request(PROMPTS[0], greedy(a_tokens), adapter="alpha")
    engine.step()
    b_id = engine.add_request(PROMPTS[1], greedy(b_tokens), adapter="beta")
    bound = bound_skips + a_tokens + b_tokens + 2
    b_out = None
    num_steps = 0
    while b_out is None and num_steps < bound:
        engine.add_request(PROMPTS[2], greedy(a_tokens), adapter="alpha")  # a steady stream for alpha
        num_steps += 1
        for out in engine.step():
            if out.request_id == b_id and out.finished:
                b_out = out
    assert b_out is not None, f"the beta request did not finish within {bound} steps of a stream of alpha requests"
    assert b_out.finish_reason == "length" and len(b_out.token_ids) == b_tokens
    # the stream really competed: alpha requests submitted after beta's ran before it finished
    assert num_steps > b_tokens + 1
    finished = run_to_completion(llm)
    assert all(out.finish_reason == "length" for out in finished.values())
    assert_slot_limit(steps, max_loras=1)
    assert_drained(llm)


def test_removing_an_adapter_lets_its_running_request_finish(make_llm, reference):
    llm = make_llm(max_loras=1)
    engine = llm.engine
    running_id = engine.add_request(PROMPTS[0], greedy(8), adapter="alpha")
    base_id = engine.add_request(PROMPTS[1], greedy(8))
    engine.step()
    engine.step()
    engine.remove_adapter("alpha")
    assert "alpha" not in engine.adapter_names()
    with pytest.raises(ValueError, match="not registered"):
        engine.add_request(PROMPTS[0], greedy(4), adapter="alpha")
    with pytest.raises(ValueError, match="not registered"):
        engine.remove_adapter("alpha")
    finished = run_to_completion(llm)
    assert finished[running_id].finish_reason == "length"
    assert finished[running_id].token_ids == reference(PROMPTS[0], "alpha", 8)
    assert finished[base_id].token_ids == reference(PROMPTS[1], None, 8)
    # other adapters still serve
    beta = llm.generate(PROMPTS[2], greedy(4), adapter="beta")[0]
    assert beta.token_ids == reference(PROMPTS[2], "beta", 4)
    assert_drained(llm)


@pytest.mark.parametrize("waiting_for", ["admission", "slot"])
def test_a_queued_request_whose_adapter_is_removed_still_finishes(make_llm, reference, waiting_for):
    """A request queued (not yet running) on an adapter that is then removed still runs, on the weights
    of the registration it was accepted on; it is never left waiting."""
    llm = make_llm(max_loras=1)
    engine = llm.engine
    if waiting_for == "slot":
        engine.add_request(PROMPTS[1], greedy(4), adapter="beta")
        engine.step()  # beta holds the only slot
    queued_id = engine.add_request(PROMPTS[0], greedy(4), adapter="alpha")
    engine.remove_adapter("alpha")
    finished = run_to_completion(llm, max_steps=100)
    out = finished[queued_id]
    assert out.finished and out.finish_reason == "length", out.finish_reason
    assert out.token_ids == reference(PROMPTS[0], "alpha", 4)
    assert_drained(llm)


def test_readding_an_adapter_name_serves_the_new_weights(make_llm, reference, demo_dir):
    """remove_adapter(name) while a request runs on it, then add_adapter(name, other files): the running
    request finishes on the old weights, and new requests on `name` get the new weights, neither the old
    slot (kept only while in use) nor KV blocks that the old weights computed."""
    llm = make_llm(max_loras=1)
    engine = llm.engine
    old_id = engine.add_request(LONG_PROMPT, greedy(4), adapter="alpha")
    engine.step()
    engine.remove_adapter("alpha")
    assert run_to_completion(llm)[old_id].token_ids == reference(LONG_PROMPT, "alpha", 4)
    engine.add_adapter("alpha", demo_dir / "adapters" / "beta")
    out = llm.generate(LONG_PROMPT, greedy(6), adapter="alpha")[0]
    assert out.token_ids == reference(LONG_PROMPT, "beta", 6), "served with the removed adapter's weights"
    assert out.num_cached_tokens == 0, "reused KV blocks computed with the removed adapter"
    assert_drained(llm)


def test_readding_an_idle_adapter_name_does_not_reuse_its_cached_prompt_blocks(make_llm, reference, demo_dir):
    """Prefix-cache blocks are salted with the adapter's registration (Sequence.adapter_key), not its
    name: after remove_adapter + add_adapter of the same name with other weights, a prompt the old
    adapter processed is computed again, not served from the old weights' KV."""
    llm = make_llm(max_loras=1)
    first = llm.generate(LONG_PROMPT, greedy(4), adapter="alpha")[0]
    assert first.token_ids == reference(LONG_PROMPT, "alpha", 4)
    llm.engine.remove_adapter("alpha")
    assert not llm.engine.adapters.slots.resident("alpha")
    llm.engine.add_adapter("alpha", demo_dir / "adapters" / "beta")
    out = llm.generate(LONG_PROMPT, greedy(6), adapter="alpha")[0]
    assert out.num_cached_tokens == 0, "reused KV blocks computed with the removed adapter"
    assert out.token_ids == reference(LONG_PROMPT, "beta", 6)
    assert_drained(llm)


def test_a_failed_adapter_load_finishes_its_request_with_error(make_llm, reference, demo_dir, tmp_path):
    llm = make_llm(max_loras=1)
    engine = llm.engine
    path = Path(shutil.copytree(demo_dir / "adapters" / "alpha", tmp_path / "broken"))
    engine.adapters.register("broken", path, validate=False)
    shutil.rmtree(path)
    base_id = engine.add_request(PROMPTS[0], greedy(5))
    broken_id = engine.add_request(PROMPTS[1], greedy(5), adapter="broken")
    beta_id = engine.add_request(PROMPTS[2], greedy(5), adapter="beta")
    finished = run_to_completion(llm, max_steps=5000)  # idle steps sleep 1 ms while the load fails
    broken = finished[broken_id]
    assert broken.finish_reason == "error" and broken.token_ids == [] and broken.adapter == "broken"
    assert "adapter_config.json is missing" in str(broken.stop_reason)
    assert finished[base_id].token_ids == reference(PROMPTS[0], None, 5)
    assert finished[beta_id].token_ids == reference(PROMPTS[2], "beta", 5)
    assert engine.adapters.key("broken") in engine.adapters.errors
    assert_drained(llm)
    # a later request on it fails the same way, without running
    again = llm.generate(PROMPTS[0], greedy(3), adapter="broken")[0]
    assert again.finish_reason == "error" and again.token_ids == []
    assert_drained(llm)


def test_a_queued_request_finishes_on_an_adapter_removed_after_it_was_accepted(make_llm, reference):
    llm = make_llm(max_loras=1)
    engine = llm.engine
    alpha_id = engine.add_request(PROMPTS[0], greedy(30), adapter="alpha")
    engine.step()  # alpha holds the only slot
    gamma_id = engine.add_request(PROMPTS[1], greedy(5), adapter="gamma")  # queued behind it
    engine.step()
    engine.remove_adapter("gamma")
    with pytest.raises(ValueError, match="not registered"):
        engine.add_request(PROMPTS[1], greedy(5), adapter="gamma")  # new requests are refused
    finished = run_to_completion(llm)
    assert finished[gamma_id].finish_reason == "length"
    assert finished[gamma_id].token_ids == reference(PROMPTS[1], "gamma", 5)
    assert finished[alpha_id].token_ids == reference(PROMPTS[0], "alpha", 30)
    assert_drained(llm)


def test_abort_releases_the_adapter_slot(make_llm, reference):
    llm = make_llm(max_loras=1)
    engine = llm.engine
    alpha_id = engine.add_request(PROMPTS[0], greedy(50), adapter="alpha")
    engine.step()
    assert engine.adapters.slots.users == {engine.adapters.key("alpha"): 1}
    waiting_id = engine.add_request(PROMPTS[1], greedy(4), adapter="gamma")  # waits for the slot
    engine.step()
    assert engine.abort_request(alpha_id)
    assert engine.adapters.slots.users == {}
    finished = run_to_completion(llm)
    assert finished[waiting_id].token_ids == reference(PROMPTS[1], "gamma", 4)
    assert_drained(llm)


def test_preempted_adapter_requests_release_and_reacquire_their_slots(make_llm, reference):
    # 16 blocks of 16 tokens (and the padding block): the four alpha/beta sequences need 23 blocks by
    # their end; gamma waits for a slot
    llm = make_llm(max_loras=2, max_cpu_adapters=3, kv_cache_memory=17 * 65536)
    assert llm.engine.block_manager.num_blocks == 16
    steps = record_steps(llm)
    cases = [(LONG_PROMPT, "alpha"), (LONG_PROMPT, "beta"), (PROMPTS[0], "alpha"), (PROMPTS[1], "beta"),
             (LONG_PROMPT, "gamma")]
    ids = {llm.engine.add_request(p, greedy(60), adapter=a): (p, a) for p, a in cases}
    finished = run_to_completion(llm, max_steps=2000)
    assert llm.engine.scheduler.num_preemptions > 0, "the test meant to force preemption"
    for request_id, (prompt, adapter) in ids.items():
        assert finished[request_id].token_ids == reference(prompt, adapter, 60)
    assert_slot_limit(steps, max_loras=2)
    assert_drained(llm)


def test_more_waiting_adapters_than_host_memory_holds_load_each_once(make_llm, reference, demo_dir, tmp_path):
    """Loads for requests further back must not evict adapters fetched for requests ahead of them."""
    llm = make_llm(max_loras=1, max_cpu_adapters=2)
    names = []
    for i in range(6):
        source = demo_dir / "adapters" / ADAPTERS[i % len(ADAPTERS)]
        shutil.copytree(source, tmp_path / f"copy{i}")
        llm.engine.adapters.register(f"copy{i}", tmp_path / f"copy{i}", validate=False)
        names.append(f"copy{i}")
    ids = {llm.engine.add_request(PROMPTS[0], greedy(4), adapter=name): name for name in names}
    finished = run_to_completion(llm, max_steps=5000)
    for request_id, name in ids.items():
        assert finished[request_id].token_ids == reference(PROMPTS[0], ADAPTERS[names.index(name) % 3], 4)
    assert llm.engine.adapters.disk_loads == len(names)
    assert_drained(llm)
