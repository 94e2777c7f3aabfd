"""Task-vector operations on stacked tensors, as PEFT's `merge_utils` defines them: magnitude and random
pruning, the sign election and the disjoint merge of TIES, and the weighted sum."""

from __future__ import annotations

import torch


def magnitude_prune(x: torch.Tensor, density: float, numel: int | None = None) -> torch.Tensor:
    """Keep exactly k = int(density · numel) entries of largest magnitude (topk), zero the rest. numel: the
    size of the matrix `x` holds the non-zeros of (default: x's own; a sparse part's values pass its dense
    size, and keep them all when k is more)."""
    if density >= 1:
        return x
    k = min(int(density * (x.numel() if numel is None else numel)), x.numel())
    mask = torch.zeros(x.numel(), device=x.device, dtype=x.dtype)
    mask[x.abs().reshape(-1).topk(k, largest=True).indices] = 1
    return x * mask.reshape(x.shape)


def random_prune(x: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry with probability `density` and divide what is kept by it."""
    if density >= 1:
        return x
    keep = torch.bernoulli(torch.full_like(x, density), generator=generator)
    return x * keep / density


def majority_sign_mask(stack: torch.Tensor, method: str) -> torch.Tensor:
    """stack: [T, ...]. The elected sign per entry is that of Σ_t x_t ("total") or of Σ_t sign(x_t)
    ("frequency"), + where it is 0; the mask holds the entries that carry it (zeros never do)."""
    sign = stack.sign()
    magnitude = stack.sum(dim=0) if method == "total" else sign.sum(dim=0)
    majority = torch.where(magnitude >= 0, 1.0, -1.0)
    return sign == majority


def disjoint_merge(weighted: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ_t (w_t x_t) [agrees_t] / max(Σ_t [agrees_t], 1)."""
    return (weighted * mask).sum(dim=0) / mask.sum(dim=0).clamp(min=1)


def weighted_sum(stack: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (stack * _per_task(weights, stack)).sum(dim=0)


def ties(stack: torch.Tensor, weights: torch.Tensor, majority: str) -> torch.Tensor:
    """stack: [T, ...] already pruned. Elect signs on the unweighted stack, then disjoint-merge the weighted."""
    mask = majority_sign_mask(stack, majority)
    return disjoint_merge(stack * _per_task(weights, stack), mask)


def _per_task(weights: torch.Tensor, stack: torch.Tensor) -> torch.Tensor:
    return weights.to(stack).reshape(-1, *([1] * (stack.ndim - 1)))
