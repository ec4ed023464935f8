"""Noise schedules of the absorbing-state forward process: the mask rate 1 − α_t, its ELBO weight, time draws.

`loglinear` is 1 − α_t = ε + (1 − ε)t (LLaDA's form: every token is masked at t = 1, at least ε at t → 0; its
ELBO weight is (1 − ε)/(ε + (1 − ε)t) ≈ 1/t), `cosine` 1 − α_t = 1 − cos(πt/2), `linear` α_t = exp(−σ(t)) with
σ(t) = σ_min + t(σ_max − σ_min). Whatever the schedule, t = 1 masks the whole response. The ELBO weight is MDLM's
(Sahoo et al., 2024); docs/methods/lora_diffusion.md §1 states the weights and the choices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from loralab.config.schema import DiffusionConfig


@dataclass(frozen=True)
class Schedule:
    """α_t of one schedule and the loss weight w(t) of one weighting (elbo: −α'_t/(1 − α_t), uniform: 1)."""

    kind: str = "loglinear"
    eps: float = 1e-3
    sigma_min: float = 1e-4
    sigma_max: float = 20.0
    loss_weight: str = "elbo"

    @classmethod
    def from_config(cls, cfg: DiffusionConfig) -> Schedule:
        return cls(cfg.schedule, cfg.eps, cfg.sigma_min, cfg.sigma_max, cfg.loss_weight)

    def alpha(self, t: Tensor) -> Tensor:
        """The probability α_t that a response token is still unmasked at time t (0 at t = 1)."""
        if self.kind == "loglinear":
            alpha = (1 - self.eps) * (1 - t)
        elif self.kind == "cosine":
            alpha = torch.cos(math.pi / 2 * t)
        else:
            alpha = torch.exp(-(self.sigma_min + t * (self.sigma_max - self.sigma_min)))
        return torch.where(t >= 1, torch.zeros_like(alpha), alpha)

    def mask_rate(self, t: Tensor) -> Tensor:
        """1 − α_t: the probability that the forward process has masked a response token by time t."""
        return 1 - self.alpha(t)

    def alpha_derivative(self, t: Tensor) -> Tensor:
        """dα_t/dt in closed form."""
        if self.kind == "loglinear":
            return torch.full_like(t, -(1 - self.eps))
        if self.kind == "cosine":
            return -math.pi / 2 * torch.sin(math.pi / 2 * t)
        span = self.sigma_max - self.sigma_min
        return -span * torch.exp(-(self.sigma_min + t * span))

    def weight(self, t: Tensor) -> Tensor:
        """The per-sample loss weight: −α'_t/(1 − α_t) for the ELBO, 1 for the uniform loss."""
        if self.loss_weight == "uniform":
            return torch.ones_like(t)
        return -self.alpha_derivative(t) / self.mask_rate(t).clamp_min(1e-12)


def sample_times(batch: int, eps: float, generator: torch.Generator | None = None, device=None) -> Tensor:
    """t ~ U[ε, 1] with antithetic (stratified) draws: one uniform offset, shifted by i/B for sample i."""
    offset = torch.rand((), generator=generator, device=device)
    stratified = (offset + torch.arange(batch, device=device) / batch) % 1
    return eps + (1 - eps) * stratified
