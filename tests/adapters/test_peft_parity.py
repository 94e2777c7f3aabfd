"""Multi-adapter batches against transformers + peft.

The reference for every request is `PeftModel.from_pretrained(base, adapter).generate(...)` on that
request alone (or the plain transformers model for a base-model request), and log_softmax of the
logits of one full forward pass of the peft model over prompt + generated tokens. The adapters are
made by PEFT itself (see conftest.py): different ranks, target modules (including "all-linear" and a
regex), rank_pattern / alpha_pattern, rsLoRA and layers_to_transform. LoRA variants whose tensors look
like a plain LoRA's (aLoRA, layer_replication, ...) must be served as PEFT serves them, or refused.

The mixed-batch and eviction suites run on both kernel backends on the CPU: torch, and triton (the
Triton shrink/expand and paged attention kernels, in Triton's CPU interpreter here, so with fewer
tokens), and on both on CUDA in fp32 (marked `gpu`).
"""

from __future__ import annotations

import random
import re

import peft
import pytest
import torch

from loraplex import LLM
from loraplex.engine.sampling import SamplingParams

NUM_SPECIAL = 5  # the demo tokenizer's special tokens take ids 0..4; 4 is the pad token
MAX_NEW = 16
LOGPROB_ATOL = 1e-4
TOP_K = 5
VOCAB_SIZE = 2048
GREEDY = SamplingParams(max_tokens=MAX_NEW, temperature=0, ignore_eos=True, logprobs=TOP_K)
# (device, kernel backend, tokens per request): the Triton interpreter takes about a second a step
TARGETS = [
    pytest.param(("cpu", "torch", MAX_NEW), id="torch"),
    pytest.param(("cpu", "triton", 5), id="triton"),
    pytest.param(("cuda", "torch", MAX_NEW), id="cuda-torch", marks=pytest.mark.gpu),
    pytest.param(("cuda", "triton", MAX_NEW), id="cuda-triton", marks=pytest.mark.gpu),
]


@pytest.fixture(params=TARGETS)
def target(request) -> tuple[str, str, int]:
    return request.param


def greedy(max_new: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_new, temperature=0, ignore_eos=True, logprobs=TOP_K)


def random_prompt(rng: random.Random, length: int) -> list[int]:
    """Ordinary (non-special) token ids: never the pad token, so HF's padding cannot interfere."""
    return [rng.randrange(NUM_SPECIAL, VOCAB_SIZE) for _ in range(length)]


def make_requests(seed: int, plan: list[tuple[str | None, int]]) -> tuple[list[list[int]], list[str | None]]:
    """(adapter, prompt length) per request -> prompts, adapters. A length of 0 repeats the previous prompt,
    so one prompt also runs on several adapters (their KV must never be shared through the prefix cache)."""
    rng = random.Random(seed)
    prompts: list[list[int]] = []
    for _, length in plan:
        prompts.append(list(prompts[-1]) if length == 0 else random_prompt(rng, length))
    return prompts, [adapter for adapter, _ in plan]


def make_llm(demo_dir, adapters: dict, target: tuple[str, str, int] = ("cpu", "torch", MAX_NEW), **options) -> LLM:
    device, backend, _ = target
    options = {"max_lora_rank": 32, "max_model_len": 256, "kv_cache_memory": "64MiB", **options}
    llm = LLM(model=str(demo_dir), adapters={k: str(v) for k, v in adapters.items()}, dtype="float32",
              device=device, kernel_backend=backend, **options)
    assert llm.engine.model.backend.name == backend
    return llm


def first_difference(ours: list[int], expected: list[int]) -> int:
    return next((i for i, (a, b) in enumerate(zip(ours, expected, strict=False)) if a != b),
                min(len(ours), len(expected)))


def assert_tokens_match(reference, prompts, adapters, outputs, served_as=None, max_new: int = MAX_NEW) -> None:
    """`adapters`: the reference's adapter per request; `served_as`: the engine's name for it (default: the same)."""
    assert len(outputs) == len(prompts)
    served_as = adapters if served_as is None else served_as
    for index, (prompt, adapter, out) in enumerate(zip(prompts, adapters, outputs, strict=True)):
        where = f"request {index} (adapter {adapter}, prompt len {len(prompt)})"
        assert out.prompt_token_ids == prompt, f"{where}: outputs out of order"
        assert out.adapter == served_as[index], where
        assert out.finished and out.finish_reason == "length", f"{where}: {out.finish_reason}"
        expected = reference.greedy(adapter, prompt, max_new)
        if out.token_ids != expected:
            at = first_difference(out.token_ids, expected)
            top2 = reference.logits(adapter, prompt + expected[:at])[-1].topk(2).values
            pytest.fail(
                f"{where}: greedy tokens diverge from transformers+peft at output token {at} (HF top-2 logit "
                f"margin there {float(top2[0] - top2[1]):.4f})\nours: {out.token_ids}\nHF:   {expected}"
            )


def assert_logprobs_match(reference, prompts, adapters, outputs, max_new: int = MAX_NEW) -> None:
    for index, (prompt, adapter, out) in enumerate(zip(prompts, adapters, outputs, strict=True)):
        assert out.logprobs is not None and len(out.logprobs) == max_new, f"request {index}"
        # one full forward over prompt + generated: row len(prompt) - 1 + i predicts output token i
        ref = reference.logits(adapter, prompt + out.token_ids[:-1]).log_softmax(-1)[len(prompt) - 1:]
        for step, (token, ours) in enumerate(zip(out.token_ids, out.logprobs, strict=True)):
            where = f"request {index} (adapter {adapter}, prompt len {len(prompt)}), output token {step}"
            assert ours.token_id == token, where
            assert ours.logprob == pytest.approx(ref[step, token].item(), abs=LOGPROB_ATOL), where
            values, ids = ref[step].topk(TOP_K)
            assert [t for t, _ in ours.top] == ids.tolist(), f"{where}: top-{TOP_K} ids differ"
            got = torch.tensor([v for _, v in ours.top], dtype=torch.float32)
            torch.testing.assert_close(got, values, atol=LOGPROB_ATOL, rtol=0,
                                       msg=lambda m, where=where: f"{where}: {m}")


def test_fixture_adapters_are_what_peft_made(peft_adapters, peft_reference, peft_lora_layers):
    """The adapters are the ones asked for, as PEFT resolved and applied them."""
    assert sorted(peft_adapters) == sorted(["q1", "all32", "pattern", "rs", "layers13", "regex"])
    modules = {}
    for name in peft_adapters:
        layers = peft_lora_layers(peft_reference.model(name))
        modules[name] = {(int(key.split(".")[2]), key.rsplit(".", 1)[1]) for key in layers}
    all_linear = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert modules["q1"] == {(i, "q_proj") for i in range(4)}
    assert modules["all32"] == {(i, m) for i in range(4) for m in all_linear}
    assert {layer for layer, _ in modules["layers13"]} == {1, 3}
    assert modules["regex"] == {(i, m) for i in (0, 2) for m in ("q_proj", "v_proj", "gate_proj")}


def test_adapters_change_greedy_tokens(peft_adapters, peft_reference):
    """Sanity check of the fixtures: every adapter visibly changes the base model's greedy output, so the
    parity tests below can tell an adapter that was applied from one that was not (or applied wrongly)."""
    rng = random.Random(3)
    prompts = [random_prompt(rng, n) for n in (5, 30)]
    for name in peft_adapters:
        changed = sum(
            a != b
            for p in prompts
            for a, b in zip(peft_reference.greedy(name, p, MAX_NEW), peft_reference.greedy(None, p, MAX_NEW),
                            strict=True)
        )
        assert changed >= 4, f"adapter {name} barely changes the greedy tokens ({changed} of {2 * MAX_NEW})"


# Base-model requests mixed with six adapters; all32 and pattern run twice; one prompt runs on the base
# model and on three adapters (length 0 = the previous request's prompt).
MIXED_PLAN: list[tuple[str | None, int]] = [
    ("all32", 33),
    (None, 1),
    ("q1", 7),
    ("pattern", 50),
    ("rs", 3),
    ("layers13", 90),
    ("regex", 18),
    ("all32", 25),
    (None, 64),
    ("q1", 0),
    ("rs", 0),
    ("regex", 0),
    ("pattern", 12),
]


def test_mixed_adapter_batch_matches_peft(demo_dir, peft_adapters, peft_reference, target):
    max_new = target[2]
    prompts, adapters = make_requests(7, MIXED_PLAN)
    llm = make_llm(demo_dir, peft_adapters, target)
    outputs = llm.generate(prompts, greedy(max_new), adapter=adapters)
    assert_tokens_match(peft_reference, prompts, adapters, outputs, max_new=max_new)
    assert_logprobs_match(peft_reference, prompts, adapters, outputs, max_new)


def test_demo_adapters_in_one_batch_match_peft(demo_dir, peft_reference):
    """The demo's own adapters (written by hand, not by PEFT) read the same way PEFT reads them."""
    names = ("alpha", "beta", "gamma")
    plan = [("gamma", 20), ("alpha", 0), (None, 0), ("beta", 0), ("beta", 45), ("alpha", 2)]
    prompts, adapters = make_requests(8, plan)
    llm = make_llm(demo_dir, {n: demo_dir / "adapters" / n for n in names})
    outputs = llm.generate(prompts, GREEDY, adapter=adapters)
    assert_tokens_match(peft_reference, prompts, adapters, outputs)
    assert_logprobs_match(peft_reference, prompts, adapters, outputs)


def test_slot_and_host_eviction_mid_run_matches_peft(demo_dir, peft_adapters, peft_reference, target):
    """Six adapters through two slots and two host-cache entries: adapters are evicted from their slots
    and from host memory and read back from disk while the batch runs; every answer stays exact."""
    names = list(peft_adapters)
    assert len(names) == 6
    lengths = (4, 21, 1, 37, 9, 60, 15, 2, 28, 11, 44, 6)
    plan = [(names[i % 6] if i % 5 != 4 else None, n) for i, n in enumerate(lengths)]
    plan += [(names[0], 0), (names[5], 0)]  # an adapter reloaded after eviction, on the prompt before it
    prompts, adapters = make_requests(9, plan)
    max_new = target[2]
    llm = make_llm(demo_dir, peft_adapters, target, max_loras=2, max_cpu_adapters=2)
    manager = llm.engine.adapters
    outputs = llm.generate(prompts, greedy(max_new), adapter=adapters)
    assert manager.slots.evictions > 0
    assert manager.slots.loads > 2
    assert manager.host.evictions > 0
    assert manager.disk_loads > 0, "no adapter was read back from disk"
    assert_tokens_match(peft_reference, prompts, adapters, outputs, max_new=max_new)
    assert_logprobs_match(peft_reference, prompts, adapters, outputs, max_new)

    # a second run over the same engine: slots and host cache now hold whatever the first run left
    loads = manager.slots.loads
    again = llm.generate(prompts[::-1], greedy(max_new), adapter=adapters[::-1])
    assert manager.slots.loads > loads
    assert_tokens_match(peft_reference, prompts[::-1], adapters[::-1], again, max_new=max_new)


INVOCATION = [300, 301, 302]

# LoRA variants whose tensors are (or look like) plain lora_A / lora_B, but which PEFT runs differently:
# name -> (extra LoraConfig arguments, pattern a refusal must name). Built lazily: the sub-configs are
# peft classes.
LORA_VARIANTS = {
    # Activated LoRA: only the tokens from the invocation sequence on see the adapter
    "alora": (lambda: dict(alora_invocation_tokens=INVOCATION), r"alora|activated"),
    # the adapted model is base layers [0, 1, 1, 2]: a different base stack, also of four layers
    "layer_replication": (lambda: dict(layer_replication=[[0, 2], [1, 3]]), r"layer_replication"),
    # QA-LoRA: pools the input in groups before lora_A (on quantized layers)
    "qalora": (lambda: dict(use_qalora=True, qalora_group_size=16), r"qalora|qa-lora"),
    # block-diagonal A (o_proj) / B (q_proj), stored as blocks
    "bdlora": (lambda: dict(use_bdlora=peft.tuners.lora.config.BdLoraConfig(
        target_modules_bd_a=["o_proj"], target_modules_bd_b=["q_proj", "k_proj", "v_proj"], nblocks=2)),
        r"bdlora|bd-lora|block.diagonal"),
    # KaSA: truncates the base weights' SVD and puts a learned diagonal between B and A
    "kasa": (lambda: dict(kasa_config=peft.tuners.lora.config.KasaConfig()), r"kasa"),
}


@pytest.mark.parametrize("variant", list(LORA_VARIANTS))
def test_lora_variants_are_refused_or_match_peft(demo_dir, tmp_path, peft_reference, make_peft_adapter, variant):
    """A LoRA variant that the engine accepts must be served as PEFT serves it; otherwise the engine must refuse
    it with a ValueError naming the variant (not a message blaming the base model). Serving it as a plain LoRA
    silently gives other answers than PEFT."""
    extra, names = LORA_VARIANTS[variant]
    plain_kwargs = dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    name = f"variant-{variant}"
    path = make_peft_adapter(tmp_path / variant, {**plain_kwargs, **extra()}, seed=200, rel=0.15)
    peft_reference.add(name, path)
    rng = random.Random(10)
    prompt = random_prompt(rng, 24) + INVOCATION + random_prompt(rng, 3)
    llm = make_llm(demo_dir, {})
    try:
        llm.engine.add_adapter(name, path)
    except ValueError as e:
        assert re.search(names, str(e), re.IGNORECASE), f"{variant} refused, but the message does not name it: {e}"
        return
    [out] = llm.generate([prompt], GREEDY, adapter=name)
    expected = peft_reference.greedy(name, prompt, MAX_NEW)
    if out.token_ids != expected:
        # the same weights saved as a plain LoRA: what serving the variant as a plain LoRA gives
        plain = make_peft_adapter(tmp_path / "plain", plain_kwargs, seed=200, rel=0.15)
        peft_reference.add(f"{name}-plain", plain)
        as_plain = peft_reference.greedy(f"{name}-plain", prompt, MAX_NEW) == out.token_ids
        pytest.fail(
            f"{variant} adapter accepted, but served unlike PEFT (diverges at output token "
            f"{first_difference(out.token_ids, expected)}; {'identical to' if as_plain else 'unlike'} PEFT "
            f"serving the same weights as a plain LoRA)\nours: {out.token_ids}\nHF:   {expected}"
        )


def test_reregistered_name_serves_the_new_weights(demo_dir, peft_adapters, peft_reference):
    """A name removed and registered again on another adapter directory: neither its old slot contents nor
    the prefix-cache blocks computed under the old weights may be reused."""
    rng = random.Random(12)
    prompts = [random_prompt(rng, 40), random_prompt(rng, 5)]
    llm = make_llm(demo_dir, {"x": peft_adapters["q1"]})
    first = llm.generate(prompts, GREEDY, adapter="x")
    assert_tokens_match(peft_reference, prompts, ["q1", "q1"], first, served_as=["x", "x"])

    llm.engine.remove_adapter("x")
    llm.engine.add_adapter("x", peft_adapters["regex"])
    second = llm.generate(prompts, GREEDY, adapter="x")
    assert_tokens_match(peft_reference, prompts, ["regex", "regex"], second, served_as=["x", "x"])
    assert_logprobs_match(peft_reference, prompts, ["regex", "regex"], second)

    # registering the name again without removing it first: refused, or the new weights are served
    try:
        llm.engine.add_adapter("x", peft_adapters["rs"])
    except ValueError as e:
        assert "x" in str(e), str(e)
        expected = "regex"
    else:
        expected = "rs"
    third = llm.generate(prompts, GREEDY, adapter="x")
    assert_tokens_match(peft_reference, prompts, [expected, expected], third, served_as=["x", "x"])
