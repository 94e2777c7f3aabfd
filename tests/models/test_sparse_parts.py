"""SparseSlotParts and the SparsePool they share, against a dense reference: y[t] += x[t] @ S[slot(t)]ᵀ by both
paths (the gather over the pool's entries, and one sparse-dense product per slot), at densities from 0.01% to
5%, with empty rows, a row holding every column, slots without tokens, tokens without a slot, fused slices,
two layers in one pool, ranges moved by compaction, and in fp32 and fp16."""

from __future__ import annotations

import pytest
import torch

from loraplex.models import sparse_parts
from loraplex.models.sparse_parts import SparseSlotParts
from loraplex.models.sparse_pool import SparsePool

SLICES = [0, 48, 64, 80]  # a fused q/k/v-like layer: three slices
IN = 40
CPU = torch.device("cpu")


def random_csr(out: int, density: float, gen: torch.Generator, full_row: int | None = None) -> torch.Tensor:
    keep = torch.rand(out, IN, generator=gen) < density
    keep[out // 2] = False  # an empty row, always
    if full_row is not None:
        keep[full_row] = True  # a row with every column
    return (torch.randn(out, IN, generator=gen) * keep).to_sparse_csr()


def put(pool: SparsePool, layers: list[SparseSlotParts], slot: int, csrs_per_layer: list[list]) -> None:
    """What SlotPool._write does: one range for the slot, the layers' parts one after another in it."""
    pool.allocate(slot, sum(SparseSlotParts.entries(csrs) for csrs in csrs_per_layer))
    offset = 0
    for layer, csrs in zip(layers, csrs_per_layer, strict=True):
        offset += layer.write(slot, csrs, offset)


def apply(parts: SparseSlotParts, y, x, token_slots) -> None:
    order = torch.sort(token_slots, stable=True)
    active = sorted({s for s in token_slots.tolist() if s >= 0})
    starts = [int((token_slots < 0).sum())]
    for s in active:
        starts.append(starts[-1] + int((token_slots == s).sum()))
    parts.add(y, x, token_slots, active, starts, order.indices.to(torch.int32))


def expected_sum(y, x, token_slots, dense):
    expected = y.float().clone()
    for t, s in enumerate(token_slots.tolist()):
        if s >= 0:
            expected[t] += dense[s].to(x.dtype).float() @ x[t].float()
    return expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("density", [0.0001, 0.01, 0.05])
@pytest.mark.parametrize("path", ["gather", "per_slot"])
def test_sparse_parts_equal_the_dense_product(monkeypatch, dtype, density, path):
    if path == "per_slot":
        monkeypatch.setattr(sparse_parts, "GATHER_LIMIT", 0)
    gen = torch.Generator().manual_seed(int(density * 1e4))
    max_loras = 5
    pool = SparsePool(20_000, max_loras, dtype, CPU)
    first = SparseSlotParts(pool, max_loras, [0, 24], IN)  # another layer in the same pool, before ours
    parts = SparseSlotParts(pool, max_loras, SLICES, IN)
    dense = torch.zeros(max_loras, SLICES[-1], IN)
    for slot in (0, 2, 3):  # slot 1: LoRA only (no sparse part); slot 4: no tokens in the batch
        csrs = []
        for i in range(3):
            csr = None if slot == 3 and i == 1 else random_csr(SLICES[i + 1] - SLICES[i], density, gen,
                                                                 full_row=0 if i == 0 else None)
            csrs.append(csr)  # slot 3: a slice left out
            if csr is not None:
                dense[slot, SLICES[i]:SLICES[i + 1]] = csr.to_dense()
        put(pool, [first, parts], slot, [[random_csr(24, 0.1, gen)], csrs])
    put(pool, [first, parts], 4, [[None], [random_csr(48, density, gen), None, None]])
    token_slots = torch.tensor([0, -1, 2, 2, 1, 3, 0, -1, 3, 3], dtype=torch.int32)
    x = torch.randn(len(token_slots), IN, generator=gen).to(dtype)
    y = torch.randn(len(token_slots), SLICES[-1], generator=gen).to(dtype)
    expected = expected_sum(y, x, token_slots, dense)
    assert parts.any([0, 2, 3]) and not parts.any([1])
    apply(parts, y, x, token_slots)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y.float(), expected, atol=tolerance, rtol=tolerance)


def test_clearing_a_slot_removes_its_part():
    pool = SparsePool(100, 2, torch.float32, CPU)
    parts = SparseSlotParts(pool, 2, [0, 8], IN)
    put(pool, [parts], 0, [[(torch.eye(8, IN) * 3).to_sparse_csr()]])
    x = torch.ones(1, IN)
    y = torch.zeros(1, 8)
    apply(parts, y, x, torch.tensor([0], dtype=torch.int32))
    assert torch.equal(y, torch.full((1, 8), 3.0))
    pool.allocate(0, 0)
    parts.clear(0)
    y.zero_()
    assert not parts.any([0]) and pool.used == 0
    apply(parts, y, x, torch.tensor([0], dtype=torch.int32))
    assert torch.equal(y, torch.zeros(1, 8))


def test_the_pool_places_first_fit_and_compacts_when_only_the_sum_of_gaps_fits():
    pool = SparsePool(10, 4, torch.float32, CPU)
    assert [pool.allocate(s, 3) for s in range(3)] == [1, 4, 7]  # position 0: the zero entry
    pool.release(1)
    assert pool.allocate(3, 2) == 4 and pool.free == 2  # the first gap that fits
    pool.release(0)  # free: 1..3 and 6 and 10: three entries, none contiguous beyond 3
    with pytest.raises(RuntimeError):
        pool.allocate(0, 6)
    assert pool.allocate(0, 5) == 6 and pool.compactions == 1  # after moving 3 -> 1..2 and 2 -> 3..5
    assert pool.ranges == {3: (1, 2), 2: (3, 3), 0: (6, 5)} and pool.used == 10
    assert pool.base.tolist() == [6, 0, 3, 1, 0]


def test_compaction_moves_entries_and_the_layers_still_read_their_own():
    gen = torch.Generator().manual_seed(3)
    csrs = [random_csr(16, 0.15, gen) for _ in range(3)]
    big = random_csr(16, 0.3, gen)
    sizes = [csr._nnz() for csr in csrs]
    assert big._nnz() > sizes[0]
    # after slot 0 leaves, exactly `big` entries are free: its old gap and the tail, neither big enough alone
    pool = SparsePool(sum(sizes) + big._nnz() - sizes[0], 3, torch.float32, CPU)
    parts = SparseSlotParts(pool, 3, [0, 16], IN)
    for slot, csr in enumerate(csrs):
        put(pool, [parts], slot, [[csr]])
    pool.release(0)
    parts.clear(0)
    put(pool, [parts], 0, [[big]])
    assert pool.compactions == 1 and pool.free == 0
    dense = torch.stack([big.to_dense(), csrs[1].to_dense(), csrs[2].to_dense()])
    token_slots = torch.tensor([2, 0, 1, -1], dtype=torch.int32)
    x = torch.randn(4, IN, generator=gen)
    y = torch.zeros(4, 16)
    expected = expected_sum(y, x, token_slots, dense)
    apply(parts, y, x, token_slots)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


def test_windows_that_would_run_past_the_pool_end_take_the_indexed_path(monkeypatch):
    """The pool exactly full: slot 1's short part at its end, read with the width of slot 0's long part."""
    gen = torch.Generator().manual_seed(4)
    long, short = random_csr(16, 0.3, gen), random_csr(16, 0.05, gen)
    pool = SparsePool(long._nnz() + short._nnz(), 2, torch.float32, CPU)
    parts = SparseSlotParts(pool, 2, [0, 16], IN)
    put(pool, [parts], 0, [[long]])
    put(pool, [parts], 1, [[short]])
    assert pool.start(1) + long._nnz() > pool.length  # a window of slot 1 would leave the pool
    windows = []
    monkeypatch.setattr(SparsePool, "windows", staticmethod(lambda t, w: windows.append(w) or t.as_strided(
        (t.numel() - w + 1, w), (1, 1))))
    token_slots = torch.tensor([1, 0, -1, 1], dtype=torch.int32)
    x = torch.randn(4, IN, generator=gen)
    y = torch.zeros(4, 16)
    expected = expected_sum(y, x, token_slots, torch.stack([long.to_dense(), short.to_dense()]))
    apply(parts, y, x, token_slots)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    assert not windows  # the indexed path
    apply(parts, y.zero_(), x, torch.tensor([0, 0, -1, 0], dtype=torch.int32))  # slot 0 alone: windows fit
    assert windows


def test_a_slot_without_entries_in_a_layer_reads_no_window_past_the_pool():
    """Slot 1's adapter has entries in the first layer only and ends the (full) pool: in the second layer its
    part starts at the pool's end, and its tokens share the batch with slot 0's part there."""
    pool = SparsePool(6, 2, torch.float32, CPU)
    first, second = SparseSlotParts(pool, 2, [0, 4], IN), SparseSlotParts(pool, 2, [0, 4], IN)
    three = torch.cat([torch.eye(3, IN), torch.zeros(1, IN)]).to_sparse_csr()
    put(pool, [first, second], 0, [[None], [three]])
    put(pool, [first, second], 1, [[three * 2], [None]])
    assert pool.free == 0 and pool.start(1) + second.offsets_host[1] == pool.length
    x, y = torch.ones(3, IN), torch.zeros(3, 4)
    apply(second, y, x, torch.tensor([0, 1, -1], dtype=torch.int32))
    assert y.tolist() == [[1, 1, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]]


def test_entries_never_written_add_nothing_whatever_they_hold():
    """The pool is allocated empty: a window reaching past the last range reads whatever the memory held."""
    pool = SparsePool(200, 2, torch.float32, CPU)
    pool.rows[1:], pool.cols[1:], pool.vals[1:] = -5, -(2**40), float("nan")
    parts = SparseSlotParts(pool, 2, [0, 4], IN)
    put(pool, [parts], 0, [[torch.cat([torch.ones(2, IN), torch.zeros(2, IN)]).to_sparse_csr()]])
    put(pool, [parts], 1, [[torch.eye(4, IN).to_sparse_csr()]])  # then never-written entries
    x, y = torch.ones(2, IN), torch.zeros(2, 4)
    apply(parts, y, x, torch.tensor([1, 0], dtype=torch.int32))
    assert y.tolist() == [[1, 1, 1, 1], [IN, IN, 0, 0]]
