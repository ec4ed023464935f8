"""The suite runs offline: the hubs are never asked (set before transformers is imported); GPU tests need CUDA.

Below: the helpers that more than one test module uses (`from conftest import ...`), so no test imports another.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
from pathlib import Path

for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(variable, "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from loralab.cli import main  # noqa: E402
from loralab.config import load_config  # noqa: E402
from loralab.config.load import load_task_config, run_files  # noqa: E402
from loralab.config.schema import ModelConfig, TaskConfig  # noqa: E402
from loralab.models import load_model  # noqa: E402
from loralab.tracking import CSV_FIELDS, read_metrics  # noqa: E402
from loralab.training.loop import BatchOrder, TrainState, new_accelerator, optimizer_steps  # noqa: E402
from loralab.training.optim import build_optimizer, build_scheduler  # noqa: E402
from loralab.training.recipe import prepare  # noqa: E402
from loralab.training.rundir import run_dir_for  # noqa: E402


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# ---- from test_training.py ----


def tiny(tmp_path, *overrides: str):
    """A 6-step LoRA run of tiny-bert on 64 synthetic sentiment examples, logging every step, under `tmp_path`."""
    return load_config(
        [],
        [
            f"io.root={tmp_path / 'runs'}",
            "model.name=tiny-bert",
            "task.train_samples=64",
            "task.eval_samples=32",
            "train.batch_size=8",
            "train.max_steps=6",
            "train.lr=1e-3",
            "log.every=1",
            *overrides,
        ],
    )


# ---- from test_cli_start.py ----


def subcommands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every verb path of the CLI (`("train",)`, `("config", "show")`, ...), leaves only."""
    actions = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    if not actions:
        return [path]
    return [leaf for name, sub in actions[0].choices.items() for leaf in subcommands(sub, (*path, name))]


# ---- from test_report.py ----


def write_run(root, method, seed, final, curve, state="completed"):
    """A finished run's files as a report reads them: eval.json, status.json and an eval curve in metrics.csv."""
    run = root / "task" / "model" / method / "abcd1234" / f"seed{seed}"
    run.mkdir(parents=True)
    (run / "eval.json").write_text(json.dumps({"metrics": final, "n": 10}))
    status = {"state": state, "trainable_params": 50, "total_params": 1000, "tokens_per_s": 100.0 + seed}
    status["step_time_s"] = 0.5 * seed
    (run / "status.json").write_text(json.dumps(status | {"peak_mem_mb": 10.0}))
    with open(run / "metrics.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_FIELDS)
        writer.writerow((1, "train", "loss", 0.7, 0.0))
        for step, value in enumerate(curve, start=1):
            writer.writerow((step, "eval", "accuracy", value, 0.0))


# ---- from test_sweep.py ----


TINY = [  # a 3-step tiny-bert run on synthetic sentiment, as sweep and launch tests plan it
    "model.name=tiny-bert",
    "task.name=synthetic/sentiment",
    "task.train_samples=32",
    "task.eval_samples=16",
    "train.batch_size=8",
    "train.max_steps=3",
]


# ---- from test_adapters.py ----


BASE = ModelConfig("tiny-llama", "auto", "float32", "none", False, False, None)


def build(name, head="causal_lm"):
    """A fresh tiny preset (bit-identical in every call) and its tokenizer."""
    return load_model(dataclasses.replace(BASE, name=name), head, 2 if head == "seq_cls" else None)


def batch_for(tokenizer):
    return tokenizer(["a first sentence", "and a second, longer one"], return_tensors="pt", padding=True)


def logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def perturb(model, select, seed=0, scale=0.1):
    """Overwrite the selected parameters with seeded noise so that a saved adapter is non-trivial."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if select(name):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)


def one_line(error):
    message = str(error.value)
    assert message and "\n" not in message
    return message


# ---- from test_data.py ----


def task(name: str, path=None, train: int | None = None, evaluation: int | None = None, **keys) -> TaskConfig:
    """A task section as a config file would resolve it (the built-in's definition under these keys)."""
    source = {} if path is None else {"path": str(path)}
    return load_task_config(name=name, max_length=128, train_samples=train, eval_samples=evaluation, **source, **keys)


# ---- from test_shake_align_formulas.py ----


def hand_c2(core_votes: np.ndarray, ext_votes: np.ndarray) -> tuple[float, float, float]:
    """C_r, C_R, A_b from explicitly stacked vote vectors, by loops over pairs."""
    full = np.concatenate([core_votes, ext_votes], axis=1)

    def mean_cos(rows):
        pairs = [(i, j) for i in range(len(rows)) for j in range(i + 1, len(rows))]
        return sum(rows[i] @ rows[j] / (np.linalg.norm(rows[i]) * np.linalg.norm(rows[j])) for i, j in pairs) / len(
            pairs
        )

    return mean_cos(core_votes), mean_cos(full), np.linalg.norm(core_votes.sum(0)) / np.linalg.norm(full.sum(0))


# ---- from test_shake_align.py ----


def train_parts(parts, config, steps: int, optimizer: torch.optim.Optimizer | None = None):
    """Drive the real loop for `steps` optimizer steps on prepared parts (AdamW unless given); returns the model."""
    accelerator = new_accelerator("no")
    optimizer = optimizer or build_optimizer(parts.model, config.train)
    model, optimizer = accelerator.prepare(parts.model, optimizer)
    parts.rule.bind_optimizer(optimizer)
    scheduler = build_scheduler(optimizer, config.train, steps)
    order = BatchOrder(len(parts.features), config.train.batch_size, config.seed)
    for _ in optimizer_steps(
        model,
        parts.features,
        parts.rule,
        config.train,
        accelerator,
        optimizer,
        scheduler,
        TrainState(),
        order,
        1,
        steps,
    ):
        pass
    return model


# ---- from test_grit.py ----


GRIT_BASE = [  # GRIT on tiny-roberta, synthetic entailment
    "model.name=tiny-roberta",
    "task.name=synthetic/entailment",
    "task.train_samples=64",
    "task.eval_samples=16",
    "model.dropout=0",
    "train.batch_size=8",
    "train.lr=1e-2",
    "train.warmup_ratio=0",
    "log.every=1",
    "method.name=grit",
    "method.adapter.r=8",
    "method.adapter.dropout=0",
]


def grit_config(tmp_path, *overrides: str):
    """GRIT_BASE under `tmp_path` with `overrides`."""
    return load_config([], [*GRIT_BASE, f"io.root={tmp_path / 'runs'}", *overrides])


QUIET = ["method.gradient.lambda_kfac=0", "method.gradient.lambda_reproj=0", "method.gradient.adaptive=false"]


def grit_parts(tmp_path, *overrides: str, seed: int = 0):
    """Prepared parts with B drawn at random, so Σ_g and B's gradients are not zero."""
    parts = prepare(grit_config(tmp_path, *overrides))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for view in parts.rule.views.values():
            view.B.copy_(0.05 * torch.randn(view.B.shape, generator=generator))
    return parts


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    """Entrywise equality up to `rel` of the reference's largest entry (fp32 accumulation against float64)."""
    assert float((actual.double() - expected).abs().max()) <= rel * float(expected.abs().max())


# ---- from test_ddp.py: runs in one process and in several (DDP, FSDP) ----


PARALLEL_TINY = (
    "model.name=tiny-bert",
    "model.dropout=0",
    "task.train_samples=32",
    "task.eval_samples=16",
    "train.batch_size=8",
    "train.max_steps=6",
    "train.lr=1e-2",
    "train.warmup_ratio=0",
    "log.every=1",
    "method.adapter.dropout=0",
)


PARALLEL_METHODS = {
    "baseline": ("method.name=baseline",),
    "baseline_accum": ("method.name=baseline", "train.grad_accum=2"),
    # windows of 3 over 8 rows: the window [3, 6) has rows on both processes
    "ours": ("method.name=ours", "method.adapter.r=2", "method.adapter.R=6", "method.gradient.samples_per_vote=3"),
    "ours_microbatch": (
        "method.name=ours",
        "method.adapter.r=2",
        "method.adapter.R=6",
        "method.gradient.samples_per_vote=3",
        "method.gradient.route=microbatch",
    ),
    # kfac_damping at the top of GRIT's adaptive range: with 1e-3, (Σ + λI)⁻¹ magnifies float32 rounding (the
    # order of the sums differs between one and two processes) to ~5e-5 in the adapter; with 1e-2 it stays < 1e-5
    "grit": (
        "method.name=grit",
        "method.gradient.kfac_damping=1e-2",
        "method.adapter.r=4",
        "method.gradient.cov_update_freq=1",
        "method.gradient.kfac_update_freq=2",
        "method.gradient.kfac_min_samples=8",
        "method.gradient.reprojection_freq=4",
    ),
}


def parallel_overrides(root, method: str, *extra: str) -> list[str]:
    """A run of PARALLEL_TINY with one of PARALLEL_METHODS under `root`."""
    return [f"io.root={root}", *PARALLEL_TINY, *PARALLEL_METHODS[method], *extra]


def train_in(procs: int, arguments: list[str]) -> int:
    """`loralab train` with these overrides in this process, or `launch local` in `procs` processes."""
    sets = [token for value in arguments for token in ("--set", value)]
    if procs == 1:
        return main(["train", *sets])
    return main(["launch", "local", "--procs", str(procs), "--", "train", *sets])


def run_of(arguments: list[str]) -> Path:
    """The run directory `loralab train` trains into: no --config, so the quickstart with these overrides on top."""
    return run_dir_for(load_config(run_files([]), arguments))


def saved_adapter(run_dir) -> dict[str, torch.Tensor]:
    """The tensors of a run's saved PEFT adapter."""
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def max_difference(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> float:
    assert first.keys() == second.keys()
    return max(float((first[k] - second[k]).abs().max()) for k in first)


def logged_losses(run_dir) -> list[tuple[int, float]]:
    """(step, training loss) of every logged step of a run."""
    return [(r["step"], r["value"]) for r in read_metrics(run_dir / "metrics.csv") if r["metric"] == "loss"]
