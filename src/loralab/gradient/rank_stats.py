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
    """A running r×r second moment with its token count: cumulative token-weighted mean, or an EMA."""

    def __init__(self, rank: int, device: torch.device, ema: float | None) -> None:
        self.ema = ema
        self.value = torch.zeros(rank, rank, dtype=torch.float32, device=device)
        self.count = 0

    def add(self, outer_sum: Tensor, tokens: int) -> None:
        """Fold in Σ_t v vᵀ over `tokens` new tokens."""
        if tokens == 0:
            return
        if self.value.device != outer_sum.device:  # attached before the model moved to its device
            self.value = self.value.to(outer_sum.device)
        if self.ema is None:
            self.value.mul_(self.count / (self.count + tokens)).add_(outer_sum, alpha=1 / (self.count + tokens))
        elif self.count == 0:
            self.value.copy_(outer_sum / tokens)
        else:
            self.value.mul_(self.ema).add_(outer_sum, alpha=(1 - self.ema) / tokens)
        self.count += tokens

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value.clone(), "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value.copy_(state["value"])
        self.count = int(state["count"])


def global_moment(values: Tensor) -> tuple[Tensor, int]:
    """Σ_t v vᵀ and the token count over every process's part of the micro-batch (as one process would see it)."""
    if collectives.world_size() == 1:
        return values.T @ values, values.shape[0]
    count = torch.tensor([values.shape[0]], dtype=values.dtype, device=values.device)
    total = collectives.all_sum(torch.cat([(values.T @ values).reshape(-1), count]))
    return total[:-1].view(values.shape[1], values.shape[1]), int(total[-1])


@dataclass(frozen=True)
class KeptTokens:
    """A recorded micro-batch's attention mask ([batch, tokens], bool) and the flat indices of its ones, found once
    per recording rather than by a boolean selection (a device sync on a GPU) in every hook."""

    mask: Tensor
    rows: Tensor

    @classmethod
    def of(cls, attention_mask: Tensor) -> KeptTokens:
        mask = attention_mask.bool()
        return cls(mask, mask.reshape(-1).nonzero().squeeze(1))


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

    def tokens(self, values: Tensor, keep: KeptTokens | None) -> Tensor:
        """The rows of a [..., d] activation that count: all, or those under attention mask 1 ([batch, tokens]).

        A layer that sees one row per example (a pooler on the first token) counts every row.
        """
        rows = values.reshape(-1, values.shape[-1])
        if keep is None or rows.shape[0] == keep.mask.shape[0]:
            return rows
        if keep.mask.numel() != rows.shape[0]:
            if not self.warned:
                log.warning("GRIT: LoRA activations do not line up with the attention mask; counting every token")
                self.warned = True
            return rows
        return rows.index_select(0, keep.rows)

    def forward_hook(self, name: str, view: LoraView) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> None:
            # once per pass: a checkpointed block runs its forward again during backward
            if not torch.is_grad_enabled() or name in self.seen or not output.requires_grad:
                return
            self.seen.add(name)
            x, keep = (args[0] if args else kwargs["x"]), self.keep
            with torch.no_grad():
                u = self.tokens(x.detach(), keep).float() @ view.A.detach().float().T
                self.a[name].add(*global_moment(u))
            output.register_hook(lambda gradient: self.add_gradient(name, view, gradient, keep))

        return hook

    def add_gradient(self, name: str, view: LoraView, gradient: Tensor, keep: KeptTokens | None) -> None:
        with torch.no_grad():
            q = self.tokens(gradient, keep).float() @ view.B.detach().float()
            self.g[name].add(*global_moment(q))

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
