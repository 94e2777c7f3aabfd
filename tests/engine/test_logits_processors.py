"""min_tokens, logit_bias and the presence, frequency and repetition penalties: on exact logits against
transformers' logits processors and OpenAI's documented formula (written here, not read from our code),
and in the engine: greedy parity with transformers' generate(repetition_penalty=...), logit_bias that
forces a token, min_tokens that holds EOS back, and batches where only some sequences are processed."""

from __future__ import annotations

import pytest
import torch
import transformers

from loraplex import LLM, SamplingParams
from loraplex.engine.logits_processors import process_logits
from loraplex.engine.sequence import Sequence
from loraplex.errors import LoraplexError

VOCAB = 50
EOS = 1


def make_seq(prompt: list[int], output: list[int], params: SamplingParams, eos=(EOS,)) -> Sequence:
    seq = Sequence("r", prompt, params, params.stop_token_set(eos), None)
    seq.token_ids += output
    return seq


def random_logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def openai_penalties(logits: torch.Tensor, output: list[int], presence: float, frequency: float) -> torch.Tensor:
    """OpenAI's documented formula, token by token:
    mu[j] -> mu[j] - c[j] * alpha_frequency - float(c[j] > 0) * alpha_presence."""
    out = logits.clone()
    for token in set(output):
        count = output.count(token)
        out[token] -= count * frequency + (1.0 if count > 0 else 0.0) * presence
    return out


def test_presence_and_frequency_match_openais_formula():
    prompt, output = [3, 4, 5, 9], [7, 7, 8, 3, 7, 2]
    logits = random_logits(1)
    params = SamplingParams(max_tokens=20, presence_penalty=0.7, frequency_penalty=-1.3)
    ours = process_logits(logits, [make_seq(prompt, output, params)])
    torch.testing.assert_close(ours[0], openai_penalties(logits[0], output, 0.7, -1.3))
    assert ours is not logits and torch.equal(logits, random_logits(1)), "the model's own logits are kept"


@pytest.mark.parametrize("penalty", [0.5, 1.8, 5.0])
def test_repetition_penalty_matches_transformers(penalty):
    prompt, output = [3, 4, 5, 9], [7, 7, 8, 3, 2]
    logits = random_logits(1, seed=3)
    params = SamplingParams(max_tokens=20, repetition_penalty=penalty)
    ours = process_logits(logits, [make_seq(prompt, output, params)])
    ref = transformers.RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([prompt + output]), logits.clone())
    torch.testing.assert_close(ours, ref)


def test_logit_bias_matches_transformers_sequence_bias():
    logits = random_logits(1, seed=4)
    bias = {5: 100.0, 6: -100.0, 17: 2.5}
    params = SamplingParams(max_tokens=20, logit_bias=bias)
    ours = process_logits(logits, [make_seq([3, 4], [], params)])
    ref = transformers.SequenceBiasLogitsProcessor([[[t], b] for t, b in bias.items()])(
        torch.tensor([[3, 4]]), logits.clone())
    torch.testing.assert_close(ours, ref)


def test_min_tokens_matches_transformers_min_new_tokens():
    prompt = [3, 4, 5]
    stops = [EOS, 11]
    params = SamplingParams(max_tokens=20, min_tokens=3, stop_token_ids=[11])
    for output in ([], [7], [7, 8], [7, 8, 9]):
        logits = random_logits(1, seed=len(output))
        ours = process_logits(logits, [make_seq(prompt, output, params)])
        ref = transformers.MinNewTokensLengthLogitsProcessor(len(prompt), 3, stops)(
            torch.tensor([prompt + output]), logits.clone())
        torch.testing.assert_close(ours, ref)
    # ignore_eos: EOS is not a stop, so it is not held back (vLLM)
    params = SamplingParams(max_tokens=20, min_tokens=3, ignore_eos=True, stop_token_ids=[11])
    out = process_logits(random_logits(1), [make_seq(prompt, [], params)])
    assert torch.isfinite(out[0, EOS]) and out[0, 11] == float("-inf")


def test_all_together_in_a_batch_touch_only_their_rows():
    """Row by row, a mixed batch equals each sequence processed alone; unprocessed rows are untouched."""
    plain = SamplingParams(max_tokens=20)
    seqs = [
        make_seq([3, 4], [5, 5], plain),
        make_seq([3, 4], [5, 5, 6], SamplingParams(max_tokens=20, presence_penalty=1.0, frequency_penalty=0.5,
                                                    repetition_penalty=1.3, logit_bias={9: 3.0}, min_tokens=5)),
        make_seq([8], [8, 8], plain),
        make_seq([2], [12], SamplingParams(max_tokens=20, repetition_penalty=0.7)),
    ]
    logits = random_logits(4, seed=9)
    batch = process_logits(logits, seqs)
    for row, seq in enumerate(seqs):
        fresh = make_seq(seq.prompt_token_ids, seq.output_token_ids, seq.params)
        torch.testing.assert_close(batch[row], process_logits(logits[row:row + 1], [fresh])[0])
    assert torch.equal(batch[0], logits[0]) and torch.equal(batch[2], logits[2])
    assert process_logits(logits, [seqs[0], seqs[2], seqs[0], seqs[2]]) is logits  # nothing asked: no copy


def test_counts_are_kept_incrementally_and_rebuilt_after_preemption():
    params = SamplingParams(max_tokens=20, frequency_penalty=1.0)
    seq = make_seq([3], [], params)
    logits = random_logits(1)
    for token in [4, 4, 5, 4]:
        process_logits(logits, [seq])
        seq.token_ids.append(token)
    out = process_logits(logits, [seq])
    assert seq.penalty_state.num_counted == 4
    torch.testing.assert_close(out[0], openai_penalties(logits[0], [4, 4, 5, 4], 0.0, 1.0))
    seq.penalty_state = None  # what preemption does
    torch.testing.assert_close(process_logits(logits, [seq])[0], out[0])


@pytest.mark.parametrize("field, value", [
    ("presence_penalty", 2.5), ("frequency_penalty", -2.1), ("repetition_penalty", 0.0),
    ("repetition_penalty", float("nan")), ("min_tokens", -1), ("min_tokens", 21),
    ("logit_bias", {5: 101}), ("logit_bias", {-1: 1.0}), ("logit_bias", {"5": 1.0}),
])
def test_invalid_processing_params_name_the_field(field, value):
    with pytest.raises(LoraplexError, match=rf"^{field}: "):
        SamplingParams(max_tokens=20, **{field: value})


# -- in the engine, on the demo model ----------------------------------------------------------


@pytest.fixture(scope="module")
def hf_demo(demo_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(demo_dir, dtype=torch.float32)
    model.generation_config.eos_token_id = None
    return model.eval()


@pytest.mark.parametrize("penalty", [1.5, 3.0])
def test_greedy_repetition_penalty_matches_transformers_generate(demo_llm, hf_demo, penalty):
    prompt = demo_llm.engine.tokenizer.encode("The lighthouse keeper said")
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, repetition_penalty=penalty)
    ours = demo_llm.generate([prompt], params)[0].token_ids
    ids = torch.tensor([prompt])
    with torch.no_grad():
        ref = hf_demo.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=24,
                               repetition_penalty=penalty, eos_token_id=None, pad_token_id=4)
    assert ours == ref[0, len(prompt):].tolist()
    plain = demo_llm.generate([prompt], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0]
    assert plain.token_ids != ours, "the penalty must change this output, or the test proves nothing"


def test_logit_bias_forces_a_token(demo_llm):
    out = demo_llm.generate("Once upon a time", SamplingParams(max_tokens=6, temperature=0, ignore_eos=True,
                                                                logit_bias={42: 100}))[0]
    assert out.token_ids == [42] * 6
    sampled = demo_llm.generate("Once upon a time", SamplingParams(max_tokens=6, temperature=1.0, seed=3,
                                                                    ignore_eos=True, logit_bias={42: 100}))[0]
    assert sampled.token_ids == [42] * 6


def test_logit_bias_outside_the_vocabulary_is_refused(demo_llm):
    vocab = demo_llm.engine.model.config.vocab_size
    with pytest.raises(LoraplexError, match="^logit_bias: token id"):
        demo_llm.engine.add_request("Hi", SamplingParams(logit_bias={vocab: 1.0}))


def test_min_tokens_holds_eos_back(demo_llm):
    # EOS made the greedy choice with a bias: without min_tokens the output ends at once
    params = dict(max_tokens=10, temperature=0, logit_bias={EOS: 100})
    early = demo_llm.generate("Once upon a time", SamplingParams(**params))[0]
    assert early.token_ids == [EOS] and early.finish_reason == "stop"
    held = demo_llm.generate("Once upon a time", SamplingParams(**params, min_tokens=4))[0]
    assert len(held.token_ids) == 5 and held.token_ids[-1] == EOS and EOS not in held.token_ids[:4]
    assert held.finish_reason == "stop"


def test_unpenalized_sequences_in_a_mixed_batch_are_unchanged(demo_llm):
    prompts = ["Once upon a time", "The garden", "A letter", "The lighthouse"]
    greedy = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    seeded = SamplingParams(max_tokens=16, temperature=0.9, seed=11, ignore_eos=True)
    penalized = SamplingParams(max_tokens=16, temperature=0.9, seed=5, ignore_eos=True, presence_penalty=1.5,
                               frequency_penalty=1.0, repetition_penalty=1.4, logit_bias={42: 5})
    alone = [demo_llm.generate([p], params)[0].token_ids
             for p, params in zip(prompts, [greedy, seeded, penalized, seeded], strict=True)]
    mixed = demo_llm.generate(prompts, [greedy, seeded, penalized, seeded])
    assert [out.token_ids for out in mixed] == alone


# -- prompt logprobs (completions' echo with logprobs) ------------------------------------------


@pytest.mark.parametrize("chunk", [None, 8])
def test_prompt_logprobs_match_transformers(demo_dir, hf_demo, chunk):
    """Logprobs of every prompt token after the first, and their top 3, against one transformers forward;
    also with the prompt prefilled in chunks of 8, and for a second request whose prompt prefix is cached."""
    options = dict(max_num_batched_tokens=chunk) if chunk else {}
    llm = LLM(model=str(demo_dir), dtype="float32", device="cpu", max_model_len=512, kv_cache_memory="64MiB",
              block_size=4, **options)
    text = "The lighthouse keeper said that the garden was full of letters and old maps"
    prompt = llm.engine.tokenizer.encode(text)
    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True, prompt_logprobs=3)
    with torch.no_grad():
        ids = torch.tensor([prompt])
        ref = hf_demo(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].float().log_softmax(-1)
    for _ in range(2):  # the second time, the prompt's blocks are in the prefix cache
        out = llm.generate([prompt], params)[0]
        assert out.prompt_logprobs is not None and len(out.prompt_logprobs) == len(prompt)
        assert out.prompt_logprobs[0] is None
        for pos, entry in enumerate(out.prompt_logprobs[1:]):
            token = prompt[pos + 1]
            assert entry.token_id == token
            assert abs(entry.logprob - ref[pos, token].item()) < 1e-4
            values, top = ref[pos].topk(3)
            assert [t for t, _ in entry.top] == top.tolist()
    plain = llm.generate([prompt], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))[0]
    assert plain.prompt_logprobs is None and plain.token_ids == out.token_ids
