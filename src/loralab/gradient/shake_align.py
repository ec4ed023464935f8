"""`method.gradient.kind: shake_align` — Gradient Shake-to-Align on a dual-rank LoRA.

Per optimizer step ("diagnosis before correction"): capture per-window votes (one backward with probes, or one
backward per window), compute C_r, C_R, A_b per block from the buffered votes, smooth them over steps, trigger
the worst blocks, then correct those blocks' `.grad` in place: magnitude (A), direction (B), joint blend (C).
`compat: upstream` reproduces the published scaffold's Σ_k v_k gradient (task head included), additive 1e-8 guards,
g_r tiling and unit-norm blend, on its route (one backward per window). The math, every default and each choice
where the paper is silent: docs/methods/shake_align.md.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from loralab import collectives
from loralab.adapters.base import LoraView
from loralab.config.schema import HistoryOptions, ShakeAlignOptions, TriggerOptions
from loralab.errors import ConfigError
from loralab.gradient.base import Backward, LossFn, Metrics, RuleDefaults
from loralab.gradient.probes import Pieces, VoteProbes
from loralab.gradient.votes import (
    BlockVotes,
    C2Stats,
    c2_values,
    flatten_parts,
    guard,
    inverse_weights,
    loss_units,
    unflatten_parts,
    vote_matrix,
    vote_windows,
)

AGREEMENT_SLACK = 1e-6  # Σ w_k sign(v_k) of unanimous votes is 1 up to fp32 rounding


class StatsHistory:
    """Smoothed C2 statistics per block: a weighted window of recent steps, or an EMA when the window is off."""

    def __init__(self, options: HistoryOptions, ema_H: int) -> None:
        self.options, self.ema_alpha = options, 2.0 / (ema_H + 1)
        self.windows: dict[str, deque[C2Stats]] = {}
        self.ema: dict[str, C2Stats] = {}

    def update(self, block: str, fresh: C2Stats) -> C2Stats:
        if not self.options.enabled:
            previous = self.ema.get(block)
            a = self.ema_alpha
            self.ema[block] = fresh if previous is None else combine([previous, fresh], [1 - a, a])
            return self.ema[block]
        recent = self.windows.setdefault(block, deque(maxlen=self.options.window_steps))
        recent.append(fresh)
        return combine(list(recent), self.weights(len(recent)))

    def weights(self, n: int) -> list[float]:
        """Normalised weights of the last n steps, oldest first: β^(n−1−i), uniform, or 1..n."""
        if self.options.weighting == "exp":
            raw = [self.options.exp_beta ** (n - 1 - i) for i in range(n)]
        elif self.options.weighting == "uniform":
            raw = [1.0] * n
        else:
            raw = [float(i + 1) for i in range(n)]
        total = sum(raw)
        return [w / total for w in raw]

    def state_dict(self) -> dict[str, Any]:
        return {
            "windows": {b: [list(asdict(s).values()) for s in q] for b, q in self.windows.items()},
            "ema": {b: list(asdict(s).values()) for b, s in self.ema.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.windows = {
            b: deque((C2Stats(*v) for v in values), maxlen=self.options.window_steps)
            for b, values in state["windows"].items()
        }
        self.ema = {b: C2Stats(*v) for b, v in state["ema"].items()}


def combine(stats: list[C2Stats], weights: list[float]) -> C2Stats:
    return C2Stats(
        *(sum(w * getattr(s, f) for s, w in zip(stats, weights, strict=True)) for f in ("C_r", "C_R", "A_b"))
    )


def triggered_blocks(values: dict[str, float], options: TriggerOptions) -> set[str]:
    """Blocks to correct: badness (−value, or +value for misalign) at or beyond the percentile, or past a threshold."""
    misalign = options.metric == "misalign"
    if options.mode == "threshold":
        return {b for b, v in values.items() if (v >= options.threshold if misalign else v <= options.threshold)}
    badness = {b: (v if misalign else -v) for b, v in values.items()}
    cut = float(np.percentile(list(badness.values()), options.percentile_p))
    return {b for b, bad in badness.items() if bad >= cut}


def sigmoid(x: float) -> float:
    return 0.5 * (1.0 + math.tanh(0.5 * x))


def clip(value: float, low: float, high: float) -> float:
    return min(max(value, low), high)


@dataclass(frozen=True)
class Coefficients:
    """Gates and the correction strengths of one triggered block."""

    w_insuf: float
    w_over: float
    w_noise: float
    alpha_r: float
    alpha_hi: float
    beta_r: float
    beta_hi: float
    rho: float

    @classmethod
    def of(cls, stats: C2Stats, o: ShakeAlignOptions) -> Coefficients:
        delta = stats.C_R - stats.C_r
        w_insuf, w_over, w_noise = sigmoid(o.k * delta), sigmoid(-o.k * delta), 1.0 - max(stats.C_r, stats.C_R)
        return cls(
            w_insuf=w_insuf,
            w_over=w_over,
            w_noise=w_noise,
            alpha_r=clip(1 - o.lambda_n * w_noise, o.alpha_min, 1.0),
            alpha_hi=clip(1 - o.lambda_n * w_noise - o.lambda_o * w_over, o.alpha_min, 1.0),
            beta_r=clip(o.gamma_r * w_insuf, 0.0, o.beta_max),
            beta_hi=clip(o.gamma_hi * w_over, 0.0, o.beta_max),
            rho=clip(o.eta * w_noise, 0.0, o.rho_max),
        )


def correct(
    g_r: Tensor,
    g_hi: Tensor,
    c: Coefficients,
    consensus_r: Tensor,
    consensus_hi: Tensor | None,
    mode: str,
    upstream: bool,
) -> tuple[Tensor, Tensor]:
    """(A) magnitude (mode `both`), (B) direction toward the consensus, (C) joint blend; returns new (g_r, g_hi).

    `consensus_hi` None means the scaffold's target for the extension: g_r tiled to g_hi's length.
    """
    if mode == "both":
        g_r, g_hi = c.alpha_r * g_r, c.alpha_hi * g_hi
    g_r = (1 - c.beta_r) * g_r + c.beta_r * consensus_r
    target_hi = (
        g_r.repeat(math.ceil(g_hi.numel() / g_r.numel()))[: g_hi.numel()] if consensus_hi is None else consensus_hi
    )
    g_hi = (1 - c.beta_hi) * g_hi + c.beta_hi * target_hi
    if c.rho > 1e-3:
        z_r, z_hi = joint_direction(g_r, g_hi, upstream)
        g_r, g_hi = (1 - c.rho) * g_r + c.rho * z_r, (1 - c.rho) * g_hi + c.rho * z_hi
    return g_r, g_hi


def joint_direction(g_r: Tensor, g_hi: Tensor, upstream: bool) -> tuple[Tensor, Tensor]:
    """z = z₁ + λ z₂ with z₁ = (g_r, 0), z₂ = (0, g_hi), λ = clamp((z₁·z₁ − z₁·z₂)/(z₂·z₂ − z₁·z₂), 0, 1).

    z₁ ⟂ z₂ (disjoint supports), so z₁·z₂ = 0. `fixed` rescales z to the norm of (g_r, g_hi); the scaffold
    made it unit length. Both denominators take the compat mode's guard.
    """
    # float64 0-dim tensors on the device: the same IEEE operations as on host floats, without reading them back
    g11, g22 = g_r.square().sum().double(), g_hi.square().sum().double()
    lam = (g11 / guard(g22, upstream)).clamp(0.0, 1.0)
    z_norm = (g11 + lam * lam * g22).sqrt()
    scale = (1.0 if upstream else (g11 + g22).sqrt()) / guard(z_norm, upstream)
    return g_r * scale.to(g_r.dtype), g_hi * (lam * scale).to(g_hi.dtype)


class ShakeAlign(RuleDefaults):
    """The GradientRule: vote capture in `compute_gradients`, statistics and correction in `before_step`."""

    name = "shake_align"
    reads_in_before_step = True

    def __init__(self, options: ShakeAlignOptions) -> None:
        self.o = options
        self.upstream = options.compat == "upstream"
        self.history = StatsHistory(options.history, options.ema_H)
        self.views: dict[str, LoraView] = {}
        self.others: list[nn.Parameter] = []
        self.probes: VoteProbes | None = None
        self.windows: list[tuple[int, int]] = []
        self.buffers: dict[str, BlockVotes] = {}
        self.units = torch.zeros(0, dtype=torch.float64)  # per window: Σ over pieces of rows × loss-unit share
        self.other_votes: list[Tensor] = []  # upstream: per-window shares of the other trainable parameters' gradients
        self.seen = 0
        self.rows: list[dict] = []
        self.layout: tuple[int, Tensor] | None = None

    def attach(self, model: nn.Module, lora_modules: dict[str, LoraView]) -> None:
        if not lora_modules or any(view.split is None for view in lora_modules.values()):
            raise ConfigError("method.gradient.kind=shake_align needs a dual-rank LoRA adapter (no split found)")
        self.views = lora_modules
        lora = {id(p) for view in lora_modules.values() for p in (view.A, view.B)}
        self.others = [p for p in model.parameters() if p.requires_grad and id(p) not in lora]
        if self.o.route == "vectorized" and not self.upstream:  # upstream needs each window's task-head gradient
            self.probes = VoteProbes(lora_modules)

    # ---- capture ---------------------------------------------------------------------------------

    def begin_step(self, examples: int) -> None:
        self.windows = vote_windows(examples, self.o.samples_per_vote, self.o.allow_tail)
        self.buffers = self.zeroed_buffers(len(self.windows))
        device = next(iter(self.views.values())).A.device
        self.units = torch.zeros(len(self.windows), dtype=torch.float64, device=device)
        if self.upstream:
            self.other_votes = [torch.zeros((len(self.windows), *p.shape), device=p.device) for p in self.others]
        self.seen = 0

    def zeroed_buffers(self, windows: int) -> dict[str, BlockVotes]:
        """Zeroed vote buffers for `windows` windows: the last step's, zeroed in place, when the count is the same
        (nothing outlives a step in them; allocating V copies of every block's A and B each step cost more)."""
        if self.buffers.keys() != self.views.keys() or any(b.A.shape[0] != windows for b in self.buffers.values()):
            return {name: BlockVotes.zeros(windows, view.A, view.B, view.split) for name, view in self.views.items()}
        for block in self.buffers.values():
            block.A.zero_()
            block.B.zero_()
        return self.buffers

    def locate(self, row: int) -> None:
        self.seen = row

    def pieces(self, rows: int) -> Pieces:
        """The windows the next `rows` examples of the batch fall into, as (window, start, end) in the micro-batch."""
        first, last = self.seen, self.seen + rows
        self.seen = last
        return [
            (k, max(start, first) - first, min(end, last) - first)
            for k, (start, end) in enumerate(self.windows)
            if max(start, first) < min(end, last)
        ]

    def compute_gradients(self, model: nn.Module, batch: dict, loss_fn: LossFn, backward: Backward) -> Tensor:
        pieces = self.pieces(batch["labels"].shape[0])
        shares = self.loss_shares(batch, pieces)
        if self.probes is not None:
            self.probes.capture(pieces, self.buffers)
            try:
                loss = loss_fn(model, batch)
                backward(loss)
            finally:
                self.probes.stop()
            return loss.detach()
        total = 0.0
        for (window, start, end), share in zip(pieces, shares, strict=True):
            if share == 0:
                continue
            loss = loss_fn(model, {key: value[start:end] for key, value in batch.items()})
            backward(loss * share)
            self.take_window_gradients(window)
            total = total + share * loss.detach()
        return torch.as_tensor(total)

    def loss_shares(self, batch: dict, pieces: Pieces) -> list[float | Tensor]:
        """Each piece's share of the micro-batch's loss (of its examples, or of its predicted tokens for a causal LM),
        and add rows × share to the piece's window in `units`: normalised over the step, that is the window's weight
        w_k, its share of the batch loss (micro-batches are weighted by their rows, in the loop and in the HF trainer).
        """
        units = loss_units(batch)
        units = units.double().clamp_min(1) if isinstance(units, Tensor) else max(units, 1)  # none: zero shares, no NaN
        shares = [loss_units({"labels": batch["labels"][start:end]}) / units for _, start, end in pieces]
        for (window, _, _), share in zip(pieces, shares, strict=True):
            self.units[window] += batch["labels"].shape[0] * share
        return shares

    @torch.no_grad()
    def take_window_gradients(self, window: int) -> None:
        """Move one window's LoRA gradients out of `.grad` into its vote buffer (the scaffold's safe route); upstream,
        the other trainable parameters' gradients too, since the scaffold's task head gets Σ_k of window means."""
        for name, view in self.views.items():
            for param, target in ((view.A, self.buffers[name].A), (view.B, self.buffers[name].B)):
                if param.grad is not None:
                    target[window].add_(param.grad.float())
                    param.grad = None
        for param, target in zip(self.others, self.other_votes, strict=False):
            if param.grad is not None:
                target[window].add_(param.grad.float())
                param.grad = None

    # ---- diagnosis, then correction ----------------------------------------------------------------

    def window_weights(self) -> Tensor:
        """w_k: each window's share of the step's loss, on the device (float64, Σ_k w_k = 1)."""
        return self.units / self.units.sum()

    def vote_rows(self) -> Tensor:
        """The vote matrix, on the buffers' device; built once per window count (a host-to-device copy every step
        would wait for the device)."""
        if self.layout is None or self.layout[0] != len(self.windows):
            o = self.o
            votes = vote_matrix(len(self.windows), o.keep_single_votes, o.combine_votes, o.combine_size, o.combine_max)
            self.layout = (len(self.windows), votes.to(self.units.device))
        return self.layout[1]

    def before_step(self, step: int) -> Metrics:
        return self.before_step_reading(step, None)[0]

    @torch.no_grad()
    def before_step_reading(self, step: int, guard: Callable[[], Tensor] | None) -> tuple[Metrics, list[float]]:
        """Diagnose every block from the votes and correct the triggered ones; the statistics are read in one
        transfer with the loop's guard (loss and gradient norm before the correction), the step's only read."""
        shared = [t for block in self.buffers.values() for t in (block.A, block.B)] + [self.units, *self.other_votes]
        collectives.all_mean_(shared)  # global votes
        weights, votes = self.window_weights(), self.vote_rows()
        o = self.o
        parts = {name: block.parts(weights) for name, block in self.buffers.items()}
        self.set_batch_gradients(weights)
        if votes.shape[0] < 2:
            skipped = {"shake/skipped": 1.0, "shake/votes": float(votes.shape[0])}
            return skipped, [] if guard is None else guard().tolist()

        statistics = torch.stack(
            [
                c2_values(*(votes @ (m @ m.T).double() @ votes.T for m in part), upstream=self.upstream)
                for part in parts.values()
            ]
        )
        # the statistics of every block, and the guard, in one host read: the trigger and the gates need them
        guarded = statistics.new_zeros(0) if guard is None else guard().to(statistics)  # `.grad`: the batch's
        flat = torch.cat([guarded, statistics.reshape(-1)]).tolist()
        guard_values, rows, width = flat[: guarded.numel()], flat[guarded.numel() :], statistics.shape[1]
        values = [rows[start : start + width] for start in range(0, len(rows), width)]
        if not all(map(math.isfinite, flat)):  # the loop skips this batch: leave the history and .grad as they are
            skipped = {"shake/skipped": 1.0, "shake/votes": float(votes.shape[0])}
            return skipped, guard_values[:1] + [math.nan] * (len(guard_values) - 1)  # a NaN norm: the guard skips
        fresh = {name: C2Stats(*row) for name, row in zip(parts, values, strict=True)}
        smoothed = {name: self.history.update(name, stats) for name, stats in fresh.items()}
        triggered = triggered_blocks({b: s.metric(o.trigger.metric) for b, s in smoothed.items()}, o.trigger)
        applied: dict[str, Coefficients] = {}
        for name in sorted(triggered) if o.correction.mode != "none" else []:
            applied[name] = Coefficients.of(smoothed[name], o)
            self.correct_block(self.views[name], applied[name], *self.consensus(*parts[name], weights, votes))
        if o.debug.every_steps and (step + 1) % o.debug.every_steps == 0:
            self.rows = [
                block_row(step + 1, name, len(self.windows), fresh[name], smoothed[name], applied.get(name))
                for name in self.views
            ]
        return step_metrics(smoothed, triggered, applied, votes.shape[0]), guard_values

    def consensus(
        self, core: Tensor, extension: Tensor, weights: Tensor, votes: Tensor
    ) -> tuple[Tensor, Tensor | None]:
        """ḡ_r = Σ_k w_k v_{k,r}; c_hi = Σ_k w_k v_{k,hi} where the votes agree in sign (upstream: Σ rows, tiling)."""
        if self.upstream:
            return votes.sum(0).to(core) @ core, None
        w = weights.to(core)
        agreement = (w @ extension.sign()).abs() >= self.o.agree_tau - AGREEMENT_SLACK
        return w @ core, (w @ extension) * agreement

    def correct_block(self, view: LoraView, c: Coefficients, consensus_r: Tensor, consensus_hi: Tensor | None) -> None:
        """Rewrite one block's A and B gradients with the corrected (g_r, g_hi)."""
        g_r, g_hi = flatten_parts(view.A.grad.float(), view.B.grad.float(), view.split)
        g_r, g_hi = correct(g_r, g_hi, c, consensus_r, consensus_hi, self.o.correction.mode, self.upstream)
        unflatten_parts(g_r, g_hi, view.A.grad, view.B.grad, view.split)

    def set_batch_gradients(self, weights: Tensor) -> None:
        """`.grad` before correction: Σ_k w_k v_k (already there on the vectorized route), or the scaffold's Σ_k v_k,
        for the other trainable parameters (the task head) as well."""
        if self.probes is not None:
            return
        inverse = inverse_weights(weights)
        blocks = [(view.A, self.buffers[name].A) for name, view in self.views.items()]
        blocks += [(view.B, self.buffers[name].B) for name, view in self.views.items()]
        for param, shares in blocks + list(zip(self.others, self.other_votes, strict=False)):
            if self.upstream:
                shares = shares * inverse.to(shares).view(-1, *[1] * (shares.dim() - 1))
            param.grad = shares.sum(0).to(param.dtype)

    def diagnostics(self) -> list[dict]:
        rows, self.rows = self.rows, []
        return rows

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history.load_state_dict(state["history"])


def block_row(step: int, block: str, windows: int, fresh: C2Stats, smoothed: C2Stats, c: Coefficients | None) -> dict:
    """One row of shake_align.csv: a block's fresh and smoothed statistics and, if corrected, its coefficients."""
    row = {"step": step, "block": block, "windows": windows, "triggered": int(c is not None)}
    row |= {f"fresh_{k}": v for k, v in asdict(fresh).items()} | asdict(smoothed)
    return row | (asdict(c) if c is not None else {f.name: "" for f in fields(Coefficients)})


def step_metrics(
    smoothed: dict[str, C2Stats], triggered: set[str], applied: dict[str, Coefficients], votes: int
) -> dict[str, float]:
    """Per-step summary: mean/min/max of each statistic over blocks, trigger rate, mean coefficients."""
    metrics: dict[str, float] = {"shake/votes": float(votes), "shake/trigger_rate": len(triggered) / len(smoothed)}
    for field in ("C_r", "C_R", "A_b"):
        values = [getattr(s, field) for s in smoothed.values()]
        metrics |= {f"shake/{field}_mean": float(np.mean(values)), f"shake/{field}_min": min(values)}
        metrics[f"shake/{field}_max"] = max(values)
    for field in ("alpha_r", "alpha_hi", "beta_r", "beta_hi", "rho"):
        if applied:
            metrics[f"shake/{field}"] = float(np.mean([getattr(c, field) for c in applied.values()]))
    return metrics
