"""Spectral edit rules: new singular values from the old ones and their sensitivities g_k = ∂L/∂σ_k.

Three modes: `abs_select` scales the k_core directions of largest |g| by amp_factor and the k_noise of
smallest |g| by sup_factor; `random_index` is its control, the same counts at random indices; `gd` takes one
gradient step on σ. Every mode then clamps at sigma_clip_min and may rescale to keep Σσ (l1) or ‖σ‖ (l2).
The published tool's method note §2.3 and docs/methods/spectral_edit.md §5 state the rules and their defaults.
"""

from __future__ import annotations

import torch
from torch import Tensor

from loralab.edit.options import EditRule

EPSILON = 1e-8
ASYMMETRIC_STEPS = (2.0, 0.2)  # step on relu(g) (suppress) and on -relu(-g) (enhance), as published


def normalize(g: Tensor, how: str) -> Tensor:
    """g / mean|g| (mean_abs), g / ‖g‖ (l2) or g itself (none); the divisor is floored at 1e-8."""
    if how == "mean_abs":
        return g / g.abs().mean().clamp_min(EPSILON)
    if how == "l2":
        return g / torch.linalg.vector_norm(g).clamp_min(EPSILON)
    return g


def selection_counts(r: int, core_frac: float, noise_frac: float) -> tuple[int, int]:
    """k_core = max(round(r·core_frac), 1) capped at r; k_noise = round(r·noise_frac) capped at r − k_core."""
    k_core = min(max(round(r * core_frac), 1), r)
    return k_core, min(round(r * noise_frac), r - k_core)


def gate(r: int, core: Tensor, noise: Tensor, rule: EditRule) -> Tensor:
    """Per-direction factors: amp on the core indices, sup on the noise indices, mid elsewhere."""
    factors = torch.full((r,), rule.mid_factor, dtype=torch.float64)
    factors[core] = rule.amp_factor
    factors[noise] = rule.sup_factor
    return factors


def selection_gate(g: Tensor, rule: EditRule, generator: torch.Generator) -> tuple[Tensor, int, int]:
    """abs_select: core = largest |g|, noise = smallest |g|; random_index: both from a seeded permutation."""
    r = g.numel()
    k_core, k_noise = selection_counts(r, rule.core_frac, rule.noise_frac)
    if rule.mode == "abs_select":
        order = torch.argsort(g.abs().cpu(), descending=True, stable=True)
        core, noise = order[:k_core], order[r - k_noise :]
    else:
        order = torch.randperm(r, generator=generator)
        core, noise = order[:k_core], order[k_core : k_core + k_noise]
    return gate(r, core, noise, rule), k_core, k_noise


def gd_step(sigma: Tensor, g: Tensor, rule: EditRule) -> Tensor:
    """σ·exp(−η g) or σ − η g; asymmetric: η·g becomes 2.0·relu(g)^pos_power − 0.2·relu(−g)."""
    if rule.asymmetric_update:
        suppress, enhance = ASYMMETRIC_STEPS
        step = suppress * torch.relu(g).pow(rule.pos_power) - enhance * torch.relu(-g)
    else:
        step = rule.eta * g
    return sigma * torch.exp(-step) if rule.update_mode == "multiplicative" else sigma - step


def preserve(sigma0: Tensor, sigma: Tensor, how: str) -> Tensor:
    """Rescale σ' so that Σσ' = Σσ0 (l1) or ‖σ'‖ = ‖σ0‖ (l2); none leaves it."""
    if how == "l1":
        return sigma * (sigma0.sum().clamp_min(EPSILON) / sigma.sum().clamp_min(EPSILON))
    if how == "l2":
        return sigma * (
            torch.linalg.vector_norm(sigma0).clamp_min(EPSILON) / torch.linalg.vector_norm(sigma).clamp_min(EPSILON)
        )
    return sigma


def edit_sigma(sigma0: Tensor, g: Tensor, rule: EditRule, generator: torch.Generator) -> tuple[Tensor, dict]:
    """New singular values (float64) and the module's statistics for spectral_edit_meta.json.

    `factors` are σ'/σ0 per direction in σ0's (descending) order, after clamping and energy preservation
    (1.0 where σ0 = 0).
    """
    sigma0, g = sigma0.double().cpu(), g.double().cpu()
    k_core = k_noise = None
    if rule.mode == "gd":
        sigma = gd_step(sigma0, normalize(g, rule.grad_norm), rule)
    else:
        factors, k_core, k_noise = selection_gate(normalize(g, rule.grad_norm), rule, generator)
        sigma = sigma0 * factors
    sigma = preserve(sigma0, sigma.clamp_min(rule.sigma_clip_min), rule.preserve_energy)
    net = torch.where(sigma0 > 0, sigma / sigma0.where(sigma0 > 0, 1.0), 1.0)
    stats = {
        "r": sigma0.numel(),
        "g_abs_mean": float(g.abs().mean()),
        "g_abs_max": float(g.abs().max()),
        "k_core": k_core,
        "k_noise": k_noise,
        "factors": [round(float(f), 6) for f in net],
        "sigma0_sum": float(sigma0.sum()),
        "sigma_new_sum": float(sigma.sum()),
        "sigma0_top1": float(sigma0.max()),
        "sigma_new_top1": float(sigma.max()),
    }
    return sigma, stats
