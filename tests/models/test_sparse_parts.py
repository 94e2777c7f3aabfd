"""SparseSlotParts against a dense reference: y[t] += x[t] @ S[slot(t)]ᵀ by both of its paths (the gather
over padded entry tables, and one sparse-dense product per slot), at densities from 0.01% to 5%, with
empty rows, a row holding every column, slots without tokens, tokens without a slot, fused slices, and
in fp32 and fp16."""

from __future__ import annotations

import pytest
import torch

from loraplex.models import sparse_parts
from loraplex.models.sparse_parts import SparseSlotParts

SLICES = [0, 48, 64, 80]  # a fused q/k/v-like layer: three slices
IN = 40


def random_csr(out: int, density: float, gen: torch.Generator, full_row: int | None = None) -> torch.Tensor:
    keep = torch.rand(out, IN, generator=gen) < density
    keep[out // 2] = False  # an empty row, always
    if full_row is not None:
        keep[full_row] = True  # a row with every column
    return (torch.randn(out, IN, generator=gen) * keep).to_sparse_csr()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("density", [0.0001, 0.01, 0.05])
@pytest.mark.parametrize("path", ["gather", "per_slot"])
def test_sparse_parts_equal_the_dense_product(monkeypatch, dtype, density, path):
    if path == "per_slot":
        monkeypatch.setattr(sparse_parts, "GATHER_LIMIT", 0)
    gen = torch.Generator().manual_seed(int(density * 1e4))
    max_loras = 5
    parts = SparseSlotParts(max_loras, SLICES, IN, dtype, torch.device("cpu"))
    dense = torch.zeros(max_loras, SLICES[-1], IN)
    for slot in (0, 2, 3):  # slot 1: LoRA only (no sparse part); slot 4: no tokens in the batch
        for i in range(3):
            if slot == 3 and i == 1:
                continue  # a slice left out
            csr = random_csr(SLICES[i + 1] - SLICES[i], density, gen, full_row=0 if i == 0 else None)
            parts.write(slot, i, csr)
            dense[slot, SLICES[i]:SLICES[i + 1]] = csr.to_dense()
    parts.write(4, 0, random_csr(48, density, gen))
    token_slots = torch.tensor([0, -1, 2, 2, 1, 3, 0, -1, 3, 3], dtype=torch.int32)
    x = torch.randn(len(token_slots), IN, generator=gen).to(dtype)
    y = torch.randn(len(token_slots), SLICES[-1], generator=gen).to(dtype)
    expected = y.float().clone()
    for t, s in enumerate(token_slots.tolist()):
        if s >= 0:
            expected[t] += dense[s].to(dtype).float() @ x[t].float()
    order = torch.sort(token_slots, stable=True)
    active = sorted({s for s in token_slots.tolist() if s >= 0})
    counts = [int((token_slots == s).sum()) for s in active]
    first = int((token_slots < 0).sum())
    starts = [first]
    for n in counts:
        starts.append(starts[-1] + n)
    assert parts.any(active) and not parts.any([1])
    parts.add(y, x, token_slots, active, starts, order.indices.to(torch.int32))
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y.float(), expected, atol=tolerance, rtol=tolerance)


def test_clearing_a_slot_removes_its_part():
    parts = SparseSlotParts(2, [0, 8], IN, torch.float32, torch.device("cpu"))
    csr = (torch.eye(8, IN) * 3).to_sparse_csr()
    parts.write(0, 0, csr)
    x = torch.ones(1, IN)
    y = torch.zeros(1, 8)
    parts.add(y, x, torch.tensor([0], dtype=torch.int32), [0], [0, 1], torch.tensor([0], dtype=torch.int32))
    assert torch.equal(y, torch.full((1, 8), 3.0))
    parts.write(0, 0, None)
    y.zero_()
    assert not parts.any([0])
    parts.add(y, x, torch.tensor([0], dtype=torch.int32), [0], [0, 1], torch.tensor([0], dtype=torch.int32))
    assert torch.equal(y, torch.zeros(1, 8))
