"""Triton paged attention vs. its pure-torch twin `reference.paged_attention`.

Without CUDA the kernel runs in Triton's CPU interpreter, so sizes are kept small; with CUDA every
test runs on the GPU. bf16 is marked `gpu` (run on CUDA only): the interpreter's bf16 tl.dot returns
garbage.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (by the kernel module)

import pytest  # noqa: E402

from loraplex.kernels import reference  # noqa: E402
from loraplex.kernels.paged_attention import _paged_attention, paged_attention  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ATOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}
RTOL = {torch.float32: 0.0, torch.float16: 1e-3, torch.bfloat16: 1e-2}
NUM_HEADS = 8


def _make_batch(
    ctx_lens: list[int],
    q_lens: list[int],
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    num_heads: int = NUM_HEADS,
    seed: int = 0,
) -> tuple[torch.Tensor, ...]:
    """Random query and paged cache; every sequence's blocks are shuffled, non-contiguous ids."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-c // block_size) for c in ctx_lens]
    max_blocks = max(blocks_per_seq) + 1  # one spare column: unused entries must be ignored
    num_blocks = sum(blocks_per_seq) + 4  # a few blocks nobody owns
    perm = torch.randperm(num_blocks, generator=gen)
    # Unused entries point at arbitrary (valid) blocks, not a tidy zero.
    block_tables = torch.randint(0, num_blocks, (len(ctx_lens), max_blocks), generator=gen)
    used = 0
    for b, n in enumerate(blocks_per_seq):
        block_tables[b, :n] = perm[used : used + n]
        used += n

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)

    k_cache = randn(num_blocks, block_size, num_kv_heads, head_dim)
    v_cache = randn(num_blocks, block_size, num_kv_heads, head_dim)
    query = randn(sum(q_lens), num_heads, head_dim)
    query_start_loc = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    seq_lens = torch.tensor(ctx_lens, dtype=torch.int32)
    return (
        query, k_cache, v_cache, block_tables.to(torch.int32).to(DEVICE),
        seq_lens.to(DEVICE), query_start_loc.to(DEVICE),
    )


def _check_against_reference(batch: tuple[torch.Tensor, ...], block_n: int | None = None,
                             window: int | None = None, softcap: float | None = None) -> None:
    query, k_cache, v_cache, block_tables, seq_lens, query_start_loc = batch
    scale = query.shape[-1] ** -0.5
    out = _paged_attention(query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, block_n,
                           window=window, softcap=softcap)
    # The oracle runs in fp32 on the same (rounded) inputs.
    expected = reference.paged_attention(
        query.float(), k_cache.float(), v_cache.float(), block_tables, seq_lens, query_start_loc, scale,
        window=window, softcap=softcap,
    )
    assert out.dtype == query.dtype and out.shape == query.shape
    torch.testing.assert_close(out.float(), expected, atol=ATOL[query.dtype], rtol=RTOL[query.dtype])


def _decode_ctx_lens(block_size: int) -> list[int]:
    # 1 key; exactly one / four blocks; non-multiples; 70 > 64 keys spans two tiles.
    return [1, block_size, 2 * block_size + 3, 3 * block_size - 1, 4 * block_size, 70]


@pytest.mark.parametrize("block_size", [8, 16])
@pytest.mark.parametrize("head_dim", [32, 64])
@pytest.mark.parametrize("num_kv_heads", [8, 4, 2])  # GQA ratios 1, 2, 4
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode(dtype: torch.dtype, num_kv_heads: int, head_dim: int, block_size: int) -> None:
    ctx_lens = _decode_ctx_lens(block_size)
    batch = _make_batch(ctx_lens, [1] * len(ctx_lens), num_kv_heads, head_dim, block_size, dtype)
    _check_against_reference(batch)


# Cached context (this step included) and q_len per sequence: chunks continuing after cached
# context, a fresh prefill chunk (no earlier context), decode tokens, a chunk spanning two tiles.
MIXED_CTX = [12, 5, 33, 1, 70, 16]
MIXED_Q = [5, 5, 1, 1, 5, 5]


@pytest.mark.parametrize(
    ("num_kv_heads", "head_dim", "block_size"), [(8, 32, 8), (4, 64, 16), (2, 32, 16), (2, 64, 8)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_mixed_chunks(dtype: torch.dtype, num_kv_heads: int, head_dim: int, block_size: int) -> None:
    batch = _make_batch(MIXED_CTX, MIXED_Q, num_kv_heads, head_dim, block_size, dtype, seed=1)
    _check_against_reference(batch)


@pytest.mark.parametrize(
    ("block_size", "block_n"),
    [(16, 16), (8, 32), (32, 16), (32, 64)],  # tile = one block, several blocks, part of a block
)
def test_tilings(block_size: int, block_n: int) -> None:
    batch = _make_batch(MIXED_CTX, MIXED_Q, 2, 32, block_size, torch.float32, seed=2)
    _check_against_reference(batch, block_n)


@pytest.mark.parametrize(("window", "softcap"), [(1, None), (7, None), (20, None), (None, 0.8), (9, 2.0)])
@pytest.mark.parametrize("block_n", [16, 64])
def test_sliding_window_and_softcap(window: int | None, softcap: float | None, block_n: int) -> None:
    """Gemma 2 / Mistral attention: a window shorter and longer than some contexts, starting mid-tile and
    mid-block; soft-capping strong enough (scores ~N(0, 1), cap 0.8) to change every softmax."""
    batch = _make_batch(MIXED_CTX, MIXED_Q, 2, 32, 8, torch.float32, seed=4)
    _check_against_reference(batch, block_n, window=window, softcap=softcap)
    plain = _paged_attention(*batch, batch[0].shape[-1] ** -0.5, block_n)
    windowed = _paged_attention(*batch, batch[0].shape[-1] ** -0.5, block_n, window=window, softcap=softcap)
    assert not torch.allclose(plain, windowed, atol=1e-3)  # the options change the output


def test_odd_group_and_small_head_dim() -> None:
    # Group of 3 heads (padded to 16 rows) and head_dim 8 (padded to 16 columns).
    batch = _make_batch(MIXED_CTX, MIXED_Q, 2, 8, 16, torch.float16, num_heads=6, seed=3)
    _check_against_reference(batch)


def test_strided_query() -> None:
    # The query as a view into a fused qkv projection output (non-contiguous rows).
    query, *rest = _make_batch([9, 20], [1, 5], 4, 32, 8, torch.float32, seed=4)
    qkv = torch.randn(query.shape[0], 3 * NUM_HEADS, 32, device=DEVICE)
    qkv[:, :NUM_HEADS] = query
    _check_against_reference((qkv[:, :NUM_HEADS], *rest))


def test_empty_batch() -> None:
    query, k_cache, v_cache, _, _, _ = _make_batch([3], [1], 4, 32, 8, torch.float32)
    empty = torch.zeros(0, dtype=torch.int32, device=DEVICE)
    qsl = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    out = paged_attention(query[:0], k_cache, v_cache, empty.view(0, 1), empty, qsl, 1.0)
    assert out.shape == (0, NUM_HEADS, 32)


def test_bad_inputs_raise() -> None:
    query, k_cache, v_cache, block_tables, seq_lens, qsl = _make_batch(
        [9, 20], [1, 5], 4, 32, 8, torch.float32
    )
    rest = (block_tables, seq_lens, qsl, 1.0)
    k24, v24 = k_cache[..., :24].contiguous(), v_cache[..., :24].contiguous()

    with pytest.raises(ValueError, match="dtype"):
        paged_attention(query.half(), k_cache, v_cache, *rest)
    with pytest.raises(ValueError, match="dtype"):
        paged_attention(query.double(), k_cache.double(), v_cache.double(), *rest)
    with pytest.raises(ValueError, match="head_dim"):
        paged_attention(query[..., :24], k24, v24, *rest)
    with pytest.raises(ValueError, match="head_dim"):
        paged_attention(query, k_cache[..., :16].contiguous(), v_cache[..., :16].contiguous(), *rest)
    with pytest.raises(ValueError, match="num_heads"):
        paged_attention(query[:, :6], k_cache, v_cache, *rest)
    with pytest.raises(ValueError, match="contiguous"):
        paged_attention(query, k_cache.transpose(1, 2), v_cache.transpose(1, 2), *rest)
    with pytest.raises(ValueError, match="v_cache"):
        paged_attention(query, k_cache, v_cache[:1], *rest)
    with pytest.raises(ValueError, match="query_start_loc"):
        paged_attention(query, k_cache, v_cache, block_tables, seq_lens, qsl[:-1], 1.0)
    with pytest.raises(ValueError, match="block_tables is on meta"):
        paged_attention(query, k_cache, v_cache, block_tables.to("meta"), seq_lens, qsl, 1.0)
    with pytest.raises(ValueError, match="seq_lens must be int32 or int64"):
        paged_attention(query, k_cache, v_cache, block_tables, seq_lens.float(), qsl, 1.0)


# gpu: the Triton 3.9 CPU interpreter computes bf16 tl.dot wrongly (fp16 and fp32 are right).
@pytest.mark.gpu
@pytest.mark.parametrize("num_kv_heads", [8, 2])
def test_bf16_cuda(num_kv_heads: int) -> None:
    batch = _make_batch(MIXED_CTX, MIXED_Q, num_kv_heads, 64, 16, torch.bfloat16, seed=5)
    _check_against_reference(batch)
    decode = _make_batch(_decode_ctx_lens(16), [1] * 6, num_kv_heads, 128, 16, torch.bfloat16, seed=6)
    _check_against_reference(decode)
