"""One adapter must never change another request's output, even one whose numbers blow up.

A poisoned adapter is registered past validation (`preloaded`: validation refuses such files, see
tests/adapters/test_formats.py) so that the engine's own isolation is what is tested: its requests
end with a typed error (`non_finite_output`), and every clean request batched with them, or run
later on the KV blocks they used, gives exactly what it gives alone. Both defences are needed, and
each alone fails this test when removed: fresh blocks are zeroed before a step reads them (their
positions past a sequence's length enter attention with weight 0, and 0 x NaN is NaN), and block
tables are padded with a block no sequence is ever given.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from loraplex import LLM
from loraplex.adapters_store.formats import LoRAModule, load_peft_lora
from loraplex.engine.sampling import SamplingParams

ADAPTERS = ("alpha", "beta")
VOCAB = 2048
NUM_SPECIAL = 5
MAX_NEW = 6


def greedy(max_tokens: int = MAX_NEW) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, logprobs=2)


def poisoned(llm: LLM, demo_dir, how: str):
    """alpha's weights with every B matrix NaN, or scaled by 1e30 (finite, but it overflows)."""
    clean = load_peft_lora(demo_dir / "adapters" / "alpha", "poison", llm.engine.model.config, 16)
    factor = float("nan") if how == "nan" else 1e30
    modules = {key: LoRAModule(m.a, m.b * factor, m.scale) for key, m in clean.modules.items()}
    return dataclasses.replace(clean, modules=modules)


def make_llm(demo_dir, backend: str, how: str) -> LLM:
    # A small KV cache (12 blocks and the padding block), so blocks that poisoned requests wrote are
    # soon handed to clean ones (and some requests are preempted), and a small token budget, so
    # prompts are chunked: later chunks read their earlier blocks through padded block tables.
    llm = LLM(model=str(demo_dir), dtype="float32", device="cpu", kernel_backend=backend, max_model_len=128,
              kv_cache_memory=13 * 65536, block_size=16, max_num_batched_tokens=24, max_loras=3, max_cpu_adapters=4,
              adapters={name: demo_dir / "adapters" / name for name in ADAPTERS})
    llm.engine.add_adapter("poison", demo_dir / "adapters" / "alpha", preloaded=poisoned(llm, demo_dir, how))
    return llm


def random_prompt(rng: random.Random) -> list[int]:
    return [rng.randrange(NUM_SPECIAL, VOCAB) for _ in range(rng.choice([1, 5, 17, 40, 70]))]


@pytest.fixture(scope="module")
def alone(demo_dir):
    """(prompt, adapter) -> the greedy tokens and logprobs of that request run alone on a clean engine."""
    llm = LLM(model=str(demo_dir), dtype="float32", device="cpu", max_model_len=128, kv_cache_memory="16MiB",
              adapters={name: demo_dir / "adapters" / name for name in ADAPTERS})
    memo: dict = {}

    def run(prompt: list[int], adapter: str | None):
        key = (tuple(prompt), adapter)
        if key not in memo:
            [out] = llm.generate([prompt], greedy(), adapter=adapter)
            memo[key] = (list(out.token_ids), [lp.logprob for lp in out.logprobs])
        return memo[key]

    return run


@pytest.mark.parametrize(("backend", "how", "rounds"), [
    ("torch", "nan", 4), ("torch", "1e30", 4), ("triton", "nan", 1),
])
def test_a_poisoned_adapter_changes_no_other_request(demo_dir, alone, backend, how, rounds):
    llm = make_llm(demo_dir, backend, how)
    rng = random.Random(f"{backend}-{how}")
    for _ in range(rounds):  # one engine: later rounds run on blocks the poisoned requests wrote
        plan = [rng.choice(["poison", "poison", None, *ADAPTERS]) for _ in range(rng.randint(3, 7))]
        plan[rng.randrange(len(plan))] = "poison"
        prompts = [random_prompt(rng) for _ in plan]
        for prompt, adapter, out in zip(prompts, plan, llm.generate(prompts, greedy(), adapter=plan), strict=True):
            if adapter == "poison":
                # NaN weights always end in NaN logits; 1e30 ones may stay finite (RMSNorm rescales
                # huge hidden states) and then simply give nonsense, to that request alone.
                assert out.finish_reason == "error" if how == "nan" else out.finish_reason in ("error", "length")
                if out.finish_reason == "error":
                    assert out.error.code == "non_finite_output" and out.error.field == "model", out.error
                assert all(lp.logprob == lp.logprob for lp in out.logprobs)  # no NaN handed out
                continue
            tokens, logprobs = alone(prompt, adapter)
            assert out.finish_reason == "length" and list(out.token_ids) == tokens, (adapter, len(prompt))
            torch.testing.assert_close(torch.tensor([lp.logprob for lp in out.logprobs]), torch.tensor(logprobs),
                                       atol=1e-4, rtol=0)
    engine = llm.engine
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_padding_block_stays_zero_and_is_never_given_out(demo_dir):
    llm = make_llm(demo_dir, "torch", "nan")
    manager = llm.engine.block_manager
    rng = random.Random(5)
    llm.generate([random_prompt(rng) for _ in range(6)], greedy(), adapter=["poison", None] * 3)
    padding = llm.engine.runner.kv_cache[:, :, manager.padding_block]
    assert manager.padding_block == manager.num_blocks and torch.count_nonzero(padding) == 0
