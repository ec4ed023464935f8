"""Shake-to-Align formulas on crafted numbers: windows, vote combinations, C2 statistics, smoothing, triggers,
gates and the three corrections (fixed and upstream), each against a hand computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import hand_c2
from loralab.config.schema import HistoryOptions, ShakeAlignOptions, TriggerOptions
from loralab.gradient.shake_align import Coefficients, StatsHistory, correct, joint_direction, triggered_blocks
from loralab.gradient.votes import (
    C2Stats,
    c2_statistics,
    flatten_parts,
    loss_units,
    unflatten_parts,
    vote_matrix,
    vote_windows,
)


def test_windows_keep_or_merge_the_tail():
    assert vote_windows(32, 8, True) == [(0, 8), (8, 16), (16, 24), (24, 32)]
    assert vote_windows(10, 4, True) == [(0, 4), (4, 8), (8, 10)]
    assert vote_windows(10, 4, False) == [(0, 4), (4, 10)]
    assert vote_windows(3, 4, False) == [(0, 3)]


def test_vote_matrix_lists_singles_then_combinations():
    matrix = vote_matrix(3, keep_single=True, combine=True, size=2, limit=0)
    expected = [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1]]
    assert matrix.tolist() == expected
    assert vote_matrix(4, keep_single=False, combine=True, size=3, limit=2).tolist() == [[1, 1, 1, 0], [1, 1, 0, 1]]


def test_loss_units_are_examples_or_predicted_tokens():
    assert loss_units({"labels": torch.tensor([0, 1, 1])}) == 3
    labels = torch.tensor([[-100, 5, 6, -100], [-100, -100, 7, 8]])
    assert loss_units({"labels": labels}) == 4  # the first position is never predicted


def test_flatten_and_unflatten_are_inverse_and_order_core_first():
    A, B = torch.arange(12.0).view(3, 4), torch.arange(100.0, 106.0).view(2, 3)
    core, extension = flatten_parts(A, B, 1)
    assert core.tolist() == [0, 1, 2, 3, 100, 103]
    assert extension.tolist() == [4, 5, 6, 7, 8, 9, 10, 11, 101, 102, 104, 105]
    A2, B2 = torch.zeros_like(A), torch.zeros_like(B)
    unflatten_parts(core, extension, A2, B2, 1)
    assert torch.equal(A2, A) and torch.equal(B2, B)


def test_c2_statistics_equal_loops_over_vote_pairs():
    rng = np.random.default_rng(0)
    core, ext = rng.normal(size=(5, 7)), rng.normal(size=(5, 11))
    core[1] *= 1e-9  # a tiny vote keeps its direction: no ε in the cosine
    stats = c2_statistics(torch.tensor(core @ core.T), torch.tensor(ext @ ext.T))
    expected = hand_c2(core, ext)
    assert (stats.C_r, stats.C_R, stats.A_b) == pytest.approx(expected, rel=1e-10)


def test_zero_votes_give_zero_consistency_not_nan():
    stats = c2_statistics(torch.zeros(3, 3, dtype=torch.float64), torch.zeros(3, 3, dtype=torch.float64))
    assert (stats.C_r, stats.C_R, stats.A_b) == (0.0, 0.0, 0.0)


def test_history_window_weights_and_ema():
    fresh = [C2Stats(0.1, 0.2, 0.9), C2Stats(0.3, 0.1, 0.5), C2Stats(0.6, 0.4, 0.7), C2Stats(0.0, 0.5, 0.2)]
    window = StatsHistory(HistoryOptions(window_steps=3, weighting="exp", exp_beta=0.5), ema_H=4)
    for stats in fresh:
        smoothed = window.update("b", stats)
    w = np.array([0.25, 0.5, 1.0]) / 1.75  # last three steps, oldest first
    consistency = smoothed.C_R
    assert consistency == pytest.approx(float(w @ [0.1, 0.4, 0.5]))
    linear = StatsHistory(HistoryOptions(window_steps=2, weighting="linear"), ema_H=4)
    for stats in fresh:
        smoothed = linear.update("b", stats)
    assert smoothed.A_b == pytest.approx((0.7 + 2 * 0.2) / 3)
    ema = StatsHistory(HistoryOptions(enabled=False), ema_H=4)
    values = [ema.update("b", s).C_r for s in fresh]
    a, expected = 2 / 5, [0.1]
    for s in fresh[1:]:
        expected.append((1 - a) * expected[-1] + a * s.C_r)
    assert values == pytest.approx(expected)


def test_history_state_round_trips():
    history = StatsHistory(HistoryOptions(window_steps=2), ema_H=4)
    history.update("b", C2Stats(0.1, 0.2, 0.3))
    restored = StatsHistory(HistoryOptions(window_steps=2), ema_H=4)
    restored.load_state_dict(history.state_dict())
    assert restored.update("b", C2Stats(0.5, 0.5, 0.5)) == history.update("b", C2Stats(0.5, 0.5, 0.5))


def test_percentile_trigger_takes_the_worst_tenth():
    values = {f"b{i}": v for i, v in enumerate([0.5, 0.7, 0.05, 0.6, 0.9, 0.3, 0.8, 0.4, 0.65, 0.55])}
    assert triggered_blocks(values, TriggerOptions(metric="C_R", percentile_p=90)) == {"b2"}
    assert triggered_blocks(values, TriggerOptions(metric="misalign", percentile_p=90)) == {"b4"}
    assert triggered_blocks(values, TriggerOptions(metric="C_r", percentile_p=80)) == {"b2", "b5"}


def test_threshold_trigger_direction_follows_the_metric():
    values = {"a": 0.2, "b": 0.3, "c": 0.31}
    assert triggered_blocks(values, TriggerOptions(mode="threshold", metric="A_b", threshold=0.3)) == {"a", "b"}
    assert triggered_blocks(values, TriggerOptions(mode="threshold", metric="misalign", threshold=0.3)) == {"b", "c"}


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_gates_and_coefficients_by_hand():
    o = ShakeAlignOptions()
    c = Coefficients.of(C2Stats(C_r=0.2, C_R=0.5, A_b=0.9), o)
    assert c.w_insuf == pytest.approx(sig(8 * 0.3)) and c.w_over == pytest.approx(sig(-8 * 0.3))
    assert c.w_noise == pytest.approx(0.5)
    assert c.alpha_r == pytest.approx(1 - 0.4 * 0.5)
    assert c.alpha_hi == pytest.approx(1 - 0.4 * 0.5 - 0.4 * sig(-2.4))
    assert c.beta_r == pytest.approx(0.3 * sig(2.4)) and c.beta_hi == pytest.approx(0.3 * sig(-2.4))
    assert c.rho == pytest.approx(0.2 * 0.5)
    low = Coefficients.of(C2Stats(C_r=-0.9, C_R=-2.0, A_b=0.1), ShakeAlignOptions(eta=1.0, gamma_hi=5.0))
    assert low.w_noise == pytest.approx(1.9) and low.alpha_r == pytest.approx(1 - 0.4 * 1.9)
    assert (low.alpha_hi, low.rho, low.beta_hi) == (0.1, 0.5, 0.5)  # clipped at alpha_min, rho_max, beta_max


CRAFTED = dict(
    g_r=np.array([1.0, 2.0]),
    g_hi=np.array([3.0, -1.0, 0.5]),
    consensus_r=np.array([0.5, 1.5]),
    consensus_hi=np.array([2.0, 0.0, 0.0]),
)
COEFFICIENTS = Coefficients(
    w_insuf=0.6, w_over=0.4, w_noise=0.5, alpha_r=0.8, alpha_hi=0.64, beta_r=0.18, beta_hi=0.12, rho=0.1
)


def hand_correction(mode: str, upstream: bool) -> tuple[np.ndarray, np.ndarray]:
    g_r, g_hi = CRAFTED["g_r"].copy(), CRAFTED["g_hi"].copy()
    if mode == "both":
        g_r, g_hi = 0.8 * g_r, 0.64 * g_hi
    g_r = 0.82 * g_r + 0.18 * CRAFTED["consensus_r"]
    target = np.array([g_r[0], g_r[1], g_r[0]]) if upstream else CRAFTED["consensus_hi"]  # tiling
    g_hi = 0.88 * g_hi + 0.12 * target
    n_r, n_hi = g_r @ g_r, g_hi @ g_hi
    lam = min(max(n_r / (n_hi + (1e-8 if upstream else 0)), 0), 1)
    z = np.concatenate([g_r, lam * g_hi])
    z = z / (np.linalg.norm(z) + 1e-8) if upstream else z * math.sqrt(n_r + n_hi) / np.linalg.norm(z)
    blended = 0.9 * np.concatenate([g_r, g_hi]) + 0.1 * z
    return blended[:2], blended[2:]


@pytest.mark.parametrize("mode", ["both", "direction_only"])
@pytest.mark.parametrize("upstream", [False, True])
def test_correction_equals_hand_computation(mode, upstream):
    t = {k: torch.tensor(v, dtype=torch.float64) for k, v in CRAFTED.items()}
    g_r, g_hi = correct(
        t["g_r"], t["g_hi"], COEFFICIENTS, t["consensus_r"], None if upstream else t["consensus_hi"], mode, upstream
    )
    expected_r, expected_hi = hand_correction(mode, upstream)
    np.testing.assert_allclose(g_r.numpy(), expected_r, rtol=1e-12)
    np.testing.assert_allclose(g_hi.numpy(), expected_hi, rtol=1e-12)


def test_joint_direction_norms():
    g_r, g_hi = torch.tensor([3.0, 4.0], dtype=torch.float64), torch.tensor([12.0], dtype=torch.float64)
    z_r, z_hi = joint_direction(g_r, g_hi, upstream=False)
    lam = 25 / 144
    assert float(torch.cat([z_r, z_hi]).norm()) == pytest.approx(13.0)  # the norm of (g_r, g_hi)
    assert float(z_hi[0] / z_r[0]) == pytest.approx(lam * 12 / 3)
    u_r, u_hi = joint_direction(g_r, g_hi, upstream=True)
    assert float(torch.cat([u_r, u_hi]).norm()) == pytest.approx(1.0, abs=1e-8)  # the scaffold's unit vector


def scaffold_stats(votes_r: np.ndarray, votes_hi: np.ndarray) -> tuple[float, float, float]:
    """The published scaffold's C_r, C_R, A_b written out literally: 1e-8 added to √S_i·√S_j and to ‖Σ_R‖."""
    eps = 1e-8
    D_r, D_hi = votes_r @ votes_r.T, votes_hi @ votes_hi.T
    D_R = D_r + D_hi
    S_r, S_R = np.clip(np.diag(D_r), 0, None), np.clip(np.diag(D_R), 0, None)
    upper = np.triu(np.ones(D_r.shape, dtype=bool), k=1)
    denom_r = np.sqrt(S_r)[:, None] * np.sqrt(S_r)[None, :] + eps
    denom_R = np.sqrt(S_R)[:, None] * np.sqrt(S_R)[None, :] + eps
    C_r, C_R = (D_r[upper] / denom_r[upper]).mean(), (D_R[upper] / denom_R[upper]).mean()
    A_b = np.sqrt(D_r.sum()) / (np.sqrt(D_r.sum() + D_hi.sum()) + eps)
    return float(C_r), float(C_R), float(A_b)


def real_scale_votes(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Six agreeing votes (a shared direction plus noise) with norms from 3e-6 to 2e-2, as on a real model."""
    rng = np.random.default_rng(seed)
    shared_r, shared_hi = rng.normal(size=40), rng.normal(size=90)
    core = shared_r + 0.5 * rng.normal(size=(6, 40))
    extension = shared_hi + 0.8 * rng.normal(size=(6, 90))
    norms = np.geomspace(3e-6, 2e-2, 6)[:, None]
    scale = norms / np.linalg.norm(np.concatenate([core, extension], axis=1), axis=1, keepdims=True)
    return core * scale, extension * scale


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_upstream_statistics_take_the_scaffold_guards(seed):
    """compat=upstream equals the scaffold's formulas; fixed equals the unguarded cosines, and the guard matters."""
    core, extension = real_scale_votes(seed)
    grams = (torch.tensor(core @ core.T), torch.tensor(extension @ extension.T))
    upstream = c2_statistics(*grams, upstream=True)
    expected = scaffold_stats(core, extension)
    assert (upstream.C_r, upstream.C_R, upstream.A_b) == pytest.approx(expected, rel=1e-10)
    fixed = c2_statistics(*grams)
    assert (fixed.C_r, fixed.C_R, fixed.A_b) == pytest.approx(hand_c2(core, extension), rel=1e-10)
    assert fixed.C_r - upstream.C_r > 0.1  # the additive guard shrinks the cosines of small votes toward 0


def scaffold_joint_direction(g_r: np.ndarray, g_hi: np.ndarray) -> np.ndarray:
    """The scaffold's joint blend direction, literally: λ = (g11 − g12)/(g22 − g12 + 1e-8), z/(‖z‖ + 1e-8)."""
    eps = 1e-8
    z1 = np.concatenate([g_r, np.zeros_like(g_hi)])
    z2 = np.concatenate([np.zeros_like(g_r), g_hi])
    g11, g22, g12 = z1 @ z1, z2 @ z2, z1 @ z2
    lam = min(max((g11 - g12) / (g22 - g12 + eps), 0.0), 1.0)
    z = z1 + lam * z2
    return z / (np.linalg.norm(z) + eps)


def test_upstream_joint_direction_takes_the_scaffold_guards_on_small_gradients():
    """Gradients of norm ~1e-5: g22 ~ 1e-10, so the 1e-8 in λ's denominator moves λ far from g11/g22."""
    rng = np.random.default_rng(3)
    g_r, g_hi = 2e-6 * rng.normal(size=5), 4e-6 * rng.normal(size=7)
    z_r, z_hi = joint_direction(torch.tensor(g_r), torch.tensor(g_hi), upstream=True)
    expected = scaffold_joint_direction(g_r, g_hi)
    np.testing.assert_allclose(torch.cat([z_r, z_hi]).numpy(), expected, rtol=1e-10, atol=0)
    lam_fixed, lam_upstream = (g_r @ g_r) / (g_hi @ g_hi), expected[5] / g_hi[0] / (expected[0] / g_r[0])
    assert lam_upstream < 0.2 * min(lam_fixed, 1.0)
