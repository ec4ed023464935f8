"""A run killed with SIGKILL between checkpoints and resumed ends with the uninterrupted run's adapter.

The run kills itself at a known step through the recipe's test hook (`LORALAB_TEST_KILL_AT`), so the test does not
depend on how fast the machine trains."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loralab.training.control import KILL_AT
from loralab.training.rundir import read_status

pytestmark = pytest.mark.slow

ARGS = [
    "model.name=tiny-bert",
    "task.train_samples=512",
    "task.eval_samples=16",
    "task.max_length=128",
    "train.batch_size=32",
    "train.max_steps=12",
    "train.checkpoint_every=4",
    "train.keep_last=2",
    "train.eval_every=10",
    "log.every=1",
]


def train_command(root: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "loralab", "train", f"io.root={root}", *ARGS, *extra]


def run_dir(root: Path) -> Path:
    return next(root.rglob("seed42"))


def test_sigkill_then_resume_gives_the_uninterrupted_adapter(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run(train_command(tmp_path / "whole"), check=True, capture_output=True, env=env)
    reference = load_file(str(run_dir(tmp_path / "whole") / "adapter" / "adapter_model.safetensors"))

    killed_root, token = tmp_path / "killed", tmp_path / "kill-token"
    token.touch()
    killed = subprocess.run(
        train_command(killed_root), env={**env, KILL_AT: f"6:{token}"}, capture_output=True, text=True
    )  # after step 6: the checkpoint of step 4 is the newest, steps 5 and 6 are lost
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not token.exists()
    directory = run_dir(killed_root)
    assert read_status(directory)["state"] == "running"  # killed: nothing could mark it
    assert not (directory / "adapter").exists()
    assert sorted(path.name for path in (directory / "checkpoints").iterdir()) == ["step-4"]

    resumed = subprocess.run(train_command(killed_root, "io.overwrite=resume"), capture_output=True, text=True, env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert "from step-4" in resumed.stderr
    assert read_status(directory)["state"] == "completed"
    adapter = load_file(str(directory / "adapter" / "adapter_model.safetensors"))
    assert adapter.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(adapter[name], reference[name], rtol=0, atol=1e-6)
    steps = [
        int(line.split(",")[0])
        for line in (directory / "metrics.csv").read_text().splitlines()[1:]
        if ",train,loss," in line
    ]
    assert steps == list(range(1, 13))  # no step logged twice, none missing
