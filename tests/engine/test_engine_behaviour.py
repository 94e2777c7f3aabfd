"""Engine behaviour seen from its public API: stops, limits, abort, seeds, deltas, logprobs."""

import pytest
import torch

from loraplex import SamplingParams


def _engine_drained(llm) -> bool:
    bm = llm.engine.block_manager
    return not llm.engine.has_unfinished_requests() and bm.num_free_blocks == bm.num_blocks


def test_max_tokens_gives_length(demo_llm):
    out = demo_llm.generate("Once upon a time", SamplingParams(max_tokens=7, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 7
    assert out.finish_reason == "length"
    assert _engine_drained(demo_llm)


def test_stop_token_id_ends_generation(demo_llm):
    greedy = demo_llm.generate("The lighthouse", SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    stop_at = greedy.token_ids[4]
    first = greedy.token_ids.index(stop_at)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop_token_ids=[stop_at])
    out = demo_llm.generate("The lighthouse", params)[0]
    assert out.token_ids == greedy.token_ids[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_at


def test_stop_string_truncates_text(demo_llm):
    greedy = demo_llm.generate("The garden", SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0]
    text = greedy.text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), "the greedy text must have a usable middle"
    out = demo_llm.generate("The garden", SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=[stop]))[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[: text.index(stop)]
    kept = demo_llm.generate(
        "The garden",
        SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=[stop], include_stop_str_in_output=True),
    )[0]
    assert kept.text == text[: text.index(stop) + len(stop)]


def test_streamed_deltas_add_up_and_hold_back_stop_prefixes(demo_llm):
    engine = demo_llm.engine
    greedy = demo_llm.generate("A letter", SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))[0]
    stop = greedy.text[-4:]  # only found at the very end
    rid = engine.add_request("A letter", SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop=[stop]))
    deltas = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id == rid
            deltas.append(out.delta_text)
            # While running, no emitted text may contain the stop string's beginning that later ends it.
            assert stop not in "".join(deltas)
    assert "".join(deltas) == out.text
    assert out.finished and out.text == greedy.text[: greedy.text.index(stop)]


def test_streamed_outputs_keep_the_tokens_and_logprobs_they_had(demo_llm):
    engine = demo_llm.engine
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=2)
    engine.add_request("A letter", params)
    streamed = []
    while engine.has_unfinished_requests():
        streamed += engine.step()
    final = streamed[-1]
    assert final.finished and isinstance(final.token_ids, list) and isinstance(final.logprobs, list)
    assert len(final.token_ids) == len(final.logprobs) == 12
    # Read after the request finished: each output still holds exactly the tokens of its own step.
    for n, out in enumerate(streamed[:-1], start=1):
        assert not out.finished
        assert out.token_ids == final.token_ids[:n] and len(out.token_ids) == n
        assert list(out.logprobs) == final.logprobs[:n]
        assert out.delta_token_ids == [final.token_ids[n - 1]]
        assert out.token_ids[n - 1 :] == out.delta_token_ids


def test_an_output_made_only_at_the_end_has_every_token_as_its_delta(demo_llm):
    engine = demo_llm.engine
    engine.add_request("A letter", SamplingParams(max_tokens=9, temperature=0, ignore_eos=True))
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step(finished_only=True)
    [out] = outputs
    assert len(out.token_ids) == 9 and out.delta_token_ids == out.token_ids


def test_request_that_cannot_fit_is_refused_at_once(demo_llm):
    with pytest.raises(ValueError, match="max_model_len"):
        demo_llm.engine.add_request([5] * 500, SamplingParams(max_tokens=13))
    assert not demo_llm.engine.has_unfinished_requests()


def test_bad_prompts_are_refused(demo_llm):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        demo_llm.engine.add_request([5, 999999], SamplingParams())
    with pytest.raises(ValueError, match="empty"):
        demo_llm.engine.add_request([], SamplingParams())


def test_abort_frees_blocks_and_spares_the_rest(demo_llm):
    engine = demo_llm.engine
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    keep = engine.add_request("Bridges cross rivers", params)
    drop = engine.add_request("Gardens grow slowly", params)
    engine.step()
    engine.step()
    assert engine.abort_request(drop)
    assert not engine.abort_request(drop)
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id == keep
            if out.finished:
                finished[out.request_id] = out
    alone = demo_llm.generate("Bridges cross rivers", params)[0]
    assert finished[keep].token_ids == alone.token_ids
    assert _engine_drained(demo_llm)


def test_a_request_id_reused_after_it_finished_gets_its_own_attention(demo_dir):
    """The new request's first step is one token past a prefix-cache hit, at the length the finished
    request had reached under the same id, in the same row of the batch: it must not be taken for
    the finished request's continuation."""
    from loraplex import LLM

    def first_token(reuse: bool):
        engine = LLM(model=str(demo_dir), dtype="float32", device="cpu", block_size=4,
                     kv_cache_memory="16MiB").engine
        params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=0)
        shared = [5, 6, 7, 8, 9]
        engine.add_request(shared, params, "y")
        engine.add_request([11, 12, 13], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True), "x")
        engine.step()
        assert any(o.request_id == "x" and o.finished for o in engine.step())  # x decoded 4 tokens in row 1
        request_id = engine.add_request(shared[:4] + [20], SamplingParams(max_tokens=1, temperature=0, ignore_eos=True,
                                                                          logprobs=0), "x" if reuse else "z")
        out = next(o for o in engine.step() if o.request_id == request_id)
        assert out.num_cached_tokens == 4  # the first block came from y: one token computed, as a decode
        return out.token_ids[0], out.logprobs[0].logprob

    token, logprob = first_token(reuse=True)
    expected_token, expected_logprob = first_token(reuse=False)
    assert token == expected_token
    assert logprob == pytest.approx(expected_logprob, abs=1e-5)


def test_seed_gives_same_output_whatever_the_batch(demo_llm):
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.95, seed=1234, ignore_eos=True)
    alone = demo_llm.generate("The harbour at dawn", params)[0].token_ids
    crowd = ["Other text", "def f(x):", "The harbour at dawn", "More words here and there"]
    others = SamplingParams(max_tokens=16, temperature=1.0, ignore_eos=True)
    batch = demo_llm.generate(crowd, [others, others, params, others])
    assert batch[2].token_ids == alone
    different = demo_llm.generate("The harbour at dawn", SamplingParams(
        max_tokens=16, temperature=1.0, top_p=0.95, seed=4321, ignore_eos=True))[0].token_ids
    assert different != alone


def test_logprobs_match_the_model_distribution(demo_llm):
    params = SamplingParams(max_tokens=3, temperature=0, logprobs=3, ignore_eos=True)
    out = demo_llm.generate("Once", params)[0]
    assert len(out.logprobs) == 3
    for entry, token in zip(out.logprobs, out.token_ids, strict=True):
        assert entry.token_id == token
        assert [t for t, _ in entry.top][0] == token  # greedy picks the most likely
        values = [v for _, v in entry.top]
        assert values == sorted(values, reverse=True) and len(values) == 3
        assert entry.logprob == pytest.approx(values[0])
        assert all(v <= 0 for v in values)
    assert sum(torch.tensor([v for _, v in out.logprobs[0].top]).exp()) <= 1.0 + 1e-5


def test_the_earliest_stop_string_wins_whatever_their_order(demo_llm):
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    text = demo_llm.generate("The garden", params)[0].text
    early, late = text[3:5], text[len(text) // 2 : len(text) // 2 + 3]
    assert text.index(early) < text.index(late)
    out = demo_llm.generate("The garden", SamplingParams(max_tokens=24, temperature=0, ignore_eos=True,
                                                         stop=[late, early]))[0]
    assert out.stop_reason == early and out.text == text[: text.index(early)]


@pytest.mark.parametrize("field, value", [("top_k", 1.5), ("logprobs", 1.5), ("max_tokens", "3"), ("seed", 2.0),
                                          ("stop_token_ids", "5"), ("stop_token_ids", [1.0]), ("temperature", "hot")])
def test_wrongly_typed_sampling_fields_are_refused_by_name(field, value):
    with pytest.raises(ValueError, match=f"^{field}: "):
        SamplingParams(**{field: value})
