"""∂L/∂σ_k of each LoRA module from hooks, without ever forming ∂L/∂W.

With ΔW_eff = s U diag(σ) Vᵀ the module adds s U diag(σ) Vᵀ x to its output y, so
∂L/∂σ_k = s Σ_tokens (gyᵀ u_k)(xᵀ v_k), gy = ∂L/∂y. A forward hook keeps xV (tokens×r, padding rows zeroed)
and a tensor hook on y folds gy U into the running, signed sum g (the published tool's method note §2.2;
docs/methods/spectral_edit.md §2).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class SpectralBasis:
    """One module's thin SVD of its unscaled B A (U d_out×r, S r, Vh r×d_in), its LoRA scaling s, and g."""

    module: nn.Module
    U: Tensor
    S: Tensor
    Vh: Tensor
    scaling: float
    g: Tensor

    @classmethod
    def of(cls, module: nn.Module, U: Tensor, S: Tensor, Vh: Tensor, scaling: float) -> SpectralBasis:
        return cls(module, U, S, Vh, scaling, torch.zeros_like(S, dtype=torch.float64))


@contextmanager
def recording(bases: dict[str, SpectralBasis], attention_mask: Tensor) -> Iterator[None]:
    """Within the block, each forward + backward adds its ∂L/∂σ to every basis's g (tokens with mask 0 excluded)."""

    def forward_hook(basis: SpectralBasis):
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            x = inputs[0] * attention_mask.to(inputs[0].device, inputs[0].dtype).unsqueeze(-1)
            projected = x.detach().float() @ basis.Vh.T

            def accumulate(gy: Tensor) -> None:
                gu = gy.detach().float() @ basis.U
                basis.g += basis.scaling * (gu * projected).flatten(0, -2).sum(0).double()

            if output.requires_grad:
                output.register_hook(accumulate)

        return hook

    handles = [basis.module.register_forward_hook(forward_hook(basis)) for basis in bases.values()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
