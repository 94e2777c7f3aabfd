"""The pure-torch paged attention (the CPU path, torch_attention.py) and its twin
`reference.paged_attention` against a plain per-token loop."""

import math

import pytest
import torch

from loraplex.kernels import reference, torch_attention
from loraplex.kernels.torch_attention import paged_attention_planned, plan_paged_attention, write_kv

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 4, 2, 8, 4


def _loop_oracle(q, keys, values, lens, q_lens, window=None, softcap=None):
    out, t = torch.empty_like(q), 0
    for b, (length, q_len) in enumerate(zip(lens, q_lens, strict=True)):
        for i in range(q_len):
            p = length - q_len + i
            lo = 0 if window is None else max(0, p - window + 1)
            for h in range(HEADS):
                kv_head = h // (HEADS // KV_HEADS)
                k, v = keys[b][lo : p + 1, kv_head], values[b][lo : p + 1, kv_head]
                scores = q[t, h] @ k.T / math.sqrt(HEAD_DIM)
                if softcap is not None:
                    scores = softcap * torch.tanh(scores / softcap)
                out[t, h] = torch.softmax(scores, -1) @ v
            t += 1
    return out


@pytest.mark.parametrize("lens, q_lens", [
    ([6, 9], [3, 1]),  # a chunk and a decode: two groups
    ([5, 5, 5], [1, 1, 1]),  # decodes of one length: no mask
    ([7, 2, 12, 4], [1, 2, 1, 4]),  # mixed, first tokens and continuations
    ([9], [9]),  # a whole prompt
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", ["planned", "twin"])
@pytest.mark.parametrize(("window", "softcap"), [(None, None), (3, None), (None, 0.7), (4, 1.5), (12, None)],
                         ids=["plain", "window", "softcap", "both", "window-of-the-longest"])
def test_matches_a_per_token_loop(lens, q_lens, dtype, impl, window, softcap, monkeypatch):
    # soft-capped scores one query row at a time: the blocks must join up to the whole
    monkeypatch.setattr(torch_attention, "SOFTCAP_SCORE_ELEMENTS", 1 if impl == "planned" else 1 << 25)
    g = torch.Generator().manual_seed(0)
    num_blocks = 32
    k_cache = torch.zeros(num_blocks, BLOCK, KV_HEADS, HEAD_DIM, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    blocks = torch.randperm(num_blocks, generator=g).tolist()
    width = max(-(-n // BLOCK) for n in lens) + 1  # a spare column of unused entries
    block_tables = torch.tensor([blocks[i * width:(i + 1) * width] for i in range(len(lens))], dtype=torch.int32)
    # Values the dtype holds exactly, so that the fp32 loop sees what the cache holds.
    keys = [torch.randn(n, KV_HEADS, HEAD_DIM, generator=g).to(dtype).float() for n in lens]
    values = [torch.randn(n, KV_HEADS, HEAD_DIM, generator=g).to(dtype).float() for n in lens]
    for b, n in enumerate(lens):
        slots = torch.tensor([int(block_tables[b, p // BLOCK]) * BLOCK + p % BLOCK for p in range(n)])
        write_kv(keys[b], values[b], k_cache, v_cache, slots)
    q = torch.randn(sum(q_lens), HEADS, HEAD_DIM, generator=g).to(dtype)
    qsl = torch.tensor([0, *torch.cumsum(torch.tensor(q_lens), 0).tolist()], dtype=torch.int32)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    scale = 1 / math.sqrt(HEAD_DIM)
    plan = plan_paged_attention(block_tables, lens, q_lens, BLOCK, dtype)
    if impl == "planned":
        out = paged_attention_planned(q, k_cache, v_cache, plan, scale, window, softcap)
    else:
        out = reference.paged_attention(q, k_cache, v_cache, block_tables, seq_lens, qsl, scale, window, softcap)
    assert out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: the output's own rounding
    expected = _loop_oracle(q.float(), keys, values, lens, q_lens, window, softcap)
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)
    # Masks are made in the query's dtype (SDPA adds them to the scores); decodes and chunks are apart.
    assert all(group.mask is None or group.mask.dtype == dtype for group in plan.groups)
    has_both = 1 in q_lens and any(n > 1 for n in q_lens)
    assert len(plan.groups) == (2 if has_both else 1)
