"""`method.gradient.kind: grit` — rank-space K-FAC natural gradient with Fisher-guided reprojection (GRIT).

Per optimizer step: every `cov_update_freq`-th backward records Σ_a, Σ_g (rank_stats); the regularizer is in
the loss; `before_step` preconditions each LoRA gradient with the damped inverses; after the step the loss
history adapts damping and periods, inverses are refreshed every `kfac_update_freq` steps and A, B are
projected onto the top-k eigenbases of Σ_a, Σ_g every `reprojection_freq` steps (k from the energy rule).
The math, the defaults and every choice the GRIT paper leaves open: docs/methods/grit.md.
"""

from __future__ import annotations

import logging
import statistics
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from loralab.adapters.base import LoraView
from loralab.adapters.compress import PROJECTORS, peft_module_name, projector_tensors
from loralab.config.schema import GritOptions
from loralab.errors import ConfigError
from loralab.gradient.base import Backward, LossFn, Metrics, RuleDefaults, RuleOutputs
from loralab.gradient.kfac import damped_inverses, eigen_descending, precondition, project_moments
from loralab.gradient.rank_stats import RankStatistics
from loralab.lowrank import energy_rank

log = logging.getLogger("loralab")

LOSS_WINDOW = 20
DAMPING_RANGE = (1e-6, 1e-2)
MAX_KFAC_PERIOD, MAX_REPROJECTION_PERIOD = 1000, 2000


@dataclass
class ModuleState:
    """What GRIT keeps per LoRA module besides its covariances."""

    inverse_a: Tensor | None = None
    inverse_g: Tensor | None = None
    basis_a: Tensor | None = None  # r×k eigenvectors of Σ_a: from the last reprojection, or provisional
    basis_g: Tensor | None = None
    reprojected: bool = False


@dataclass
class Bases:
    """Top-k eigenbases of one module's Σ_a and Σ_g, with the spectra they came from."""

    a: Tensor
    g: Tensor
    eigenvalues_a: Tensor
    eigenvalues_g: Tensor | None


def adaptive_period(base: int, losses: list[float], high: int) -> int:
    """1.5× the base period while the loss still improves (last 10 < 0.99 × previous 10), else 0.75×."""
    if len(losses) < LOSS_WINDOW:
        return base
    previous, recent = statistics.fmean(losses[-20:-10]), statistics.fmean(losses[-10:])
    period = int(1.5 * base) if recent < 0.99 * previous else int(0.75 * base)
    return max(1, min(period, high))


def adaptive_damping(base: float, losses: list[float]) -> float:
    """base λ + the sample std of the loss history (once it holds more than 10 losses), clamped to [1e-6, 1e-2]."""
    if len(losses) <= 10:
        return base
    return min(max(base + statistics.stdev(losses), DAMPING_RANGE[0]), DAMPING_RANGE[1])


class Grit(RuleDefaults):
    """The GRIT gradient rule over any LoRA-like adapter (LoRA, DoRA, dual-rank)."""

    name = "grit"

    def __init__(self, options: GritOptions) -> None:
        self.options = options
        self.clip_first = options.clip_order == "before"  # the published HF integration's order (a quirk)
        self.optimizer: torch.optim.Optimizer | None = None
        self.views: dict[str, LoraView] = {}
        self.rows: list[dict] = []

    # ---- binding ----------------------------------------------------------------------------------

    def attach(self, model: nn.Module, lora_modules: dict[str, LoraView]) -> None:
        if not lora_modules:
            raise ConfigError("method.gradient.kind=grit needs a LoRA-like adapter (lora or dual_rank_lora)")
        self.views = lora_modules
        self.stats = RankStatistics(lora_modules, self.options.cov_ema, self.options.count_padding)
        self.modules = {name: ModuleState() for name in lora_modules}
        self.backwards = 0
        self.steps_done = 0
        self.losses: deque[float] = deque(maxlen=LOSS_WINDOW)
        self.last_inversion = self.last_reprojection = 0
        self.cached_weights: tuple[tuple[int, int], dict[str, tuple[Tensor, Tensor]]] | None = None
        self.bases_version = 0

    def bind_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    # ---- per micro-batch --------------------------------------------------------------------------

    @contextmanager
    def observing(self, batch: dict) -> Iterator[None]:
        """Count one forward+backward; on every `cov_update_freq`-th, hooks add its tokens to Σ_a and Σ_g (a packed
        batch's `token_mask` marks its real tokens, as the attention mask does in a padded one).

        `record_phase` first: backwards 0, n, 2n, … (the first backward counts); last: n−1, 2n−1, … as published.
        """
        period = self.options.cov_update_freq
        record = self.backwards % period == (0 if self.options.record_phase == "first" else period - 1)
        self.backwards += 1
        with self.stats.recording(batch.get("token_mask", batch.get("attention_mask"))) if record else nullcontext():
            yield

    def compute_gradients(self, model: nn.Module, batch: dict, loss_fn: LossFn, backward: Backward) -> Tensor:
        """Loss + regularizer, backward. The regularizer is built before this micro-batch's forward, so Σ_a and Σ_g
        both come from the backwards before it (the published code folds both in during backward)."""
        extra = self.regularizer()
        with self.observing(batch):
            loss = loss_fn(model, batch)
            backward(loss if extra is None else loss + extra)
        return loss.detach()

    def regularizer(self) -> Tensor | None:
        """λ_k Σ_m [tr(Aᵀ Σ_a A) + tr(B Σ_g Bᵀ)] + λ_r Σ_m [‖(I−P_a)A‖² + ‖B(I−P_g)‖²], ramped over warmup.

        Both terms are ⟨M, A Aᵀ⟩ + ⟨M', BᵀB⟩ with constant r×r M = λ_k Σ_a + λ_r (I − P_a), M' likewise,
        so one r×r Gram matrix per factor is all a micro-batch pays.
        """
        warmup = self.options.regularizer_warmup_steps
        ramp = 1.0 if warmup == 0 else min(1.0, self.steps_done / warmup)
        weights = self.regularizer_weights() if ramp > 0 else {}
        if not weights:
            return None
        total = torch.zeros((), device=next(iter(self.views.values())).A.device)
        for name, (weight_a, weight_g) in weights.items():
            A, B = self.views[name].A.float(), self.views[name].B.float()
            total = total + (weight_a * (A @ A.T)).sum() + (weight_g * (B.T @ B)).sum()
        return ramp * total

    def regularizer_weights(self) -> dict[str, tuple[Tensor, Tensor]]:
        """The constant M, M' per module, rebuilt only when the covariances or the bases have changed."""
        key = (self.stats.version, self.bases_version)
        if self.cached_weights is not None and self.cached_weights[0] == key:
            return self.cached_weights[1]
        o, weights = self.options, {}
        if o.lambda_kfac or o.lambda_reproj:
            for name, state in self.modules.items():
                a, g, device = self.stats.a[name], self.stats.g[name], self.views[name].A.device
                weight_a, weight_g = o.lambda_kfac * a.value.to(device), o.lambda_kfac * g.value.to(device)
                if o.lambda_reproj and state.basis_a is not None:
                    weight_a = weight_a + o.lambda_reproj * complement(state.basis_a)
                    weight_g = weight_g + o.lambda_reproj * complement(state.basis_g)
                weights[name] = finite_or_zero(weight_a, weight_g)
        self.cached_weights = (key, weights)
        return weights

    # ---- per optimizer step -----------------------------------------------------------------------

    def before_step(self, step: int) -> Metrics:
        """Replace each LoRA gradient by its natural gradient (once inverses exist and NG warmup is over)."""
        if step < self.options.ng_warmup_steps:
            return {}
        norm_sq = None
        with torch.no_grad():
            for name, view in self.views.items():
                state = self.modules[name]
                if state.inverse_a is None or view.A.grad is None or view.B.grad is None:
                    continue
                grad_A, grad_B = precondition(
                    view.A.grad, view.B.grad, state.inverse_a, state.inverse_g, self.options.pairing
                )
                view.A.grad.copy_(grad_A)
                view.B.grad.copy_(grad_B)
                part = grad_A.square().sum() + grad_B.square().sum()
                norm_sq = part if norm_sq is None else norm_sq + part
        return {} if norm_sq is None else {"grit/ng_grad_norm": norm_sq.sqrt()}  # read only when the step logs

    def after_step(self, step: int, loss: float) -> Metrics:
        """Adapt damping and periods from the loss history; refresh inverses; reproject when due."""
        o = self.options
        self.steps_done = step
        self.losses.append(loss)
        losses = list(self.losses)
        adaptive = o.adaptive
        damping = adaptive_damping(o.kfac_damping, losses) if adaptive and o.adaptive_damping else o.kfac_damping
        kfac_period = adaptive_period(o.kfac_update_freq, losses, MAX_KFAC_PERIOD) if adaptive else o.kfac_update_freq
        reprojection_period = (
            adaptive_period(o.reprojection_freq, losses, MAX_REPROJECTION_PERIOD) if adaptive else o.reprojection_freq
        )
        metrics = {"grit/damping": damping}
        if step - self.last_inversion >= kfac_period:
            metrics |= self.invert(damping, step)
            self.last_inversion = step
        if step >= o.reprojection_warmup_steps and step - self.last_reprojection >= reprojection_period:
            self.reproject(step)
            self.last_reprojection = step
        return metrics | self.rank_metrics()

    def sampled(self, name: str) -> bool:
        """Both covariances of a module rest on at least `kfac_min_samples` tokens."""
        minimum = self.options.kfac_min_samples
        return self.stats.a[name].count >= minimum and self.stats.g[name].count >= minimum

    def invert(self, damping: float, step: int) -> dict[str, float]:
        """Damped inverses of every sufficiently sampled module; provisional bases for the regularizer."""
        inverted, failed, worst = 0, 0, 1.0
        cpu = self.options.kfac_inversion_device == "cpu"
        for name, state in self.modules.items():
            if not self.sampled(name):
                continue
            sigma_a, sigma_g = self.stats.a[name].value, self.stats.g[name].value
            result = damped_inverses(sigma_a.cpu() if cpu else sigma_a, sigma_g.cpu() if cpu else sigma_g, damping)
            if result is None:
                failed += 1
                log.warning("GRIT step %d: every damping rung failed for %s; keeping its old inverse", step, name)
                continue
            state.inverse_a, state.inverse_g = (t.to(sigma_a.device) for t in result[:2])
            inverted, worst = inverted + 1, max(worst, result[2])
            if not state.reprojected:
                bases = self.bases(name, step)
                if bases is not None:
                    state.basis_a, state.basis_g = bases.a, bases.g
                    self.bases_version += 1
        return {
            "grit/inverted": float(inverted),
            "grit/inversion_failures": float(failed),
            "grit/damping_multiple": worst,
        }

    def bases(self, name: str, step: int) -> Bases | None:
        """Top-k eigenbases of Σ_a (and Σ_g when two-sided and sampled); None while Σ_a is unusable."""
        o, a, g = self.options, self.stats.a[name], self.stats.g[name]
        if a.count < o.kfac_min_samples or not a.value.isfinite().all():
            return None
        rank = a.value.shape[0]
        values_a, vectors_a = eigen_descending(a.value)
        adapt = o.enable_rank_adaptation and rank > o.min_lora_rank and step >= o.rank_adaptation_start_step
        k = (
            energy_rank(values_a, o.rank_adaptation_threshold, o.min_lora_rank, rank)
            if adapt
            else min(o.reprojection_k, rank)
        )
        if o.use_two_sided_reprojection and g.count >= o.kfac_min_samples and g.value.isfinite().all():
            values_g, vectors_g = eigen_descending(g.value)
            return Bases(vectors_a[:, :k], vectors_g[:, :k], values_a, values_g)
        return Bases(vectors_a[:, :k], vectors_a[:, :k], values_a, None)

    def reproject(self, step: int) -> None:
        """A ← V_a V_aᵀ A and B ← B V_g V_gᵀ per module (and Adam's moments with them); log k and spectra."""
        for name, view in self.views.items():
            bases = self.bases(name, step)
            if bases is None:
                continue
            state = self.modules[name]
            state.basis_a, state.basis_g, state.reprojected = bases.a, bases.g, True
            project_a, project_g = bases.a @ bases.a.T, bases.g @ bases.g.T
            with torch.no_grad():
                view.A.copy_((project_a @ view.A.float()).to(view.A.dtype))
                view.B.copy_((view.B.float() @ project_g).to(view.B.dtype))
                if self.options.reproject_optimizer_state and self.optimizer is not None:
                    project_moments(self.optimizer.state.get(view.A, {}), project_a, "left")
                    project_moments(self.optimizer.state.get(view.B, {}), project_g, "right")
            self.rows.append(self.row(step, name, bases))
        self.bases_version += 1

    def rank_metrics(self) -> dict[str, float]:
        """Parameter reduction 1 − Σ k_m(d_in+d_out) / Σ r(d_in+d_out) and mean k, once a module is reprojected."""
        if not any(state.reprojected for state in self.modules.values()):
            return {}
        ranks = self.ranks().values()
        full = sum(r["r"] * r["width"] for r in ranks)
        kept = sum(r["k_a"] * r["width"] for r in ranks)
        return {"grit/param_reduction": 1 - kept / full, "grit/mean_k": statistics.fmean(r["k_a"] for r in ranks)}

    def row(self, step: int, name: str, bases: Bases) -> dict:
        """One grit.csv row: the module's rank and k, and the top eigenvalues of Σ_a and Σ_g."""
        count = min(self.options.log_top_eigs, bases.eigenvalues_a.numel())
        g = bases.eigenvalues_g
        return {
            "step": step,
            "module": peft_module_name(name),
            "r": bases.a.shape[0],
            "k": bases.a.shape[1],
            "two_sided": g is not None,
            **{f"eig_a_{i}": float(bases.eigenvalues_a[i]) for i in range(count)},
            **{f"eig_g_{i}": float(g[i]) if g is not None else float("nan") for i in range(count)},
        }

    def ranks(self) -> dict[str, dict[str, int]]:
        """Per module: rank r, kept ranks k_a, k_g (r where never reprojected), and d_in + d_out."""
        result = {}
        for name, view in self.views.items():
            state, rank = self.modules[name], view.A.shape[0]
            k_a = state.basis_a.shape[1] if state.reprojected else rank
            k_g = state.basis_g.shape[1] if state.reprojected else rank
            result[name] = {"r": rank, "k_a": k_a, "k_g": k_g, "width": view.A.shape[1] + view.B.shape[0]}
        return result

    def diagnostics(self) -> list[dict]:
        rows, self.rows = self.rows, []
        return rows

    # ---- outputs and resume -----------------------------------------------------------------------

    def outputs(self) -> RuleOutputs:
        """grit_ranks.json; the bases beside the saved adapter; the compressed adapter when asked for."""
        ranks = {peft_module_name(n): {k: v for k, v in r.items() if k != "width"} for n, r in self.ranks().items()}
        bases = {peft_module_name(n): (s.basis_a, s.basis_g) for n, s in self.modules.items() if s.reprojected}
        return RuleOutputs(
            json_files={"grit_ranks.json": ranks},
            adapter_tensors={PROJECTORS: projector_tensors(bases)},
            compressed_adapter=self.options.export_compressed,
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "stats": self.stats.state_dict(),
            "modules": {n: vars(s).copy() for n, s in self.modules.items()},
            "backwards": self.backwards,
            "steps_done": self.steps_done,
            "losses": list(self.losses),
            "last_inversion": self.last_inversion,
            "last_reprojection": self.last_reprojection,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stats.load_state_dict(state["stats"])
        self.modules = {n: ModuleState(**s) for n, s in state["modules"].items()}
        self.backwards, self.steps_done = int(state["backwards"]), int(state["steps_done"])
        self.losses = deque(state["losses"], maxlen=LOSS_WINDOW)
        self.last_inversion, self.last_reprojection = int(state["last_inversion"]), int(state["last_reprojection"])
        self.bases_version += 1


def finite_or_zero(weight_a: Tensor, weight_g: Tensor) -> tuple[Tensor, Tensor]:
    """A module's regularizer weights, or zeros (the module left out) where either is not finite: decided on the
    device, since the weights are refreshed after every recording and a host read would wait for it. Before any
    recording Σ is zero, so an unsampled module adds nothing either."""
    finite = weight_a.isfinite().all() & weight_g.isfinite().all()
    return torch.where(finite, weight_a, 0.0), torch.where(finite, weight_g, 0.0)


def complement(basis: Tensor) -> Tensor:
    """I − V Vᵀ: the projector onto the directions a reprojection removes."""
    return torch.eye(basis.shape[0], dtype=basis.dtype, device=basis.device) - basis @ basis.T
