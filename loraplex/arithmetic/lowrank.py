"""Low-rank algebra on factors: the update of a module, and the best rank-k refactoring of a sum of
updates computed from the factors (never a dense [out, in] SVD)."""

from __future__ import annotations

import torch

from loraplex.adapters_store.formats import LoRAModule


def delta(module: LoRAModule) -> torch.Tensor:
    """ΔW = scale · B @ A: [out, in]."""
    return module.scale * (module.b @ module.a)


def truncate(b: torch.Tensor, a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-`rank` approximation (Frobenius and spectral, Eckart–Young) of B @ A, as factors.

    b: [out, R], a: [R, in] -> (b' [out, k], a' [k, in]) with k = min(rank, R, out, in).
    B = Qb Rb and Aᵀ = Qa Ra (reduced QR), so B A = Qb (Rb Raᵀ) Qaᵀ; the SVD of the small core
    Rb Raᵀ = U S Vᵀ gives B A = (Qb U) S (Qa V)ᵀ, whose leading k terms are the optimum.
    As PEFT's svd merge does, the singular values go to B: b' = Qb U S, a' = (Qa V)ᵀ (orthonormal rows).
    Cost O((out + in)·R² + R³) instead of O(out·in·min(out, in)).
    """
    q_b, r_b = torch.linalg.qr(b)  # [out, m], [m, R]
    q_a, r_a = torch.linalg.qr(a.T)  # [in, n], [n, R]
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)  # core [m, n]
    k = min(rank, s.shape[0])
    return q_b @ (u[:, :k] * s[:k]), (q_a @ vh[:k].T).T


def truncate_dense(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-`rank` factors of a dense matrix (a pruned ΔW, which has no factors to start from)."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    k = min(rank, s.shape[0])
    return u[:, :k] * s[:k], vh[:k]
