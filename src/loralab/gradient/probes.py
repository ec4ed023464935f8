"""LoRA probes: hooks that split one backward's A and B gradients into per-window shares ("Route-C").

For a LoRA branch y = s·B A x̃, the forward hooks keep x̃ (input of A) and u = A x̃ (input of B); tensor hooks on
their outputs receive ∂L/∂u and ∂L/∂(B u) = s·δ during backward. The window shares of the weight gradients are
then grouped matmuls over the tokens of each window's examples:
    c_B[k] = Σ_{t∈k} (s·δ_t) u_tᵀ          c_A[k] = Σ_{t∈k} (∂L/∂u_t) x̃_tᵀ
which sum over k to exactly what autograd puts into B.grad and A.grad. Padding tokens have δ = 0. The vectorized
route of docs/methods/shake_align.md §1.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from loralab.adapters.base import LoraView
from loralab.gradient.votes import BlockVotes

Pieces = list[tuple[int, int, int]]  # (window, start, end) in the current micro-batch's example rows


def owning_module(container: nn.Module, weight: nn.Parameter) -> nn.Module:
    """The sub-module whose `weight` is this parameter (the nn.Linear that holds LoRA's A or B)."""
    for module in container.modules():
        if getattr(module, "weight", None) is weight:
            return module
    raise ValueError("LoRA weight not found in its module")


def window_products(gradient: Tensor, inputs: Tensor, pieces: Pieces, target: Tensor) -> None:
    """target[k] += Σ_{rows of window k} gradientᵀ inputs, summed over every token of those rows."""
    for window, start, end in pieces:
        g = gradient[start:end].reshape(-1, gradient.shape[-1]).float()
        x = inputs[start:end].reshape(-1, inputs.shape[-1]).float()
        target[window].addmm_(g.T, x)


class VoteProbes:
    """Hooks on every LoRA block; while `capture(pieces, buffers)` is active they add window shares to buffers."""

    def __init__(self, views: dict[str, LoraView]) -> None:
        self.pieces: Pieces = []
        self.buffers: dict[str, BlockVotes] = {}
        self.handles: list[RemovableHandle] = []
        for name, view in views.items():
            self.handles.append(owning_module(view.module, view.A).register_forward_hook(self.hook(name, "A")))
            self.handles.append(owning_module(view.module, view.B).register_forward_hook(self.hook(name, "B")))

    def capture(self, pieces: Pieces, buffers: dict[str, BlockVotes]) -> None:
        """Route the next backward's gradients of these example rows into `buffers`."""
        self.pieces, self.buffers = pieces, buffers

    def stop(self) -> None:
        self.pieces, self.buffers = [], {}

    def hook(self, name: str, which: str) -> Callable:
        def forward_hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            if not self.pieces or not torch.is_grad_enabled() or not output.requires_grad:
                return
            inputs, pieces, block = args[0].detach(), self.pieces, self.buffers[name]
            target = block.A if which == "A" else block.B
            output.register_hook(lambda gradient: window_products(gradient, inputs, pieces, target))

        return forward_hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
