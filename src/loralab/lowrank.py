"""Low-rank algebra on LoRA factors: the thin SVD of B A without forming ΔW, rebuilding, energy ranks, truncation.

For B (d_out×r) and A (r×d_in): B = Q_B R_B and Aᵀ = Q_A R_A (thin QR), so B A = Q_B (R_B R_Aᵀ) Q_Aᵀ and the
SVD of the r×r core gives the SVD of B A. Cost O((d_out + d_in) r²); no d_out×d_in matrix is ever built.
"""

from __future__ import annotations

import torch
from torch import Tensor


def thin_svd(B: Tensor, A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """U (d_out×r), S (r, descending), Vh (r×d_in) with B A = U diag(S) Vh, in float32 or wider."""
    dtype = torch.promote_types(B.dtype, torch.float32)
    Q_b, R_b = torch.linalg.qr(B.to(dtype))
    Q_a, R_a = torch.linalg.qr(A.to(dtype).T)
    U, S, Vh = torch.linalg.svd(R_b @ R_a.T)
    return Q_b @ U, S, Vh @ Q_a.T


def rebuild_factors(U: Tensor, S: Tensor, Vh: Tensor) -> tuple[Tensor, Tensor]:
    """LoRA factors B = U diag(√S), A = diag(√S) Vh with B A = U diag(S) Vh; S must be non-negative."""
    root = S.sqrt()
    return U * root, root[:, None] * Vh


def truncated_factors(B: Tensor, A: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Rank-k factors (B_k d_out×k, A_k k×d_in) of the best rank-k approximation of B A, split as √S on each side."""
    U, S, Vh = thin_svd(B, A)
    return rebuild_factors(U[:, :k], S[:k], Vh[:k])


def energy_rank(eigenvalues: Tensor, threshold: float, low: int, high: int) -> int:
    """1 + #{i : cumsum(λ)_i / Σλ < threshold} over the descending, non-negative λ, clamped to [low, high].

    A spectrum with no energy gives `high` (there is nothing to judge the rank by).
    """
    values = eigenvalues.clamp(min=0).sort(descending=True).values.double()
    total = values.sum()
    if total <= 0:
        return high
    k = 1 + int((values.cumsum(0) / total < threshold).sum())
    return max(low, min(k, high))
