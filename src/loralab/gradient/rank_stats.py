"""Rank-space covariances of LoRA modules from hooks: Σ_a = mean u uᵀ (u = A x) and Σ_g = mean q qᵀ (q = Bᵀ g).

x is the LoRA layer's input (before dropout) and g = ∂L/∂y its output gradient; both are r×r and kept in
float32, since Σ_g underflows in half precision while B ≈ 0. Only tokens whose attention mask is 1 count,
unless padding is counted on purpose. Hooks exist only during a `recording` pass, so other steps pay nothing.
Under data parallelism each recorded moment is summed over processes before it is folded in, so every process
holds the statistics of the whole micro-batch. GRIT's component (1): docs/methods/grit.md §1.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from loralab import collectives
from loralab.adapters.base import LoraView

log = logging.getLogger("loralab")


class RunningCovariance:
    """A running r×r second moment with its token count: cumulative token-weighted mean, or an EMA. The count lives
    on the device beside the moment, so folding in a micro-batch never reads a value back to the host."""

    def __init__(self, rank: int, device: torch.device, ema: float | None) -> None:
        self.ema = ema
        self.value = torch.zeros(rank, rank, dtype=torch.float32, device=device)
        self.tokens = torch.zeros((), dtype=torch.float64, device=device)

    @property
    def count(self) -> int:
        """Tokens folded in so far (one host read: for inversion steps and checkpoints, not for every micro-batch)."""
        return int(self.tokens)

    def add(self, outer_sum: Tensor, tokens: Tensor | int) -> None:
        """Fold in Σ_t v vᵀ over `tokens` new tokens (none: nothing changes)."""
        if self.value.device != outer_sum.device:  # attached before the model moved to its device
            self.value, self.tokens = self.value.to(outer_sum.device), self.tokens.to(outer_sum.device)
        if not isinstance(tokens, Tensor):
            tokens = self.tokens.new_full((), tokens)  # a fill on the device, not a host-to-device copy
        total = self.tokens + tokens
        if self.ema is None:  # the mean over every token so far: old mean × old share + new sum / total
            denominator = total.clamp_min(1)
            self.value.mul_((self.tokens / denominator).float()).add_(outer_sum * (1 / denominator).float())
        else:  # the first tokens set the moment, later ones blend in; a micro-batch without tokens changes nothing
            mean = outer_sum / tokens.clamp_min(1).float()
            blended = torch.where(self.tokens == 0, mean, self.value * self.ema + mean * (1 - self.ema))
            self.value.copy_(torch.where(tokens > 0, blended, self.value))
        self.tokens = total

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value.clone(), "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value.copy_(state["value"])
        self.tokens = torch.full((), float(state["count"]), dtype=torch.float64, device=self.value.device)


def global_moment(values: Tensor, count: Tensor | int) -> tuple[Tensor, Tensor | int]:
    """Σ_t v vᵀ and the token count over every process's part of the micro-batch (as one process would see it)."""
    if collectives.world_size() == 1:
        return values.T @ values, count
    count = count.reshape(1).to(values.dtype) if isinstance(count, Tensor) else values.new_full((1,), count)
    total = collectives.all_sum(torch.cat([(values.T @ values).reshape(-1), count]))
    return total[:-1].view(values.shape[1], values.shape[1]), total[-1]


@dataclass(frozen=True)
class KeptTokens:
    """A recorded micro-batch's attention mask ([batch, tokens], bool), as a flat float weight per token (1 kept, 0
    padding) and the kept count, both on the device: selecting the kept rows (`nonzero`, a boolean index) would
    read the mask back to the host on a GPU."""

    mask: Tensor
    weights: Tensor
    count: Tensor

    @classmethod
    def of(cls, attention_mask: Tensor) -> KeptTokens:
        mask = attention_mask.bool()
        weights = mask.reshape(-1).float()
        return cls(mask, weights, weights.sum(dtype=torch.float64))


class RankStatistics:
    """Σ_a and Σ_g of every LoRA module; `recording(mask)` adds one forward/backward's tokens to them."""

    def __init__(self, views: dict[str, LoraView], ema: float | None, count_padding: bool) -> None:
        self.views, self.count_padding = views, count_padding
        self.a = {n: RunningCovariance(v.A.shape[0], v.A.device, ema) for n, v in views.items()}
        self.g = {n: RunningCovariance(v.A.shape[0], v.A.device, ema) for n, v in views.items()}
        self.version = 0  # bumped by every recording, so cached functions of Σ know when to refresh
        self.keep: KeptTokens | None = None
        self.seen: set[str] = set()
        self.warned = False

    @contextmanager
    def recording(self, attention_mask: Tensor | None) -> Iterator[None]:
        """Hooks on every LoRA layer for the forward and backward run inside this block."""
        self.keep = None if self.count_padding or attention_mask is None else KeptTokens.of(attention_mask)
        self.seen = set()
        handles = [
            view.module.register_forward_hook(self.forward_hook(name, view), with_kwargs=True)
            for name, view in self.views.items()
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            self.keep = None
            self.version += 1

    def counted(self, rows: Tensor, keep: KeptTokens | None) -> tuple[Tensor, Tensor | int]:
        """Rank-space rows ([n, r], one per token) with the padding rows zeroed, and how many count: all, or those
        under attention mask 1. A layer that sees one row per example (a pooler on the first token) counts every row.
        """
        if keep is None or rows.shape[0] == keep.mask.shape[0]:
            return rows, rows.shape[0]
        if keep.mask.numel() != rows.shape[0]:
            if not self.warned:
                log.warning("GRIT: LoRA activations do not line up with the attention mask; counting every token")
                self.warned = True
            return rows, rows.shape[0]
        return rows * keep.weights.unsqueeze(1), keep.count

    def forward_hook(self, name: str, view: LoraView) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> None:
            # once per pass: a checkpointed block runs its forward again during backward
            if not torch.is_grad_enabled() or name in self.seen or not output.requires_grad:
                return
            self.seen.add(name)
            x, keep = (args[0] if args else kwargs["x"]), self.keep
            with torch.no_grad():
                u = x.detach().reshape(-1, x.shape[-1]).float() @ view.A.detach().float().T
                self.a[name].add(*global_moment(*self.counted(u, keep)))
            output.register_hook(lambda gradient: self.add_gradient(name, view, gradient, keep))

        return hook

    def add_gradient(self, name: str, view: LoraView, gradient: Tensor, keep: KeptTokens | None) -> None:
        with torch.no_grad():
            q = gradient.reshape(-1, gradient.shape[-1]).float() @ view.B.detach().float()
            self.g[name].add(*global_moment(*self.counted(q, keep)))

    def state_dict(self) -> dict[str, Any]:
        return {
            "a": {n: c.state_dict() for n, c in self.a.items()},
            "g": {n: c.state_dict() for n, c in self.g.items()},
            "version": self.version,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, covariance in self.a.items():
            covariance.load_state_dict(state["a"][name])
        for name, covariance in self.g.items():
            covariance.load_state_dict(state["g"][name])
        self.version = int(state["version"])
