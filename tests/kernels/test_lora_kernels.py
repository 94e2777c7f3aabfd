"""Triton LoRA shrink/expand (SGMV) vs. their pure-torch twins `reference.lora_shrink/lora_expand`.

Without CUDA the kernels run in Triton's CPU interpreter, so sizes are kept small; with CUDA every
test runs on the GPU. bf16 is marked `gpu` (run on CUDA only): the interpreter's bf16 tl.dot returns
garbage.
"""

import dataclasses
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (by the kernel modules)

import pytest  # noqa: E402

from loraplex.kernels import reference  # noqa: E402
from loraplex.kernels.lora_expand import _lora_expand, lora_expand  # noqa: E402
from loraplex.kernels.lora_meta import LoRAKernelMeta  # noqa: E402
from loraplex.kernels.lora_shrink import _lora_shrink, lora_shrink  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# h is fp32 from exact products of the (rounded) inputs: only the summation order differs.
H_TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (1e-3, 1e-3), torch.bfloat16: (1e-2, 1e-2)}
# y is stored in its own dtype (fp16: ulp 2**-10 relative); the kernel rounds once, the twin twice.
Y_TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (1e-2, 1e-2), torch.bfloat16: (5e-2, 2e-2)}


# ---------------------------------------------------------------------------------------------------
# Batches


def _token_slots(mix: str, num_tokens: int, max_loras: int, gen: torch.Generator) -> torch.Tensor:
    """Adapter slot of every token (-1 = none), in random batch order."""
    if mix == "distinct":  # every token its own adapter
        assert max_loras >= num_tokens
        slots = torch.randperm(max_loras, generator=gen)[:num_tokens]
    elif mix == "identical":  # one adapter for the whole batch (not slot 0)
        slots = torch.full((num_tokens,), max_loras - 1)
    elif mix == "skewed":  # zipf-like segment sizes: one big segment, a long tail of small ones
        weights = 1.0 / torch.arange(1, max_loras + 1, dtype=torch.float64) ** 1.5
        slots = torch.randperm(max_loras, generator=gen)[torch.multinomial(weights, num_tokens, True, generator=gen)]
    elif mix == "with_none":  # ~1/3 of the tokens without adapter
        slots = torch.randint(0, max_loras, (num_tokens,), generator=gen)
        slots[torch.rand(num_tokens, generator=gen) < 0.35] = -1
    elif mix == "sparse_pool":  # two active slots in a bigger pool: empty segments, plus no-adapter tokens
        slots = torch.tensor([1, max_loras - 2, -1])[torch.randint(0, 3, (num_tokens,), generator=gen)]
    elif mix == "none":  # no token has an adapter: empty meta, no launch
        slots = torch.full((num_tokens,), -1)
    else:
        raise AssertionError(mix)
    return slots.to(torch.int32)


def _ranks(max_loras: int, num_slices: int, max_rank: int, gen: torch.Generator) -> torch.Tensor:
    """Per-slot ranks differing within the batch: max_rank, max_rank // 2, max_rank // 4 (>= 1), ...,
    and one slot with an unadapted (rank-0) slice."""
    choices = torch.tensor([max_rank, max(1, max_rank // 2), max(1, max_rank // 4)])
    ranks = choices[torch.randint(0, 3, (max_loras, 1), generator=gen)].repeat(1, num_slices)
    ranks[0] = max_rank
    ranks[: max_loras // 2, 0] = max_rank  # the first slice of several slots at full rank
    ranks[1, num_slices - 1] = 0
    ranks[max_loras - 1, 0] = max(1, max_rank // 2)
    return ranks.to(torch.int32)


def _make(
    dtype: torch.dtype,
    in_features: int,
    slice_outs: list[int],
    max_rank: int,
    num_tokens: int,
    mix: str,
    max_loras: int,
    seed: int = 0,
) -> dict:
    gen = torch.Generator().manual_seed(seed)
    num_slices = len(slice_outs)
    out_features = sum(slice_outs)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(DEVICE)

    token_slots = _token_slots(mix, num_tokens, max_loras, gen)
    return {
        "x": randn(num_tokens, in_features),
        # Scaled so that h and the LoRA delta are O(1).
        "lora_a": randn(max_loras, num_slices, max_rank, in_features, scale=in_features**-0.5),
        "lora_b": randn(max_loras, out_features, max_rank, scale=max_rank**-0.5),
        "y": randn(num_tokens, out_features),
        "ranks": _ranks(max_loras, num_slices, max_rank, gen).to(DEVICE),
        "scales": (0.5 + 1.5 * torch.rand(max_loras, num_slices, generator=gen)).to(DEVICE),
        "token_slots": token_slots.to(DEVICE),
        "meta": LoRAKernelMeta.make(token_slots.to(DEVICE)),
        "slice_offsets": [0, *torch.tensor(slice_outs).cumsum(0).tolist()],
    }


def _check_shrink(b: dict, **blocks: int) -> torch.Tensor:
    h = _lora_shrink(b["x"], b["lora_a"], b["ranks"], b["meta"], **blocks)
    expected = reference.lora_shrink(b["x"], b["lora_a"], b["ranks"], b["token_slots"])
    assert h.dtype == torch.float32 and h.shape == expected.shape
    atol, rtol = H_TOL[b["x"].dtype]
    torch.testing.assert_close(h, expected, atol=atol, rtol=rtol)
    # Exact zeros: tokens without adapter, padded rank columns, rank-0 slices.
    assert torch.equal(h[expected == 0], expected[expected == 0])
    return expected


def _check_expand(b: dict, h: torch.Tensor, **blocks: int) -> None:
    y = b["y"].clone()
    _lora_expand(y, h, b["lora_b"], b["ranks"], b["scales"], b["meta"], b["slice_offsets"], **blocks)
    expected = b["y"].clone()
    reference.lora_expand(expected, h, b["lora_b"], b["ranks"], b["scales"], b["token_slots"], b["slice_offsets"])
    assert y.dtype == b["y"].dtype
    atol, rtol = Y_TOL[y.dtype]
    torch.testing.assert_close(y.float(), expected.float(), atol=atol, rtol=rtol)
    # Tokens without adapter keep their base output bit for bit.
    untouched = b["token_slots"] < 0
    assert torch.equal(y[untouched], b["y"][untouched])


# ---------------------------------------------------------------------------------------------------
# Against the twins

# (in_features, slice outs, max_rank, num_tokens, adapter mix, max_loras)
CASES = {
    "decode-qkv-r8-distinct": (96, [64, 32, 32], 8, 7, "distinct", 8),
    "qkv-r16-skewed": (200, [64, 32, 32], 16, 64, "skewed", 6),
    "single-r64-with_none": (96, [100], 64, 64, "with_none", 4),
    "gateup-r1-identical": (200, [72, 72], 1, 64, "identical", 3),
    "single-r16-sparse_pool": (200, [100], 16, 7, "sparse_pool", 8),
    "one-token-qkv-r16": (96, [64, 32, 32], 16, 1, "identical", 2),
    "distinct64-gateup-r8": (96, [48, 48], 8, 64, "distinct", 64),
    "no-adapter": (96, [64, 32, 32], 8, 7, "none", 4),
}
LONG_CASES = {  # 300 tokens: several token tiles per segment
    "long-qkv-r64-skewed": (96, [64, 32, 32], 64, 300, "skewed", 5),
    "long-single-r8-with_none": (200, [100], 8, 300, "with_none", 6),
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_against_reference(case: tuple, dtype: torch.dtype) -> None:
    b = _make(dtype, *case)
    h_ref = _check_shrink(b)
    _check_expand(b, h_ref)


@pytest.mark.parametrize(("case", "dtype"), [
    pytest.param(LONG_CASES["long-qkv-r64-skewed"], torch.float16, id="long-qkv-r64-skewed-fp16"),
    pytest.param(LONG_CASES["long-single-r8-with_none"], torch.float32, id="long-single-r8-with_none-fp32"),
])
def test_long_batches(case: tuple, dtype: torch.dtype) -> None:
    b = _make(dtype, *case, seed=1)
    h_ref = _check_shrink(b)
    _check_expand(b, h_ref)


@pytest.mark.parametrize(
    ("shrink_blocks", "expand_blocks"),
    [
        # Many rank tiles (rank-8/16/32 slots: later tiles exit early), K and N tails, two token tiles.
        (dict(block_m=16, block_r=16, block_k=16), dict(block_m=16, block_n=16, block_r=16)),
        # One token tile covering the segment, rank tile wider than max_rank... and a long K step.
        (dict(block_m=64, block_r=64, block_k=128), dict(block_m=32, block_n=32, block_r=64)),
    ],
    ids=["small-tiles", "large-tiles"],
)
def test_tilings(shrink_blocks: dict, expand_blocks: dict) -> None:
    b = _make(torch.float32, 200, [64, 40, 24], 64, 40, "skewed", 5, seed=2)
    h_ref = _check_shrink(b, **shrink_blocks)
    _check_expand(b, h_ref, **expand_blocks)


def test_shrink_then_expand_end_to_end() -> None:
    b = _make(torch.float16, 96, [64, 32, 32], 16, 64, "with_none", 5, seed=3)
    h = lora_shrink(b["x"], b["lora_a"], b["ranks"], b["meta"])
    y = b["y"].clone()
    lora_expand(y, h, b["lora_b"], b["ranks"], b["scales"], b["meta"], b["slice_offsets"])
    expected = b["y"].clone()
    h_ref = reference.lora_shrink(b["x"], b["lora_a"], b["ranks"], b["token_slots"])
    reference.lora_expand(expected, h_ref, b["lora_b"], b["ranks"], b["scales"], b["token_slots"], b["slice_offsets"])
    torch.testing.assert_close(y.float(), expected.float(), atol=1e-2, rtol=1e-2)


def test_shrink_out_buffer_is_overwritten() -> None:
    b = _make(torch.float32, 96, [64, 32, 32], 16, 7, "with_none", 4, seed=4)
    out = torch.full((7, 3, 16), float("nan"), device=DEVICE)
    h = lora_shrink(b["x"], b["lora_a"], b["ranks"], b["meta"], out=out)
    assert h is out
    expected = reference.lora_shrink(b["x"], b["lora_a"], b["ranks"], b["token_slots"])
    torch.testing.assert_close(h, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("num_tokens", [0, 7], ids=["no-tokens", "no-adapters"])
def test_empty_meta_does_not_touch_outputs(num_tokens: int) -> None:
    # No active slot: nothing is launched. Shrink still zero-fills h (its `out` buffer too, whatever
    # it held); expand leaves y as it was, bit for bit.
    b = _make(torch.float32, 96, [64, 36], 8, num_tokens, "none", 2)
    assert b["meta"].num_active == 0
    h = lora_shrink(b["x"], b["lora_a"], b["ranks"], b["meta"])
    assert h.dtype == torch.float32 and h.shape == (num_tokens, 2, 8)
    assert torch.equal(h, torch.zeros_like(h))
    out = torch.full((num_tokens, 2, 8), float("nan"), device=DEVICE)
    assert lora_shrink(b["x"], b["lora_a"], b["ranks"], b["meta"], out=out) is out
    assert torch.equal(out, torch.zeros_like(out))
    y = b["y"].clone()
    lora_expand(y, h, b["lora_b"], b["ranks"], b["scales"], b["meta"], b["slice_offsets"])
    assert y.shape == (num_tokens, 100) and torch.equal(y, b["y"])


def test_strided_x_and_y() -> None:
    # x and y as views into wider fused buffers (row stride != row length).
    b = _make(torch.float16, 96, [64, 32, 32], 8, 33, "skewed", 4, seed=5)
    x_wide = torch.randn(33, 160, device=DEVICE).to(torch.float16)
    x_wide[:, 32:128] = b["x"]
    b["x"] = x_wide[:, 32:128]
    h_ref = _check_shrink(b)
    y_wide = torch.randn(33, 200, device=DEVICE).to(torch.float16)
    y_wide[:, 8:136] = b["y"]
    before = y_wide.clone()
    y = y_wide[:, 8:136]
    lora_expand(y, h_ref, b["lora_b"], b["ranks"], b["scales"], b["meta"], b["slice_offsets"])
    expected = b["y"].clone()
    reference.lora_expand(expected, h_ref, b["lora_b"], b["ranks"], b["scales"], b["token_slots"], b["slice_offsets"])
    torch.testing.assert_close(y.float(), expected.float(), atol=1e-2, rtol=1e-2)
    assert torch.equal(y_wide[:, :8], before[:, :8]) and torch.equal(y_wide[:, 136:], before[:, 136:])


# gpu: the Triton 3.9 CPU interpreter computes bf16 tl.dot wrongly (fp16 and fp32 are right).
@pytest.mark.gpu
@pytest.mark.parametrize("case", [CASES["qkv-r16-skewed"], LONG_CASES["long-qkv-r64-skewed"]], ids=["qkv", "long"])
def test_bf16(case: tuple) -> None:
    b = _make(torch.bfloat16, *case)
    h_ref = _check_shrink(b)
    _check_expand(b, h_ref)


# ---------------------------------------------------------------------------------------------------
# Padded rank columns and unused slots are never read


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize(("max_rank", "block_r"), [(16, None), (64, 16)], ids=["r16", "r64-rtiles16"])
def test_padding_is_not_read(dtype: torch.dtype, max_rank: int, block_r: int | None) -> None:
    b = _make(dtype, 96, [64, 32, 32], max_rank, 40, "sparse_pool", 6, seed=6)
    ranks, offsets = b["ranks"].cpu(), b["slice_offsets"]
    used = set(b["token_slots"].unique().tolist()) - {-1}
    lora_a, lora_b = b["lora_a"].clone(), b["lora_b"].clone()
    for slot in range(lora_a.shape[0]):
        if slot not in used:
            lora_a[slot] = float("nan")
            lora_b[slot] = float("nan")
            continue
        for i in range(len(offsets) - 1):
            r = int(ranks[slot, i])
            lora_a[slot, i, r:] = float("nan")
            lora_b[slot, offsets[i] : offsets[i + 1], r:] = float("nan")
    zeroed_a, zeroed_b = torch.nan_to_num(lora_a, nan=0.0), torch.nan_to_num(lora_b, nan=0.0)

    h = _lora_shrink(b["x"], lora_a, b["ranks"], b["meta"], block_r=block_r)
    h_ref = reference.lora_shrink(b["x"], zeroed_a, b["ranks"], b["token_slots"])
    assert torch.isfinite(h).all()
    torch.testing.assert_close(h, h_ref, atol=H_TOL[dtype][0], rtol=H_TOL[dtype][1])

    # h's padded columns and the rows of tokens without adapter are not read by expand either.
    h_poisoned = h_ref.clone()
    for slot in used:
        rows = b["token_slots"] == slot
        for i in range(len(offsets) - 1):
            h_poisoned[rows, i, int(ranks[slot, i]) :] = float("nan")
    h_poisoned[b["token_slots"] < 0] = float("nan")
    y = b["y"].clone()
    _lora_expand(y, h_poisoned, lora_b, b["ranks"], b["scales"], b["meta"], offsets, block_r=block_r)
    expected = b["y"].clone()
    reference.lora_expand(expected, h_ref, zeroed_b, b["ranks"], b["scales"], b["token_slots"], offsets)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), expected.float(), atol=Y_TOL[dtype][0], rtol=Y_TOL[dtype][1])


# ---------------------------------------------------------------------------------------------------
# Argument validation


def _valid_args() -> dict:
    b = _make(torch.float32, 32, [16, 16], 8, 5, "with_none", 3)
    b["h"] = torch.zeros(5, 2, 8, device=DEVICE)
    return b


def _shrink(b: dict, **kw) -> None:
    args = {k: b[k] for k in ("x", "lora_a", "ranks", "meta")} | kw
    lora_shrink(**args)


def _expand(b: dict, **kw) -> None:
    args = {k: b[k] for k in ("y", "h", "lora_b", "ranks", "scales", "meta", "slice_offsets")} | kw
    lora_expand(**args)


SHRINK_ERRORS = {
    "x-1d": (lambda b: dict(x=b["x"][0]), "x must be"),
    "x-int": (lambda b: dict(x=b["x"].to(torch.int32), lora_a=b["lora_a"].to(torch.int32)), "x dtype"),
    "a-dtype": (lambda b: dict(lora_a=b["lora_a"].half()), "lora_a dtype"),
    "a-3d": (lambda b: dict(lora_a=b["lora_a"][0]), "lora_a must be"),
    "in-features": (lambda b: dict(x=b["x"][:, :16]), "in_features"),
    "x-col-stride": (lambda b: dict(x=b["x"].t().contiguous().t()), "x must be contiguous"),
    "a-noncontig": (lambda b: dict(lora_a=b["lora_a"].transpose(0, 1).contiguous().transpose(0, 1)), "lora_a must"),
    "ranks-shape": (lambda b: dict(ranks=b["ranks"][:, :1]), "ranks must be"),
    "ranks-float": (lambda b: dict(ranks=b["ranks"].float()), "ranks must be int"),
    "a-device": (lambda b: dict(lora_a=b["lora_a"].to("meta")), "lora_a is on meta, expected x's device"),
    "meta-tokens": (lambda b: dict(meta=LoRAKernelMeta.make(b["token_slots"][:3])), "meta.token_slots"),
    "out-shape": (lambda b: dict(out=torch.zeros(5, 2, 4, device=DEVICE)), "out must be"),
    "out-dtype": (lambda b: dict(out=torch.zeros(5, 2, 8, device=DEVICE, dtype=torch.float16)), "out must be float32"),
}
EXPAND_ERRORS = {
    "y-1d": (lambda b: dict(y=b["y"][0]), "y must be"),
    "y-int": (lambda b: dict(y=b["y"].to(torch.int32), lora_b=b["lora_b"].to(torch.int32)), "y dtype"),
    "b-dtype": (lambda b: dict(lora_b=b["lora_b"].half()), "lora_b dtype"),
    "h-dtype": (lambda b: dict(h=b["h"].half()), "h must be float32"),
    "h-tokens": (lambda b: dict(h=b["h"][:3]), "h has 3 tokens"),
    "b-out": (lambda b: dict(lora_b=b["lora_b"][:, :16]), "lora_b must be"),
    "b-rank": (lambda b: dict(lora_b=b["lora_b"][:, :, :4].contiguous()), "lora_b must be"),
    "offsets-len": (lambda b: dict(slice_offsets=[0, 32]), "slice_offsets must hold"),
    "offsets-end": (lambda b: dict(slice_offsets=[0, 16, 30]), "slice_offsets must run"),
    "offsets-order": (lambda b: dict(slice_offsets=[0, 40, 32]), "strictly increasing"),
    "offsets-type": (lambda b: dict(slice_offsets=[0, 16.0, 32]), "slice_offsets must be a list of ints"),
    "ranks-shape": (lambda b: dict(ranks=b["ranks"][:2]), "ranks must be"),
    "scales-shape": (lambda b: dict(scales=b["scales"][:, :1]), "scales must be"),
    "scales-dtype": (lambda b: dict(scales=b["scales"].half()), "scales must be float32"),
    "scales-device": (lambda b: dict(scales=b["scales"].to("meta")), "scales is on meta"),
    "h-device": (lambda b: dict(h=b["h"].to("meta")), "h is on meta, expected y's device"),
    "y-col-stride": (lambda b: dict(y=b["y"].t().contiguous().t()), "y must be contiguous"),
    "meta-dtype": (
        lambda b: dict(meta=dataclasses.replace(b["meta"], active_slots=b["meta"].active_slots.long())),
        "meta.active_slots must be int32",
    ),
}


@pytest.mark.parametrize(("bad", "match"), SHRINK_ERRORS.values(), ids=SHRINK_ERRORS.keys())
def test_shrink_rejects(bad, match: str) -> None:
    b = _valid_args()
    _shrink(b)  # the valid call goes through
    with pytest.raises(ValueError, match=match):
        _shrink(b, **bad(b))


@pytest.mark.parametrize(("bad", "match"), EXPAND_ERRORS.values(), ids=EXPAND_ERRORS.keys())
def test_expand_rejects(bad, match: str) -> None:
    b = _valid_args()
    _expand(b)
    with pytest.raises(ValueError, match=match):
        _expand(b, **bad(b))


def test_rejects_bad_block_sizes() -> None:
    b = _valid_args()
    with pytest.raises(ValueError, match="block_r"):
        _lora_shrink(b["x"], b["lora_a"], b["ranks"], b["meta"], block_r=8)
    with pytest.raises(ValueError, match="block_n"):
        _lora_expand(b["y"], b["h"], b["lora_b"], b["ranks"], b["scales"], b["meta"], b["slice_offsets"], block_n=48)
