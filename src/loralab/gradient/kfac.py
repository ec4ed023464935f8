"""Rank-space K-FAC algebra for LoRA factors: damped inverses, natural-gradient preconditioning, eigenbases,
and the projection of Adam's moments onto a reprojected subspace. Pure functions on r×r matrices
(docs/methods/grit.md §2–§3; K-FAC: Martens & Grosse, ICML 2015).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

DAMPING_LADDER = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0)
GRADIENT_LIMIT = 1e6


def damped_inverses(sigma_a: Tensor, sigma_g: Tensor, damping: float) -> tuple[Tensor, Tensor, float] | None:
    """(Σ_a + λcI)⁻¹ and (Σ_g + λcI)⁻¹ by Cholesky, for the first c of the ladder where both factor.

    Returns the two inverses and the c used, or None when every rung fails (the caller keeps its old inverses).
    """
    eye = torch.eye(sigma_a.shape[0], dtype=torch.float32, device=sigma_a.device)
    a, g = (0.5 * (s.float() + s.float().T) for s in (sigma_a, sigma_g))
    for multiple in DAMPING_LADDER:
        factor_a, info_a = torch.linalg.cholesky_ex(a + damping * multiple * eye)
        factor_g, info_g = torch.linalg.cholesky_ex(g + damping * multiple * eye)
        if int(info_a) == 0 and int(info_g) == 0:
            return torch.cholesky_inverse(factor_a), torch.cholesky_inverse(factor_g), multiple
    return None


def sanitized(gradient: Tensor) -> Tensor:
    """Non-finite entries set to 0, the rest clamped to ±1e6."""
    return torch.nan_to_num(gradient, nan=0.0, posinf=0.0, neginf=0.0).clamp_(-GRADIENT_LIMIT, GRADIENT_LIMIT)


def precondition(
    grad_A: Tensor, grad_B: Tensor, inverse_a: Tensor, inverse_g: Tensor, pairing: Literal["grit", "kfac"]
) -> tuple[Tensor, Tensor]:
    """Natural-gradient A and B gradients (float32).

    grit: ∇A ← (Σ_a+λI)⁻¹ ∇A, ∇B ← ∇B (Σ_g+λI)⁻¹.   kfac: ∇A ← (Σ_g+λI)⁻¹ ∇A, ∇B ← ∇B (Σ_a+λI)⁻¹.
    """
    left, right = (inverse_a, inverse_g) if pairing == "grit" else (inverse_g, inverse_a)
    return sanitized(left @ grad_A.float()), sanitized(grad_B.float() @ right)


def eigen_descending(sigma: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (descending) and eigenvectors (columns) of a symmetric r×r matrix; solved in float64, since
    float32 eigenvectors of close eigenvalues are only accurate to ε‖Σ‖/gap; returned in float32."""
    values, vectors = torch.linalg.eigh(0.5 * (sigma.double() + sigma.double().T))
    return values.flip(0).float(), vectors.flip(1).float()


def project_moments(state: dict, projector: Tensor, side: Literal["left", "right"]) -> None:
    """Project Adam's moments of a factor the way the factor was projected (A ← P A or B ← B P).

    The first moment is projected exactly; second moments by the elementwise-squared projector, which is the
    second moment of the projected gradient when coordinates are uncorrelated and keeps it non-negative.
    """
    squared = projector * projector
    for key, matrix in (("exp_avg", projector), ("exp_avg_sq", squared), ("max_exp_avg_sq", squared)):
        moment = state.get(key)
        if isinstance(moment, Tensor) and moment.dim() == 2:
            m = matrix.to(moment.dtype)
            moment.copy_(m @ moment if side == "left" else moment @ m)
