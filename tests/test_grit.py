"""GRIT on a tiny RoBERTa: covariances against dense references, preconditioning and damping escalation against
explicit inverses, reprojection and Adam-moment projection, regularizers, the adaptive schedule, the step order
of the real loop, compressed export through plain PEFT, exact resume."""

from __future__ import annotations

import copy
import json
import math
import shutil

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from conftest import QUIET, assert_close_scaled, grit_parts, train_parts
from conftest import grit_config as config_for
from loralab.adapters.compress import PROJECTORS, compress_adapter, peft_module_name
from loralab.config import load_config
from loralab.config.load import packaged_experiment
from loralab.data.collate import collate
from loralab.gradient.grit import adaptive_damping, adaptive_period
from loralab.gradient.kfac import damped_inverses
from loralab.gradient.rank_stats import RankStatistics
from loralab.lowrank import energy_rank, thin_svd
from loralab.models import load_model
from loralab.training.checkpoint import list_checkpoints
from loralab.training.recipe import prepare, run_training

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")

NEVER = ["method.gradient.kfac_update_freq=100000", "method.gradient.reprojection_freq=100000"]


def padded_batch(parts, size: int = 6, start: int = 0) -> dict:
    batch = collate(parts.features[start : start + size], 1)
    assert (batch["attention_mask"] == 0).any(), "the batch must contain padding"
    return batch


def spd(rank: int, seed: int, spectrum: list[float] | None = None) -> torch.Tensor:
    """A symmetric positive definite r×r matrix, with a given spectrum if asked."""
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(rank, rank, generator=generator, dtype=torch.float64))
    random = torch.rand(rank, generator=generator, dtype=torch.float64) + 0.1
    values = torch.tensor(spectrum, dtype=torch.float64) if spectrum else random
    return (q @ torch.diag(values) @ q.T).float()


def set_covariances(rule, seed: int = 0, count: int = 10_000, spectrum_a=None, spectrum_g=None) -> None:
    for i, name in enumerate(rule.views):
        rank = rule.views[name].A.shape[0]
        for j, (covariance, spectrum) in enumerate(
            ((rule.stats.a[name], spectrum_a), (rule.stats.g[name], spectrum_g))
        ):
            covariance.value.copy_(spd(rank, seed + 2 * i + j, spectrum))
            covariance.tokens.fill_(count)
    rule.stats.version += 1


class Captures:
    """Independent capture: each LoRA layer's input (pre-hook) and output gradient (full backward hook)."""

    def __init__(self, views) -> None:
        self.inputs, self.grads, self.handles = {}, {}, []
        for name, view in views.items():
            self.handles.append(view.module.register_forward_pre_hook(self.keep_input(name)))
            self.handles.append(view.module.register_full_backward_hook(self.keep_grad(name)))

    def keep_input(self, name):
        return lambda module, args: self.inputs.__setitem__(name, args[0].detach().double())

    def keep_grad(self, name):
        return lambda module, grad_input, grad_output: self.grads.__setitem__(name, grad_output[0].detach().double())

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def dense_reference(view, x, g, keep):
    """Σ u uᵀ and Σ q qᵀ in float64 over the kept tokens, with their count."""
    x, g = x.reshape(-1, x.shape[-1])[keep], g.reshape(-1, g.shape[-1])[keep]
    u, q = x @ view.A.detach().double().T, g @ view.B.detach().double()
    return u.T @ u, q.T @ q, int(keep.sum())


@pytest.mark.parametrize("count_padding", [False, True])
def test_covariances_equal_dense_references_over_two_recordings(tmp_path, count_padding):
    parts = grit_parts(tmp_path, "method.adapter.dropout=0.3")  # Σ_a uses the input before dropout
    parts.model.train()
    stats = RankStatistics(parts.rule.views, ema=None, count_padding=count_padding)
    captures = Captures(parts.rule.views)
    sums: dict[str, list] = {}
    for start in (0, 6):
        batch = padded_batch(parts, start=start)
        with stats.recording(batch["attention_mask"]):
            parts.model(**batch).loss.backward()
        keep = batch["attention_mask"].reshape(-1).bool() | count_padding
        for name, view in parts.rule.views.items():
            a, g, n = dense_reference(view, captures.inputs[name], captures.grads[name], keep)
            previous = sums.get(name, [0, 0, 0])
            sums[name] = [previous[0] + a, previous[1] + g, previous[2] + n]
        parts.model.zero_grad()
    captures.remove()
    for name in parts.rule.views:
        sum_a, sum_g, tokens = sums[name]
        assert stats.a[name].count == stats.g[name].count == tokens
        assert_close_scaled(stats.a[name].value, sum_a / tokens)
        assert_close_scaled(stats.g[name].value, sum_g / tokens)
        assert stats.g[name].value.abs().max() > 0


def published_tick_records(backward: int, period: int) -> bool:
    """The published hook: a per-module tick counts backwards from 1 and records when tick % period == 0."""
    return (backward + 1) % period == 0


@pytest.mark.parametrize(("phase", "expected"), [("first", [0, 3, 6]), ("last", [2, 5])])
def test_ema_estimate_and_which_backwards_record(tmp_path, phase, expected):
    overrides = ("method.gradient.cov_ema=0.75", "method.gradient.cov_update_freq=3", *QUIET)
    parts = grit_parts(tmp_path, *overrides, f"method.gradient.record_phase={phase}")
    rule, model = parts.rule, parts.model
    captures = Captures(rule.views)
    recorded, count = {}, 0
    for index in range(8):
        batch = padded_batch(parts, start=6 * index)
        rule.compute_gradients(model, batch, lambda m, b: m(**b).loss, lambda loss: loss.backward())
        if rule.stats.a[next(iter(rule.views))].count != count:  # this backward was recorded
            count = rule.stats.a[next(iter(rule.views))].count
            keep = batch["attention_mask"].reshape(-1).bool()
            recorded[index] = {
                n: dense_reference(v, captures.inputs[n], captures.grads[n], keep) for n, v in rule.views.items()
            }
        model.zero_grad()
    captures.remove()
    assert sorted(recorded) == expected
    if phase == "last":
        assert expected == [i for i in range(8) if published_tick_records(i, 3)]
    for name in rule.views:
        (a1, _, n1), (a2, _, n2) = recorded[expected[0]][name], recorded[expected[1]][name]
        expected_a = 0.75 * a1 / n1 + 0.25 * a2 / n2
        if len(expected) == 3:
            a3, _, n3 = recorded[expected[2]][name]
            expected_a = 0.75 * expected_a + 0.25 * a3 / n3
        assert rule.stats.a[name].count == sum(recorded[i][name][2] for i in expected)
        assert_close_scaled(rule.stats.a[name].value, expected_a)


def test_regularizer_reads_both_factors_from_the_backwards_before_the_micro_batch(tmp_path):
    """Σ_a and Σ_g in the λ_kfac term are both the statistics recorded up to the previous backward, though this
    micro-batch's forward would already have updated Σ_a (the published code folds both in during backward)."""
    lam = 5.0
    overrides = ("method.gradient.cov_update_freq=1", f"method.gradient.lambda_kfac={lam}", *NEVER)
    parts = grit_parts(tmp_path, *overrides, "method.gradient.lambda_reproj=0", "method.gradient.adaptive=false")
    rule, model = parts.rule, parts.model
    first, second = padded_batch(parts), padded_batch(parts, start=6)
    rule.compute_gradients(model, first, lambda m, b: m(**b).loss, lambda loss: loss.backward())
    before = {n: (rule.stats.a[n].value.double().clone(), rule.stats.g[n].value.double().clone()) for n in rule.views}
    model.zero_grad()
    model(**second).loss.backward()  # the plain loss's gradient, without the rule's hooks
    plain = {n: (v.A.grad.double().clone(), v.B.grad.double().clone()) for n, v in rule.views.items()}
    model.zero_grad()
    rule.compute_gradients(model, second, lambda m, b: m(**b).loss, lambda loss: loss.backward())
    assert rule.stats.a[next(iter(rule.views))].count > 0
    mixed_apart = 0.0
    for name, view in rule.views.items():
        A, B = view.A.detach().double(), view.B.detach().double()
        sigma_a, sigma_g = before[name]
        # d/dA λ tr(Aᵀ Σ_a A) = 2λ Σ_a A and d/dB λ tr(B Σ_g Bᵀ) = 2λ B Σ_g (Σ symmetric)
        expected_A, expected_B = plain[name][0] + 2 * lam * sigma_a @ A, plain[name][1] + 2 * lam * B @ sigma_g
        assert_close_scaled(view.A.grad, expected_A, rel=1e-4)
        assert_close_scaled(view.B.grad, expected_B, rel=1e-4)
        mixed_A = plain[name][0] + 2 * lam * rule.stats.a[name].value.double() @ A  # Σ_a after this forward
        mixed_apart = max(mixed_apart, float((mixed_A - expected_A).abs().max() / expected_A.abs().max()))
    assert mixed_apart > 1e-2  # the other reading is distinguishable


ADAPTERS = {
    "lora": [],
    "dora": ["method.adapter.use_dora=true"],
    "dual_rank": ["method.adapter.kind=dual_rank_lora", "method.adapter.r=2", "method.adapter.R=8"],
}


@pytest.mark.parametrize("adapter", sorted(ADAPTERS))
@pytest.mark.parametrize("pairing", ["grit", "kfac"])
def test_preconditioned_gradients_equal_the_formulas(tmp_path, pairing, adapter):
    parts = grit_parts(tmp_path, f"method.gradient.pairing={pairing}", *QUIET, *ADAPTERS[adapter])
    rule, model = parts.rule, parts.model
    set_covariances(rule)
    damping = 3e-3
    metrics = rule.invert(damping, step=1)
    assert metrics["grit/inverted"] == len(rule.views) and metrics["grit/inversion_failures"] == 0
    model(**padded_batch(parts)).loss.backward()
    raw = {n: (v.A.grad.double().clone(), v.B.grad.double().clone()) for n, v in rule.views.items()}
    metrics = rule.before_step(step=0)
    norm_sq = 0.0
    for name, view in rule.views.items():
        eye = torch.eye(view.A.shape[0], dtype=torch.float64)
        inverse_a = torch.linalg.inv(rule.stats.a[name].value.double() + damping * eye)
        inverse_g = torch.linalg.inv(rule.stats.g[name].value.double() + damping * eye)
        left, right = (inverse_a, inverse_g) if pairing == "grit" else (inverse_g, inverse_a)
        expected_A, expected_B = left @ raw[name][0], raw[name][1] @ right
        torch.testing.assert_close(view.A.grad.double(), expected_A, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(view.B.grad.double(), expected_B, rtol=1e-4, atol=1e-7)
        norm_sq += float(expected_A.square().sum() + expected_B.square().sum())
    assert metrics["grit/ng_grad_norm"] == pytest.approx(math.sqrt(norm_sq), rel=1e-4)


def test_ng_warmup_leaves_gradients_alone(tmp_path):
    parts = grit_parts(tmp_path, "method.gradient.ng_warmup_steps=5", *QUIET)
    set_covariances(parts.rule)
    parts.rule.invert(1e-3, step=1)
    parts.model(**padded_batch(parts)).loss.backward()
    view = next(iter(parts.rule.views.values()))
    before = view.A.grad.clone()
    assert parts.rule.before_step(step=4) == {}
    assert torch.equal(view.A.grad, before)


def test_cholesky_failure_escalates_damping_then_keeps_the_old_inverse(tmp_path):
    rank, damping = 4, 1e-3
    sigma_a = torch.diag(torch.tensor([-0.005, 1.0, 2.0, 3.0]))  # fails at λ·1 and λ·3, factors at λ·10
    sigma_g = torch.eye(rank)
    inverse_a, inverse_g, multiple = damped_inverses(sigma_a, sigma_g, damping)
    assert multiple == 10.0
    torch.testing.assert_close(inverse_a, torch.linalg.inv(sigma_a + 10 * damping * torch.eye(rank)), rtol=1e-5, atol=0)
    torch.testing.assert_close(inverse_g, torch.linalg.inv(sigma_g + 10 * damping * torch.eye(rank)), rtol=1e-5, atol=0)
    assert damped_inverses(torch.diag(torch.tensor([-1.0, 1, 1, 1])), sigma_g, damping) is None  # 300 λ < 1

    parts = grit_parts(tmp_path, *QUIET)
    rule = parts.rule
    set_covariances(rule)
    rule.invert(damping, step=1)
    name = next(iter(rule.views))
    kept = rule.modules[name].inverse_a.clone()
    rule.stats.a[name].value.copy_(-torch.eye(rule.stats.a[name].value.shape[0]))
    metrics = rule.invert(damping, step=2)
    assert metrics["grit/inversion_failures"] == 1 and metrics["grit/inverted"] == len(rule.views) - 1
    assert torch.equal(rule.modules[name].inverse_a, kept)


@pytest.mark.parametrize(
    ("threshold", "low", "expected"), [(0.99, 2, 4), (0.9, 2, 3), (0.5, 2, 2), (0.5, 1, 1), (0.9, 5, 5)]
)
def test_energy_rank_on_a_crafted_spectrum(threshold, low, expected):
    spectrum = torch.tensor([1e-4, 3.0, 1e-4, 10.0, 1.0, 1e-4, 5.0, 1e-4])  # cumulative shares .53 .79 .95 .99998
    assert energy_rank(spectrum, threshold, low, 8) == expected
    assert energy_rank(torch.zeros(8), threshold, low, 8) == 8


SPECTRUM = [10.0, 5.0, 3.0, 1.0, 4e-4, 3e-4, 2e-4, 1e-4]  # cumulative energy shares .53 .79 .95 .99995


def top_projector(sigma: torch.Tensor, k: int) -> torch.Tensor:
    values, vectors = np.linalg.eigh(sigma.double().numpy())
    basis = torch.from_numpy(vectors[:, np.argsort(values)[::-1][:k]].copy())
    return basis @ basis.T


@pytest.mark.parametrize(
    ("overrides", "k", "two_sided"),
    [
        (["method.gradient.rank_adaptation_threshold=0.9", "method.gradient.min_lora_rank=2"], 3, True),
        (["method.gradient.use_two_sided_reprojection=false"], 4, False),
        (["method.gradient.enable_rank_adaptation=false", "method.gradient.reprojection_k=5"], 5, True),
    ],
)
def test_reprojection_projects_factors_and_adam_moments(tmp_path, overrides, k, two_sided):
    parts = grit_parts(tmp_path, *QUIET, *overrides)
    rule, model = parts.rule, parts.model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    rule.bind_optimizer(optimizer)
    model(**padded_batch(parts)).loss.backward()
    optimizer.step()
    set_covariances(rule, spectrum_a=SPECTRUM, spectrum_g=[7.0, 6.0, 2.0, 1.0, 0.5, 0.2, 0.1, 0.05])
    before = {n: (v.A.detach().double().clone(), v.B.detach().double().clone()) for n, v in rule.views.items()}
    moments = {id(p): {k: t.double().clone() for k, t in s.items() if t.dim() == 2} for p, s in optimizer.state.items()}
    rule.reproject(step=7)
    rows = rule.diagnostics()
    assert {r["k"] for r in rows} == {k} and len(rows) == len(rule.views)
    for name, view in rule.views.items():
        project_a = top_projector(rule.stats.a[name].value, k)
        project_g = top_projector(rule.stats.g[name].value, k) if two_sided else project_a
        A, B = before[name]
        torch.testing.assert_close(view.A.detach().double(), project_a @ A, rtol=0, atol=1e-6)
        torch.testing.assert_close(view.B.detach().double(), B @ project_g, rtol=0, atol=1e-6)
        for parameter, projector, left in ((view.A, project_a, True), (view.B, project_g, False)):
            old, new = moments[id(parameter)], optimizer.state[parameter]
            m, v = (
                (projector @ old["exp_avg"], (projector**2) @ old["exp_avg_sq"])
                if left
                else (
                    old["exp_avg"] @ projector,
                    old["exp_avg_sq"] @ projector**2,
                )
            )
            torch.testing.assert_close(new["exp_avg"].double(), m, rtol=0, atol=1e-7)
            torch.testing.assert_close(new["exp_avg_sq"].double(), v, rtol=0, atol=1e-9)
    ranks = json.loads(json.dumps(rule.ranks()))
    assert all(r["k_a"] == r["k_g"] == k and r["r"] == 8 for r in ranks.values())
    widths = sum(r["width"] for r in ranks.values())
    assert rule.rank_metrics()["grit/param_reduction"] == pytest.approx(1 - k * widths / (8 * widths))


def test_reprojection_leaves_optimizer_state_alone_when_asked(tmp_path):
    parts = grit_parts(tmp_path, *QUIET, "method.gradient.reproject_optimizer_state=false")
    rule, model = parts.rule, parts.model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    rule.bind_optimizer(optimizer)
    model(**padded_batch(parts)).loss.backward()
    optimizer.step()
    set_covariances(rule, spectrum_a=SPECTRUM, spectrum_g=SPECTRUM)
    saved = {id(p): s["exp_avg"].clone() for p, s in optimizer.state.items()}
    rule.reproject(step=3)
    assert all(torch.equal(s["exp_avg"], saved[id(p)]) for p, s in optimizer.state.items())


def test_a_module_short_of_samples_is_not_reprojected_and_one_sided_without_gradient_samples(tmp_path):
    parts = grit_parts(tmp_path, *QUIET, "method.gradient.kfac_min_samples=100")
    rule = parts.rule
    set_covariances(rule, spectrum_a=SPECTRUM, spectrum_g=[7.0, 6.0, 2.0, 1.0, 0.5, 0.2, 0.1, 0.05])
    first, second = list(rule.views)[:2]
    rule.stats.a[first].tokens.fill_(99)
    rule.stats.g[second].tokens.fill_(99)
    A_first = rule.views[first].A.detach().clone()
    B_second = rule.views[second].B.detach().double().clone()
    rule.reproject(step=1)
    assert torch.equal(rule.views[first].A, A_first) and not rule.modules[first].reprojected
    project_a = top_projector(rule.stats.a[second].value, 4)  # V_g falls back to V_a
    torch.testing.assert_close(rule.views[second].B.detach().double(), B_second @ project_a, rtol=0, atol=1e-6)


def test_regularizer_equals_direct_computation_and_ramps(tmp_path):
    parts = grit_parts(
        tmp_path,
        "method.gradient.lambda_kfac=0.3",
        "method.gradient.lambda_reproj=0.7",
        "method.gradient.regularizer_warmup_steps=10",
        "method.gradient.rank_adaptation_threshold=0.9",
        "method.gradient.min_lora_rank=2",
        "method.gradient.adaptive=false",
    )
    rule = parts.rule
    set_covariances(rule, spectrum_a=SPECTRUM, spectrum_g=[7.0, 6.0, 2.0, 1.0, 0.5, 0.2, 0.1, 0.05])
    assert rule.regularizer() is None  # step 0 of a 10-step ramp
    rule.steps_done = 4
    kfac_only = float(rule.regularizer().detach())
    rule.reproject(step=4)
    value = float(rule.regularizer().detach())
    direct_kfac = direct_reproj = 0.0
    for name, view in rule.views.items():
        A, B = view.A.detach().double(), view.B.detach().double()
        sigma_a, sigma_g = rule.stats.a[name].value.double(), rule.stats.g[name].value.double()
        direct_kfac += float(torch.trace(A.T @ sigma_a @ A) + torch.trace(B @ sigma_g @ B.T))
        eye = torch.eye(A.shape[0], dtype=torch.float64)
        project_a, project_g = top_projector(sigma_a, 3), top_projector(sigma_g, 3)
        direct_reproj += float(((eye - project_a) @ A).square().sum() + (B @ (eye - project_g)).square().sum())
    assert value == pytest.approx(0.4 * (0.3 * direct_kfac + 0.7 * direct_reproj), rel=1e-5)
    assert direct_reproj < 1e-9 * direct_kfac  # right after a reprojection nothing lies outside P
    assert kfac_only > value  # before the reprojection A, B were not yet in the subspace


def test_adaptive_schedule_on_crafted_loss_histories(tmp_path):
    improving = [2.0 - 0.05 * i for i in range(20)]
    flat = [1.0, 1.1] * 10
    assert adaptive_period(50, improving[:19], 1000) == 50
    assert adaptive_period(50, improving, 1000) == 75
    assert adaptive_period(50, flat, 1000) == 37
    assert adaptive_period(900, improving, 1000) == 1000 and adaptive_period(1, flat, 1000) == 1
    assert adaptive_damping(1e-3, flat[:10]) == 1e-3
    noisy = [1.0, 1.002] * 10
    assert adaptive_damping(1e-3, noisy) == pytest.approx(1e-3 + float(np.std(noisy, ddof=1)))
    assert adaptive_damping(1e-3, [1.0, 5.0] * 6) == 1e-2

    def inversion_steps(losses):
        parts = grit_parts(tmp_path / str(losses[1]), "method.gradient.adaptive_damping=false")
        return [step for step, loss in enumerate(losses, 1) if "grit/inverted" in parts.rule.after_step(step, loss)]

    # the first 20 steps use the base period 50; from then on 75 (improving) or 37 (flat) since the last inversion
    assert inversion_steps([2.0 - 0.01 * i for i in range(160)]) == [75, 150]
    assert inversion_steps([1.0, 1.1] * 50) == [37, 74]


def run_one_step(parts, config) -> dict[str, torch.Tensor]:
    """One optimizer step of the real loop with SGD(lr=1) on the whole training set; returns parameters after."""
    optimizer = torch.optim.SGD([p for p in parts.model.parameters() if p.requires_grad], lr=1.0)
    model = train_parts(parts, config, 1, optimizer)
    return {n: p.detach().double() for n, p in model.named_parameters() if p.requires_grad}


def expected_update(parts, reference, clip: float, clip_first: bool) -> dict[str, torch.Tensor]:
    """Autograd on an untouched copy, then precondition and clip by hand in the given order; SGD(lr=1)."""
    reference.zero_grad()
    reference(**collate(parts.features, 1)).loss.backward()
    grads = {n: p.grad.double() for n, p in reference.named_parameters() if p.requires_grad}

    def clipped(g):
        norm = math.sqrt(sum(float(t.square().sum()) for t in g.values()))
        return {n: t * min(1.0, clip / (norm + 1e-6)) for n, t in g.items()}

    def preconditioned(g):
        g = dict(g)
        for name, state in parts.rule.modules.items():
            a_key, b_key = (f"{name}.lora_{x}.default.weight" for x in "AB")
            g[a_key] = state.inverse_a.double() @ g[a_key]
            g[b_key] = g[b_key] @ state.inverse_g.double()
        return g

    grads = preconditioned(clipped(grads)) if clip_first else clipped(preconditioned(grads))
    return {n: p.detach().double() - grads[n] for n, p in reference.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("clip_order", ["after", "before"])
def test_the_loop_preconditions_then_clips_then_steps(tmp_path, clip_order):
    clip = 1e-3
    overrides = (
        *QUIET,
        *NEVER,
        "task.train_samples=8",
        "train.scheduler=constant",
        f"train.max_grad_norm={clip}",
        f"method.gradient.clip_order={clip_order}",
    )
    parts = grit_parts(tmp_path, *overrides)
    set_covariances(parts.rule, spectrum_a=[4.0, 2.0, 1.0, 0.5, 0.3, 0.2, 0.1, 0.05], spectrum_g=SPECTRUM)
    parts.rule.invert(1e-2, step=1)
    reference = copy.deepcopy(parts.model)
    after = run_one_step(parts, config_for(tmp_path, *overrides))
    right = expected_update(parts, reference, clip, clip_first=clip_order == "before")
    wrong = expected_update(parts, reference, clip, clip_first=clip_order != "before")
    for name, value in after.items():
        torch.testing.assert_close(value, right[name], rtol=1e-5, atol=1e-8)
    assert max(float((after[n] - wrong[n]).abs().max()) for n in after) > 1e-5  # the other order is distinguishable


def grit_run(tmp_path, *overrides: str):
    args = [
        "train.max_steps=24",
        "method.gradient.cov_update_freq=1",
        "method.gradient.kfac_update_freq=6",
        "method.gradient.reprojection_freq=6",
        "method.gradient.rank_adaptation_threshold=0.9",
        "method.gradient.min_lora_rank=2",
        "method.gradient.kfac_min_samples=16",
        *overrides,
    ]
    return run_training(config_for(tmp_path, *args), show_progress=False)


def test_compressed_adapter_loads_with_plain_peft_and_equals_the_projected_adapter(tmp_path):
    outcome = grit_run(tmp_path, "method.gradient.export_compressed=true")
    source, compressed = outcome.directory / "adapter", outcome.directory / "adapter_compressed"
    ranks = json.loads((outcome.directory / "grit_ranks.json").read_text())
    assert min(r["k_a"] for r in ranks.values()) < 8, "the crafted threshold must compress something"
    assert compress_adapter(source, tmp_path / "again") == {m: r["k_a"] for m, r in ranks.items()}

    config = config_for(tmp_path)
    batch = collate([f for f in prepare(config).features[:8]], 1)
    projected = PeftModel.from_pretrained(load_model(config.model, "seq_cls", 2)[0], source).eval()
    bases = load_file(str(source / PROJECTORS))
    with torch.no_grad():
        for name, module in projected.named_modules():
            key = f"{peft_module_name(name)}.basis_a"
            if hasattr(module, "lora_A") and key in bases:
                V_a, V_g = bases[key], bases[f"{peft_module_name(name)}.basis_g"]
                module.lora_A["default"].weight.copy_(V_a @ V_a.T @ module.lora_A["default"].weight)
                module.lora_B["default"].weight.copy_(module.lora_B["default"].weight @ V_g @ V_g.T)
    loaded = PeftModel.from_pretrained(load_model(config.model, "seq_cls", 2)[0], compressed).eval()
    with torch.no_grad():
        want, got = projected(**batch).logits, loaded(**batch).logits
    assert float((got - want).norm() / want.norm()) <= 1e-4
    for name, module in loaded.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            assert module.r["default"] == ranks[peft_module_name(name)]["k_a"]

    def lora_bytes(directory):
        tensors = load_file(str(directory / "adapter_model.safetensors"))
        return sum(t.numel() * t.element_size() for k, t in tensors.items() if ".lora_" in k)

    widths = {m: None for m in ranks}
    tensors = load_file(str(source / "adapter_model.safetensors"))
    for key, tensor in tensors.items():
        if key.endswith(".lora_A.weight"):
            module = peft_module_name(key.removesuffix(".lora_A.weight"))
            widths[module] = tensor.shape[1] + tensors[key.replace("lora_A", "lora_B")].shape[0]
    ratio = sum(ranks[m]["k_a"] * widths[m] for m in ranks) / sum(8 * widths[m] for m in ranks)
    assert lora_bytes(compressed) == pytest.approx(ratio * lora_bytes(source), rel=1e-12)
    saved = (source / "adapter_model.safetensors").stat().st_size - (
        compressed / "adapter_model.safetensors"
    ).stat().st_size
    assert saved == pytest.approx(lora_bytes(source) - lora_bytes(compressed), rel=0.02)


def test_thin_svd_equals_the_dense_svd():
    generator = torch.Generator().manual_seed(3)
    B, A = torch.randn(40, 6, generator=generator), torch.randn(6, 30, generator=generator)
    U, S, Vh = thin_svd(B, A)
    torch.testing.assert_close(U @ torch.diag(S) @ Vh, B @ A, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(S, torch.linalg.svdvals(B @ A)[:6], rtol=1e-5, atol=1e-5)


def test_resume_restores_every_grit_state(tmp_path):
    """Stopped after the step-12 checkpoint and resumed: adapter, grit.csv and grit_ranks.json are the same."""
    args = ["train.checkpoint_every=12", "method.gradient.cov_update_freq=5"]
    whole = grit_run(tmp_path / "a", *args)
    first = grit_run(tmp_path / "b", *args)
    for checkpoint in list_checkpoints(first.directory / "checkpoints")[1:]:
        shutil.rmtree(checkpoint)
    status = json.loads((first.directory / "status.json").read_text())
    (first.directory / "status.json").write_text(json.dumps({**status, "state": "interrupted"}))
    resumed = grit_run(tmp_path / "b", *args, "io.overwrite=resume")
    assert resumed.action == "resume"
    a, b = (load_file(str(run.directory / "adapter" / "adapter_model.safetensors")) for run in (whole, resumed))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    for name in ("grit.csv", "grit_ranks.json"):
        texts = [(run.directory / name).read_text() for run in (whole, resumed)]
        assert texts[0] == texts[1] and len(texts[0]) > 100


@pytest.mark.parametrize("adapter", ["dora", "dual_rank"])
def test_grit_trains_dora_and_dual_rank_adapters(tmp_path, adapter):
    outcome = grit_run(tmp_path, *ADAPTERS[adapter])
    ranks = json.loads((outcome.directory / "grit_ranks.json").read_text())
    assert ranks and all(r["r"] == 8 and 2 <= r["k_a"] <= 8 for r in ranks.values())
    assert math.isfinite(outcome.metrics["accuracy"])


@pytest.mark.gpu
def test_qlora_nf4_base_trains_with_grit(tmp_path):
    outcome = grit_run(
        tmp_path,
        "model.name=tiny-llama",
        "task.name=synthetic/arithmetic",
        "model.quantization=nf4",
        "model.dtype=bfloat16",
    )
    ranks = json.loads((outcome.directory / "grit_ranks.json").read_text())
    assert ranks and all(r["k_a"] <= r["r"] for r in ranks.values())


def test_gradient_checkpointing_records_each_token_once(tmp_path):
    """A checkpointed block runs its forward twice; the covariances equal the plain run's."""
    llama = ("model.name=tiny-llama", "task.name=synthetic/arithmetic", *QUIET)
    covariances = []
    for checkpointing in ("false", "true"):
        parts = grit_parts(tmp_path / checkpointing, *llama, f"model.gradient_checkpointing={checkpointing}")
        parts.model.train()
        batch = collate(parts.features[:4], 0)
        with parts.rule.stats.recording(batch["attention_mask"]):
            parts.model(**batch).loss.backward()
        covariances.append({n: (parts.rule.stats.a[n].value, parts.rule.stats.g[n].value) for n in parts.rule.views})
        counts = {parts.rule.stats.a[n].count for n in parts.rule.views}
        assert counts == {int(batch["attention_mask"].sum())}
    for name, (a, g) in covariances[0].items():
        torch.testing.assert_close(covariances[1][name][0], a, rtol=1e-5, atol=1e-8)
        assert_close_scaled(covariances[1][name][1], g.double())


@pytest.mark.parametrize("task", ["alpaca", "dolly", "boolq", "qnli", "gsm8k"])
def test_published_examples_run_offline_on_tiny_llama(tmp_path, task):
    """Each packaged GRIT experiment resolves to Llama-3.2-3B, and its offline override trains to the end."""
    path = str(packaged_experiment(f"grit_{task}"))
    assert load_config([path], []).model.name == "meta-llama/Llama-3.2-3B"
    synthetic = "synthetic/entailment" if task in ("boolq", "qnli") else "synthetic/arithmetic"
    offline = [
        "model.name=tiny-llama",
        f"task.name={synthetic}",
        "train.max_steps=3",
        "task.train_samples=48",
        "task.eval_samples=4",
        "eval.max_new_tokens=4",
        f"io.root={tmp_path}",
    ]
    outcome = run_training(load_config([path], offline), show_progress=False)
    assert json.loads((outcome.directory / "status.json").read_text())["state"] == "completed"
    assert (outcome.directory / "grit_ranks.json").is_file()


def test_a_pooler_counts_one_row_per_example(tmp_path, caplog):
    """BERT's pooler sees the first token of each example: every row counts there, without a warning."""
    parts = grit_parts(tmp_path, "model.name=tiny-bert", *QUIET)
    batch = padded_batch(parts)
    with parts.rule.stats.recording(batch["attention_mask"]):
        parts.model(**batch).loss.backward()
    counts = {name: parts.rule.stats.a[name].count for name in parts.rule.views}
    pooler = [name for name in counts if "pooler" in name]
    assert pooler and all(counts[name] == batch["attention_mask"].shape[0] for name in pooler)
    assert {counts[n] for n in counts if n not in pooler} == {int(batch["attention_mask"].sum())}
    assert "do not line up" not in caplog.text
