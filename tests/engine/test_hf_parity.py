"""Parity with Hugging Face `transformers`: logits, greedy tokens and text through every engine path.

transformers is the reference. Every expectation below comes from running the HF model (full forward
passes, or `model.generate` on one prompt alone) on the same checkpoint the engine loads from disk.

The logprob, batch, preemption, chunked-prefill and prefix-cache suites run on every `TARGETS` entry:
both kernel backends on the CPU (triton: the Triton kernels in Triton's CPU interpreter, about a second
a step, so its runs are shorter, through the same paths), and both on CUDA in fp32 (marked `gpu`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch
import transformers

from loraplex import LLM
from loraplex.engine.sampling import SamplingParams

# The demo tokenizer's special tokens take ids 0..4 (<|bos|> <|eos|> <|im_start|> <|im_end|> <|pad|>).
NUM_SPECIAL = 5
PAD_ID = 4

MAX_NEW = 32
PROMPT_LENGTHS = (1, 150, 3, 40, 17, 77, 111)  # very different lengths, long ones not first
LOGPROB_ATOL = 1e-4
GREEDY = SamplingParams(max_tokens=MAX_NEW, temperature=0, ignore_eos=True)


@dataclass(frozen=True)
class Target:
    """Where the engine runs, and how much of each suite it runs there."""

    device: str
    backend: str  # kernel backend
    lengths: tuple[int, ...] = PROMPT_LENGTHS  # prompt lengths of the batch
    max_new: int = MAX_NEW  # greedy tokens per prompt
    logprob_steps: int = 20

    @property
    def greedy(self) -> SamplingParams:
        return SamplingParams(max_tokens=self.max_new, temperature=0, ignore_eos=True)


TARGETS = [
    pytest.param(Target("cpu", "torch"), id="torch"),
    pytest.param(Target("cpu", "triton", (1, 61, 3, 17, 30), 6, 4), id="triton"),
    pytest.param(Target("cuda", "torch"), id="cuda-torch", marks=pytest.mark.gpu),
    pytest.param(Target("cuda", "triton"), id="cuda-triton", marks=pytest.mark.gpu),
]


@pytest.fixture(params=TARGETS)
def target(request) -> Target:
    return request.param


def make_prompts(seed: int, lengths, vocab_size: int) -> list[list[int]]:
    """Random ordinary (non-special) token ids: never the pad token, so HF's padding cannot interfere."""
    rng = random.Random(seed)
    return [[rng.randrange(NUM_SPECIAL, vocab_size) for _ in range(n)] for n in lengths]


def make_llm(model, target: Target = Target("cpu", "torch"), **options) -> LLM:
    llm = LLM(model=str(model.path), dtype="float32", device=target.device, kernel_backend=target.backend, **options)
    assert llm.engine.model.backend.name == target.backend
    return llm


def assert_greedy_matches_hf(model, prompts: list[list[int]], outputs, max_new: int = MAX_NEW):
    assert len(outputs) == len(prompts)
    for index, (prompt, out) in enumerate(zip(prompts, outputs, strict=True)):
        assert out.prompt_token_ids == prompt, f"prompt {index}: outputs out of order"
        assert out.finished and out.finish_reason == "length", f"prompt {index}: {out.finish_reason}"
        expected = model.greedy(prompt, max_new)
        if out.token_ids != expected:
            at = next((i for i, (a, b) in enumerate(zip(out.token_ids, expected, strict=False)) if a != b),
                      min(len(out.token_ids), len(expected)))
            top2 = model.logits(prompt + expected[:at])[-1].topk(2).values
            pytest.fail(
                f"{model.name} prompt {index} (len {len(prompt)}): greedy tokens diverge from HF at output "
                f"token {at} (HF top-2 logit margin there {float(top2[0] - top2[1]):.4f})\n"
                f"ours: {out.token_ids}\nHF:   {expected}"
            )


# -- a. logits --------------------------------------------------------------------------------------


def test_logprobs_match_hf_prefill_and_decode(parity_model, target):
    """Top-5 log-probabilities of the prefill step and of the decode steps after it, three prompts batched."""
    steps = target.logprob_steps
    prompts = make_prompts(11, (70, 1, 130), parity_model.vocab_size)
    llm = make_llm(parity_model, target)
    params = SamplingParams(max_tokens=steps, temperature=0, logprobs=5, ignore_eos=True)
    outputs = llm.generate(prompts, params)
    for prompt, out in zip(prompts, outputs, strict=True):
        assert len(out.token_ids) == steps and out.logprobs is not None and len(out.logprobs) == steps
        # One full forward over prompt + generated: row len(prompt)-1+i predicts output token i.
        ref = parity_model.logits(prompt + out.token_ids[:-1]).log_softmax(-1)[len(prompt) - 1 :]
        for step, (token, ours) in enumerate(zip(out.token_ids, out.logprobs, strict=True)):
            where = f"{parity_model.name} prompt len {len(prompt)}, output token {step}"
            values, ids = ref[step].topk(5)
            assert ours.token_id == token, where
            assert token == ids[0].item(), f"{where}: greedy token is not HF's argmax"
            assert [t for t, _ in ours.top] == ids.tolist(), f"{where}: top-5 ids differ"
            ours_values = torch.tensor([v for _, v in ours.top], dtype=torch.float32)
            torch.testing.assert_close(ours_values, values, atol=LOGPROB_ATOL, rtol=0, msg=where)
            assert abs(ours.logprob - ref[step, token].item()) <= LOGPROB_ATOL, where


def test_llama3_rope_scaling_changes_hf_logits(load_parity_model):
    """Guards the llama3 parity test's power: on these prompts the rope scaling really moves the logits,
    so an engine that ignored it would fail test_logprobs_match_hf_prefill_and_decode[llama3]."""
    model = load_parity_model("llama3")
    config = transformers.AutoConfig.from_pretrained(model.path)
    theta = config.rope_parameters["rope_theta"]
    config.rope_parameters = {"rope_type": "default", "rope_theta": theta}
    unscaled = transformers.AutoModelForCausalLM.from_pretrained(
        model.path, config=config, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    prompt = make_prompts(11, (130,), model.vocab_size)[0]
    ids = torch.tensor([prompt])
    with torch.no_grad():
        plain = unscaled(input_ids=ids).logits[0, -1].log_softmax(-1)
    scaled = model.logits(prompt)[-1].log_softmax(-1)
    assert (plain - scaled).abs().max() > 100 * LOGPROB_ATOL


def _hf_variant(model, edit) -> transformers.PreTrainedModel:
    config = transformers.AutoConfig.from_pretrained(model.path)
    edit(config)
    return transformers.AutoModelForCausalLM.from_pretrained(
        model.path, config=config, dtype=torch.float32, attn_implementation="eager").eval()


@torch.no_grad()
def _last_logprobs(hf_model, prompt: list[int]) -> torch.Tensor:
    return hf_model(input_ids=torch.tensor([prompt]), use_cache=False).logits[0, -1].float().log_softmax(-1)


@pytest.mark.parametrize("feature", ["attn_logit_softcapping", "final_logit_softcapping", "sliding_window",
                                     "query_pre_attn_scalar"])
def test_gemma2_features_change_hf_logits(load_parity_model, feature):
    """Guards the gemma2 parity tests' power: on a 130-token prompt each Gemma 2 feature of the tiny config
    (soft-capping of scores and of logits, the 24-token window, the attention scale) moves HF's log-probs,
    so an engine that ignored one would fail test_logprobs_match_hf_prefill_and_decode[gemma2]."""
    model = load_parity_model("gemma2")
    off = {"attn_logit_softcapping": None, "final_logit_softcapping": None, "sliding_window": 4096,
           "query_pre_attn_scalar": 16}[feature]  # 16 = head_dim: the scale Llama would use
    variant = _hf_variant(model, lambda config: setattr(config, feature, off))
    prompt = make_prompts(11, (130,), model.vocab_size)[0]
    moved = (_last_logprobs(variant, prompt) - model.logits(prompt)[-1].log_softmax(-1)).abs().max()
    assert moved > 100 * LOGPROB_ATOL


def test_gemma3_local_rope_changes_hf_logits(load_parity_model):
    """Gemma 3's sliding layers turn with their own RoPE base (100 here, 1000 and linear x4 globally): HF with
    one RoPE for all layers gives other log-probs, so the gemma3 parity tests check the local RoPE."""
    model = load_parity_model("gemma3")

    def one_rope(config):
        config.rope_parameters["sliding_attention"] = dict(config.rope_parameters["full_attention"])

    prompt = make_prompts(11, (130,), model.vocab_size)[0]
    moved = (_last_logprobs(_hf_variant(model, one_rope), prompt) - model.logits(prompt)[-1].log_softmax(-1))
    assert moved.abs().max() > 100 * LOGPROB_ATOL


def _assert_logprobs_match(model, llm, prompts, steps: int, reference=None):
    """Top-5 log-probs of `steps` greedy tokens against `reference` (HF, full forwards; the model's own
    reference by default)."""
    reference = reference or model.hf
    params = SamplingParams(max_tokens=steps, temperature=0, logprobs=5, ignore_eos=True)
    for prompt, out in zip(prompts, llm.generate(prompts, params), strict=True):
        assert len(out.logprobs) == steps
        with torch.no_grad():
            ids = torch.tensor([prompt + out.token_ids[:-1]])
            ref = reference(input_ids=ids, use_cache=False).logits[0].float().log_softmax(-1)[len(prompt) - 1 :]
        for step, ours in enumerate(out.logprobs):
            where = f"{model.name} prompt len {len(prompt)}, output token {step}"
            values, ids = ref[step].topk(5)
            assert [t for t, _ in ours.top] == ids.tolist(), where
            got = torch.tensor([v for _, v in ours.top])
            torch.testing.assert_close(got, values, atol=LOGPROB_ATOL, rtol=0, msg=where)


def test_phi3_longrope_matches_hf_inside_and_beyond_the_original_context(load_parity_model, target):
    """LongRoPE against an unedited transformers Phi-3 (original context 64, max 512), which picks the short
    factors for inputs up to 64 tokens and the long ones beyond. An engine limited to the original context
    (--max-model-len 64) uses the short factors and matches HF there; one serving more uses the long factors,
    and matches HF on inputs beyond 64 tokens. The factors really differ (guard)."""
    model = load_parity_model("phi3")
    pristine = _hf_variant(model, lambda config: None)
    steps = target.logprob_steps
    short_prompts = make_prompts(41, (5, 30, 64 - steps), model.vocab_size)
    long_prompts = make_prompts(42, (100, 65, 150), model.vocab_size)
    short_llm = make_llm(model, target, max_model_len=64)
    _assert_logprobs_match(model, short_llm, short_prompts, steps, reference=pristine)
    long_llm = make_llm(model, target)
    _assert_logprobs_match(model, long_llm, long_prompts, steps, reference=pristine)
    # Guard: on a short input the long factors (the engine's reference at max_model_len 512) differ from HF's.
    prompt = short_prompts[1]
    assert (_last_logprobs(pristine, prompt) - model.logits(prompt)[-1].log_softmax(-1)).abs().max() > 1e-2


# -- b. greedy, batched ------------------------------------------------------------------------------


def test_greedy_batch_matches_hf(parity_model, target):
    prompts = make_prompts(1, target.lengths, parity_model.vocab_size)
    outputs = make_llm(parity_model, target).generate(prompts, target.greedy)
    assert_greedy_matches_hf(parity_model, prompts, outputs, target.max_new)


# -- c. preemption ----------------------------------------------------------------------------------


def test_greedy_with_preemption_matches_hf(parity_model, target):
    sizes = target
    block_size = 8
    max_model_len = -(-(max(sizes.lengths) + sizes.max_new) // block_size) * block_size
    blocks_per_seq = max_model_len // block_size
    # room for ~1.5 longest sequences, while the batch needs far more: recompute preemption must kick in
    kv_bytes = (blocks_per_seq * 3 // 2 + 1) * parity_model.kv_block_bytes(block_size)  # + the padding block
    prompts = make_prompts(1, sizes.lengths, parity_model.vocab_size)
    total_blocks = sum(-(-(len(p) + sizes.max_new) // block_size) for p in prompts)
    assert total_blocks > 2 * blocks_per_seq
    llm = make_llm(parity_model, target, block_size=block_size, max_model_len=max_model_len,
                   kv_cache_memory=kv_bytes)
    outputs = llm.generate(prompts, sizes.greedy)
    assert llm.engine.scheduler.num_preemptions > 0
    assert_greedy_matches_hf(parity_model, prompts, outputs, sizes.max_new)


# -- d. chunked prefill -----------------------------------------------------------------------------


def test_greedy_with_chunked_prefill_matches_hf(parity_model, target):
    sizes = target
    budget = 16
    prompts = make_prompts(1, sizes.lengths, parity_model.vocab_size)
    llm = make_llm(parity_model, target, max_num_batched_tokens=budget)
    steps = 0
    step = llm.engine.step

    def counting_step(*args, **kwargs):
        nonlocal steps
        steps += 1
        return step(*args, **kwargs)

    llm.engine.step = counting_step
    outputs = llm.generate(prompts, sizes.greedy)
    # every prompt token and every fed-back output token but the last goes through some step
    assert steps >= sum(len(p) + sizes.max_new - 1 for p in prompts) / budget
    assert_greedy_matches_hf(parity_model, prompts, outputs, sizes.max_new)


# -- e. prefix caching ------------------------------------------------------------------------------


@pytest.mark.parametrize("model_name", ["demo", "qwen2", "gemma2"])
def test_shared_prefix_and_prefix_cache_match_hf(load_parity_model, model_name, target):
    model = load_parity_model(model_name)
    greedy, max_new = target.greedy, target.max_new
    block_size = 8
    prefix, other, *suffixes = make_prompts(5, (40, 30, 1, 3, 21, 9), model.vocab_size)
    first_changed = [other[0]] + prefix[1:]  # blocks 1.. hold the same tokens, after a different block 0
    last_of_block_changed = prefix[:31] + [other[1]] + prefix[32:]
    prompts = [
        prefix,  # exactly 5 full blocks: on a repeat, the whole prompt is in the cache
        prefix + suffixes[0],
        prefix + suffixes[1],
        prefix + suffixes[2],
        prefix[:16] + other,  # shares 2 blocks, then diverges
        prefix[:20] + suffixes[3],  # diverges in the middle of block 3
        first_changed + suffixes[0],
        last_of_block_changed + suffixes[1],
    ]
    llm = make_llm(model, target, block_size=block_size)
    first = llm.generate(prompts, greedy)
    assert_greedy_matches_hf(model, prompts, first, max_new)

    # Again, plus a prompt that runs on into the first call's output: KV written by decode steps.
    again = prompts + [prompts[2] + first[2].token_ids]
    second = llm.generate(again, greedy)
    cached = [out.num_cached_tokens for out in second]
    assert any(n > 0 for n in cached), cached
    assert all(0 <= n <= len(p) for n, p in zip(cached, again, strict=True)), cached
    assert_greedy_matches_hf(model, again, second, max_new)


# -- f. text prompts --------------------------------------------------------------------------------

TEXT_PROMPTS = [
    "def fib(n: int) -> int:\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "Grüße aus Köln — naïve café, 東京タワー, emoji 🦙🚀👩‍💻 and math ∑ x² ≤ ∞ e\u0301",
    '\tindent\r\n  trailing   \n{"json": [1, 2.5e-3, null], "s": "\\u00e9"} // комментарий',
    # On the demo model these two continue with a special token inside the output (skip_special_tokens
    # must drop it) and with an unfinished UTF-8 sequence at the very end (rendered as U+FFFD).
    '        raise ValueError("mean of empty list")',
    "Here is a small example of a function with a test:",
]


def test_text_prompts_tokenize_and_detokenize_like_hf(load_parity_model):
    demo_parity = load_parity_model("demo")
    tokenizer = transformers.AutoTokenizer.from_pretrained(demo_parity.path)
    llm = make_llm(demo_parity)
    outputs = llm.generate(TEXT_PROMPTS, GREEDY)
    for text, out in zip(TEXT_PROMPTS, outputs, strict=True):
        expected_ids = tokenizer(text).input_ids
        assert PAD_ID not in expected_ids
        assert out.prompt == text
        assert out.prompt_token_ids == expected_ids
        assert out.text == tokenizer.decode(out.token_ids, skip_special_tokens=True)
    assert_greedy_matches_hf(demo_parity, [o.prompt_token_ids for o in outputs], outputs)


# -- sliding-window attention (Mistral) -------------------------------------------------------------


def test_mistral_sliding_window_matches_hf(load_parity_model, target):
    """A checkpoint whose `sliding_window` (32) is shorter than its max_position_embeddings: HF attends
    to the last 32 positions only, and so must the engine, on prompts inside the window, filling it and far
    past it, in one batch (decodes beside prompts, on both backends: the torch path's window masks and the
    Triton paged kernel's window)."""
    swa = load_parity_model("mistral_sliding")
    full = load_parity_model("mistral")  # same weights, no window
    window = swa.hf.config.sliding_window
    assert window == 32
    lengths = (20, 31, 9, 100, 150, 30)
    prompts = make_prompts(21, lengths, swa.vocab_size)
    # The window changes HF's logits once the context exceeds it (and only then).
    torch.testing.assert_close(swa.logits(prompts[1]), full.logits(prompts[1]), atol=1e-5, rtol=0)
    assert (swa.logits(prompts[4])[-1] - full.logits(prompts[4])[-1]).abs().max() > 1e-2

    _assert_logprobs_match(swa, make_llm(swa, target), prompts, target.logprob_steps)