"""The Triton sparse-add kernel against its twin (`reference.sparse_add`) and a dense product: densities
0.01% to 5%, empty rows, a row with every column, slots without tokens, tokens without a slot, fp32 and
fp16. Without CUDA the kernel runs in Triton's CPU interpreter."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (by the kernel module)

import pytest  # noqa: E402

from loraplex.kernels import reference  # noqa: E402
from loraplex.kernels.sparse_add import sparse_add  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OUT, IN, SLOTS = 70, 96, 5


def tables(density: float, gen: torch.Generator):
    """Pool-style tables for SLOTS slots plus an empty last one (crow relative to each slot's start; the
    entries of all slots in one flat table, in reverse slot order with a gap of junk between slots, so that
    a kernel ignoring `starts` reads the wrong ones), and the dense matrices they hold."""
    dense = torch.randn(SLOTS + 1, OUT, IN, generator=gen) * (torch.rand(SLOTS + 1, OUT, IN, generator=gen) < density)
    dense[:, 3] = 0.0  # an empty row in every slot
    dense[0, 5] = torch.randn(IN, generator=gen)  # a row holding every column
    dense[SLOTS] = 0.0
    csrs = [d.to_sparse_csr() for d in dense]
    crow = torch.stack([c.crow_indices() for c in csrs]).int()
    starts = torch.zeros(SLOTS + 1, dtype=torch.long)
    cols, vals = [torch.zeros(1, dtype=torch.int32)], [torch.zeros(1)]  # the pool's zero entry
    position = 1
    for s in reversed(range(SLOTS + 1)):
        starts[s] = position
        cols += [csrs[s].col_indices().int(), torch.randint(0, IN, (3,), generator=gen, dtype=torch.int32)]
        vals += [csrs[s].values(), torch.full((3,), 1e3)]  # junk after each slot's entries
        position += csrs[s].values().numel() + 3
    max_row_nnz = int((crow[:, 1:] - crow[:, :-1]).max())
    return dense, crow, starts, torch.cat(cols), torch.cat(vals), max_row_nnz


@pytest.mark.parametrize("block_r", [None, 16])  # the default tile, and several row tiles per token
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("density", [0.0001, 0.005, 0.05])
def test_sparse_add_kernel_equals_its_twin_and_the_dense_product(dtype, density, block_r):
    gen = torch.Generator().manual_seed(int(density * 1e5))
    dense, crow, starts, cols, vals, max_row_nnz = tables(density, gen)
    token_slots = torch.tensor([0, -1, 2, 2, 1, 4, 0, -1, 2], dtype=torch.int32)  # slot 3: no token
    x = torch.randn(len(token_slots), IN, generator=gen).to(dtype)
    y0 = torch.randn(len(token_slots), OUT, generator=gen).to(dtype)
    expected = y0.float().clone()
    for t, s in enumerate(token_slots.tolist()):
        if s >= 0:
            expected[t] += dense[s].to(dtype).float() @ x[t].float()
    twin = y0.clone()
    reference.sparse_add(twin, x, token_slots, crow, starts, cols, vals.to(dtype))
    ours = y0.to(DEVICE).clone()
    sparse_add(ours, x.to(DEVICE), token_slots.to(DEVICE), crow.to(DEVICE), starts.to(DEVICE), cols.to(DEVICE),
               vals.to(dtype).to(DEVICE), max_row_nnz, block_r=block_r)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(twin.float(), expected, atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(ours.cpu().float(), expected, atol=tolerance, rtol=tolerance)
    untouched = token_slots < 0
    assert torch.equal(ours.cpu()[untouched], y0[untouched])


def test_sparse_add_checks_its_arguments():
    y = torch.zeros(2, OUT)
    x, slots = torch.zeros(2, IN), torch.zeros(2, dtype=torch.int32)
    with pytest.raises(ValueError, match="crow"):
        sparse_add(y, x, slots, torch.zeros(1, OUT, dtype=torch.long), torch.zeros(1, dtype=torch.long),
                   torch.zeros(4, dtype=torch.int32), torch.zeros(4), 1)
    with pytest.raises(ValueError, match="starts"):
        sparse_add(y, x, slots, torch.zeros(1, OUT + 1, dtype=torch.long), torch.zeros(2, dtype=torch.long),
                   torch.zeros(4, dtype=torch.int32), torch.zeros(4), 1)
    with pytest.raises(ValueError, match="vals"):
        sparse_add(y, x, slots, torch.zeros(1, OUT + 1, dtype=torch.long), torch.zeros(1, dtype=torch.long),
                   torch.zeros(4, dtype=torch.int32), torch.zeros(4, dtype=torch.float16), 1)
