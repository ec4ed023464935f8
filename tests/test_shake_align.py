"""Shake-to-Align on a tiny RoBERTa: vote capture on both routes against per-window autograd, statistics against
stacked votes, the ablation identities against PEFT LoRA of rank R, upstream scaling, resume, diagnostics."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import hand_c2, train_parts
from loralab.config import load_config
from loralab.data.collate import collate
from loralab.gradient import NoRule
from loralab.gradient.votes import flatten_parts
from loralab.tracking import read_metrics
from loralab.training.checkpoint import list_checkpoints
from loralab.training.loop import BatchOrder, model_loss
from loralab.training.recipe import prepare, run_training

pytestmark = pytest.mark.slow

BASE = [
    "model.name=tiny-roberta",
    "task.name=synthetic/entailment",
    "task.train_samples=96",
    "task.eval_samples=32",
    "model.dropout=0",
    "train.batch_size=32",
    "train.lr=1e-2",
    "train.warmup_ratio=0",
    "log.every=1",
]


OURS = ("method.name=ours", "method.adapter.r=2", "method.adapter.R=6", "method.adapter.dropout=0")
# PEFT LoRA of rank R = 6 whose lora_alpha/R equals the dual-rank scaling alpha/r = 16/2
LORA_R = ("method.name=baseline_R", "method.adapter.r=6", "method.adapter.alpha=48", "method.adapter.dropout=0")


def config_for(tmp_path, *overrides: str, method: tuple[str, ...] = OURS):
    return load_config([], [*BASE, *method, f"io.root={tmp_path / 'runs'}", *overrides])


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def first_batch(parts, config):
    order = BatchOrder(len(parts.features), config.train.batch_size, config.seed)
    return collate([parts.features[i] for i in order.batch(0, 0)], parts.tokenizer.pad_token_id)


def window_votes(parts, batch, windows):
    """Reference votes: autograd of the mean loss over each window's examples, flattened core | extension."""
    core, extension = {}, {}
    views = parts.adapter.lora_modules(parts.model)
    for start, end in windows:
        loss = model_loss(parts.model, {k: v[start:end] for k, v in batch.items()})
        for name, view in views.items():
            gA, gB = torch.autograd.grad(loss, [view.A, view.B], retain_graph=True)
            c, e = flatten_parts(gA, gB, view.split)
            core.setdefault(name, []).append(c.numpy().astype(np.float64))
            extension.setdefault(name, []).append(e.numpy().astype(np.float64))
    return core, extension


def rule_votes(parts, batch, grad_accum: int = 1):
    """The rule's single votes v_k = c_k / w_k per block, after capturing one batch in `grad_accum` pieces."""
    rule = parts.rule
    rule.begin_step(batch["labels"].shape[0])
    size = batch["labels"].shape[0] // grad_accum
    for start in range(0, batch["labels"].shape[0], size):
        micro = {k: v[start : start + size] for k, v in batch.items()}
        weight = size / batch["labels"].shape[0]
        rule.compute_gradients(
            parts.model, micro, lambda m, b: m(**b).loss, lambda loss, w=weight: (loss * w).backward()
        )
    weights = rule.window_weights()
    return {name: block.parts(weights) for name, block in rule.buffers.items()}


@pytest.mark.parametrize("route", ["vectorized", "microbatch"])
@pytest.mark.parametrize("grad_accum", [1, 2])
def test_votes_equal_per_window_autograd(tmp_path, route, grad_accum):
    """Windows of 3 over a batch of 32 (a tail of 2) cross the micro-batch boundary when grad_accum = 2."""
    config = config_for(
        tmp_path,
        f"method.gradient.route={route}",
        "method.gradient.samples_per_vote=3",
        f"train.grad_accum={grad_accum}",
    )
    parts = prepare(config)
    batch = first_batch(parts, config)
    votes = rule_votes(parts, batch, grad_accum)
    parts.model.zero_grad(set_to_none=True)
    core, extension = window_votes(parts, batch, parts.rule.windows)
    assert len(parts.rule.windows) == 11
    for name, (rule_core, rule_ext) in votes.items():
        for ours, reference in ((rule_core, core[name]), (rule_ext, extension[name])):
            reference = np.stack(reference)
            error = np.linalg.norm(ours.numpy() - reference) / np.linalg.norm(reference)
            assert error <= 1e-5, (name, error)


def test_routes_agree_with_each_other(tmp_path):
    votes = {}
    for route in ("vectorized", "microbatch"):
        config = config_for(tmp_path, f"method.gradient.route={route}")
        parts = prepare(config)
        votes[route] = rule_votes(parts, first_batch(parts, config))
    for name, (core, ext) in votes["vectorized"].items():
        other_core, other_ext = votes["microbatch"][name]
        for a, b in ((core, other_core), (ext, other_ext)):
            assert float((a - b).norm() / b.norm()) <= 1e-5


@pytest.mark.parametrize("combine", [False, True])
def test_statistics_equal_stacked_vote_reference(tmp_path, combine):
    config = config_for(
        tmp_path,
        "method.gradient.debug.every_steps=1",
        f"method.gradient.combine_votes={str(combine).lower()}",
        "method.gradient.history.window_steps=1",
    )
    parts = prepare(config)
    batch = first_batch(parts, config)
    core, extension = window_votes(parts, batch, [(0, 8), (8, 16), (16, 24), (24, 32)])
    parts.model.zero_grad(set_to_none=True)
    rule_votes(parts, batch)
    parts.rule.before_step(0)
    rows = {row["block"]: row for row in parts.rule.diagnostics()}
    assert len(rows) == len(core) > 0
    for name, row in rows.items():
        c, e = np.stack(core[name]), np.stack(extension[name])
        if combine:
            pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
            c = np.concatenate([c, [c[i] + c[j] for i, j in pairs]])
            e = np.concatenate([e, [e[i] + e[j] for i, j in pairs]])
        expected = hand_c2(c, e)
        got = (row["fresh_C_r"], row["fresh_C_R"], row["fresh_A_b"])
        assert got == pytest.approx(expected, rel=1e-4, abs=1e-6), name


@pytest.mark.parametrize("switch", ["method.gradient.kind=none", "method.gradient.correction.mode=none"])
def test_ablations_train_bit_for_bit_like_peft_lora_of_rank_R(tmp_path, switch):
    config = config_for(tmp_path, switch)
    ours = prepare(config)
    assert isinstance(ours.rule, NoRule) == (switch == "method.gradient.kind=none")
    initial = trainable(ours.model)

    reference = prepare(config_for(tmp_path, method=LORA_R))  # A_hi's init is copied in below
    assert {v.scaling for v in reference.adapter.lora_modules(reference.model).values()} == {8.0}
    missing, unexpected = reference.model.load_state_dict(initial, strict=False)
    assert not unexpected and not any(n in initial for n in missing)

    trained = trainable(train_parts(ours, config, 20))
    expected = trainable(train_parts(reference, config, 20))
    assert sorted(trained) == sorted(expected)
    for name, tensor in trained.items():
        assert torch.equal(tensor, expected[name]), name
    assert any(not torch.equal(trained[n], initial[n]) for n in trained if "lora_A" in n)


def test_routes_give_the_same_adapter_after_20_corrected_steps(tmp_path):
    results = {}
    for route in ("vectorized", "microbatch"):
        config = config_for(tmp_path, f"method.gradient.route={route}", "method.gradient.trigger.percentile_p=50")
        results[route] = trainable(train_parts(prepare(config), config, 20))
    for name, tensor in results["vectorized"].items():
        difference = float((tensor - results["microbatch"][name]).abs().max())
        assert difference <= 1e-4, (name, difference)


def test_corrections_change_training(tmp_path):
    """Guard for the identity test: with the correction on, training differs from the ablation."""
    corrected = trainable(train_parts(prepare(config := config_for(tmp_path)), config, 5))
    plain = trainable(train_parts(prepare(c2 := config_for(tmp_path, "method.gradient.kind=none")), c2, 5))
    assert any(not torch.allclose(corrected[n], plain[n]) for n in corrected)


def window_sum_gradients(model, batch: dict, windows: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
    """The scaffold's `.grad`: Σ_k of each window's mean-loss gradient, for every trainable parameter (head too)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for start, end in windows:
        loss = model_loss(model, {k: v[start:end] for k, v in batch.items()})
        for name, grad in zip(params, torch.autograd.grad(loss, list(params.values())), strict=True):
            total[name] += grad
    return total


@pytest.mark.parametrize(
    ("samples_per_vote", "allow_tail", "windows"),
    [
        (8, "true", [(0, 8), (8, 16), (16, 24), (24, 32)]),
        (5, "true", [(0, 5), (5, 10), (10, 15), (15, 20), (20, 25), (25, 30), (30, 32)]),
        (5, "false", [(0, 5), (5, 10), (10, 15), (15, 20), (20, 25), (25, 32)]),
    ],
)
def test_upstream_reproduces_the_scaffold_gradient_sum(tmp_path, samples_per_vote, allow_tail, windows):
    """compat=upstream, no correction: .grad = Σ_k g_k over windows for every parameter, the task head included,
    also when the windows are unequal (where V × the batch gradient is not the scaffold's)."""
    config = config_for(
        tmp_path,
        "method.gradient.compat=upstream",
        "method.gradient.correction.mode=none",
        f"method.gradient.samples_per_vote={samples_per_vote}",
        f"method.gradient.allow_tail={allow_tail}",
    )
    parts = prepare(config)
    batch = first_batch(parts, config)
    expected = window_sum_gradients(parts.model, batch, windows)
    batch_scaled = {n: len(windows) * g for n, g in window_sum_gradients(parts.model, batch, [(0, 32)]).items()}
    rule_votes(parts, batch)
    parts.rule.before_step(0)
    assert parts.rule.windows == windows and any("classifier" in name for name in expected)
    for name, param in parts.model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, expected[name], rtol=1e-4, atol=1e-7)
    old_rule_passes = all(torch.allclose(batch_scaled[n], expected[n], rtol=1e-4, atol=1e-7) for n in expected)
    assert old_rule_passes == (samples_per_vote == 8)  # V × the batch gradient is the scaffold's for equal windows only


CAUSAL = ("model.name=tiny-llama", "task.name=synthetic/arithmetic", "task.max_length=256", "task.train_samples=16")


@pytest.mark.parametrize("route", ["vectorized", "microbatch"])
@pytest.mark.parametrize(("grad_accum", "samples_per_vote"), [(1, 3), (2, 2)])
def test_causal_lm_votes_are_window_token_means(tmp_path, route, grad_accum, samples_per_vote):
    """Windows with different numbers of answer tokens: each vote is the gradient of its window's mean loss over
    tokens, w_k its token share, and (default compat, one micro-batch) .grad the batch mean-over-tokens gradient."""
    config = config_for(
        tmp_path,
        *CAUSAL,
        "train.batch_size=8",
        f"train.grad_accum={grad_accum}",
        f"method.gradient.route={route}",
        f"method.gradient.samples_per_vote={samples_per_vote}",
        "method.gradient.correction.mode=none",
    )
    parts = prepare(config)
    batch = first_batch(parts, config)
    expected = window_sum_gradients(parts.model, batch, [(0, 8)])
    votes = rule_votes(parts, batch, grad_accum)
    windows = parts.rule.windows
    tokens = np.array([int((batch["labels"][s:e, 1:] != -100).sum()) for s, e in windows], dtype=np.float64)
    examples = np.array([e - s for s, e in windows], dtype=np.float64)
    assert np.abs(tokens / tokens.sum() - examples / examples.sum()).max() > 0.02  # token and example shares differ
    if grad_accum == 1:
        np.testing.assert_allclose(parts.rule.window_weights().numpy(), tokens / tokens.sum(), rtol=1e-12)
    core, extension = window_votes(parts, batch, windows)
    for name, (rule_core, rule_ext) in votes.items():
        for ours, reference in ((rule_core, core[name]), (rule_ext, extension[name])):
            reference = np.stack(reference)
            error = np.linalg.norm(ours.numpy() - reference) / np.linalg.norm(reference)
            assert error <= 1e-5, (name, error)
    if grad_accum == 1:
        parts.rule.before_step(0)
        for name, param in parts.model.named_parameters():
            if param.requires_grad:
                torch.testing.assert_close(param.grad, expected[name], rtol=1e-4, atol=1e-8)


def test_resume_restores_the_rule_state(tmp_path):
    """Stopped after the step-4 checkpoint and resumed: adapter and shake_align.csv equal the uninterrupted run's."""
    args = [
        "train.max_steps=8",
        "train.checkpoint_every=4",
        "method.gradient.trigger.percentile_p=50",
        "method.gradient.debug.every_steps=2",
    ]
    whole = run_training(config_for(tmp_path / "a", *args), show_progress=False)
    first = run_training(config_for(tmp_path / "b", *args), show_progress=False)
    for checkpoint in list_checkpoints(first.directory / "checkpoints")[1:]:
        shutil.rmtree(checkpoint)
    status = json.loads((first.directory / "status.json").read_text())
    (first.directory / "status.json").write_text(json.dumps({**status, "state": "interrupted"}))
    resumed = run_training(config_for(tmp_path / "b", *args, "io.overwrite=resume"), show_progress=False)
    assert resumed.action == "resume"
    a, b = (load_file(str(run.directory / "adapter" / "adapter_model.safetensors")) for run in (whole, resumed))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    rows = [(run.directory / "shake_align.csv").read_text().splitlines() for run in (whole, resumed)]
    assert rows[0] == rows[1] and len(rows[0]) > 1


def test_run_logs_statistics_and_evaluates_both_views(tmp_path):
    config = config_for(tmp_path, "train.max_steps=4", "eval.views=[core, full]", "method.gradient.debug.every_steps=2")
    outcome = run_training(config, show_progress=False)
    assert {"core/accuracy", "full/accuracy"} <= set(outcome.metrics)
    metrics = {(r["step"], r["metric"]): r["value"] for r in read_metrics(outcome.directory / "metrics.csv")}
    for step in range(1, 5):
        assert 0 <= metrics[(step, "shake/trigger_rate")] <= 1
        assert metrics[(step, "shake/C_R_min")] <= metrics[(step, "shake/C_R_mean")] <= metrics[(step, "shake/C_R_max")]
        assert metrics[(step, "shake/votes")] == 4
    with open(outcome.directory / "shake_align.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    parts = prepare(config)
    blocks = len(parts.adapter.lora_modules(parts.model))
    assert {int(r["step"]) for r in rows} == {2, 4} and len(rows) == 2 * blocks


def test_a_step_with_one_vote_is_diagnosed_as_skipped_and_left_alone(tmp_path):
    config = config_for(tmp_path)
    parts = prepare(config)
    batch = {k: v[:6] for k, v in first_batch(parts, config).items()}  # the short last batch of an epoch
    parts.model(**batch).loss.backward()
    expected = {n: p.grad.clone() for n, p in parts.model.named_parameters() if p.requires_grad}
    parts.model.zero_grad(set_to_none=True)
    rule_votes(parts, batch)
    assert parts.rule.before_step(0) == {"shake/skipped": 1.0, "shake/votes": 1.0}
    for name, param in parts.model.named_parameters():
        if param.requires_grad:
            assert torch.equal(param.grad, expected[name]), name
