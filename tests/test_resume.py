"""A run killed with SIGKILL after its first checkpoint and resumed ends with the uninterrupted run's adapter."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loralab.training.rundir import read_status

pytestmark = pytest.mark.slow

ARGS = [
    "model.name=tiny-bert",
    "task.train_samples=512",
    "task.eval_samples=16",
    "task.max_length=128",
    "train.batch_size=32",
    "train.max_steps=40",
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

    killed_root = tmp_path / "killed"
    process = subprocess.Popen(train_command(killed_root), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if list(killed_root.rglob("checkpoints/step-*")):
            break
        time.sleep(0.02)
    assert process.poll() is None, "the run finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    directory = run_dir(killed_root)
    assert read_status(directory)["state"] == "running"  # killed: nothing could mark it
    assert not (directory / "adapter").exists()

    resumed = subprocess.run(train_command(killed_root, "io.overwrite=resume"), capture_output=True, text=True, env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
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
    assert steps == list(range(1, 41))  # no step logged twice, none missing
