"""Data parallelism on CPU: `loralab launch local --procs 2` (torchrun, gloo) trains the same adapter as one process
with the same global batch, for the baseline, Shake-to-Align (votes gathered over processes) and GRIT
(statistics summed over processes); only the main process writes; a killed 2-process run resumes exactly."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from conftest import PARALLEL_METHODS as METHODS
from conftest import PARALLEL_TINY as TINY
from conftest import logged_losses as losses
from conftest import max_difference, run_of
from conftest import parallel_overrides as overrides
from conftest import saved_adapter as adapter
from conftest import train_in as train
from loralab.cli import main
from loralab.config.load import load_config
from loralab.errors import ConfigError
from loralab.tracking import read_metrics
from loralab.training.loop import micro_batches, smallest_part

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("method", list(METHODS))
def test_two_processes_train_the_adapter_of_one(tmp_path, method):
    single, double = overrides(tmp_path / "one", method), overrides(tmp_path / "two", method)
    assert train(1, single) == 0 and train(2, double) == 0
    one, two = run_of(single), run_of(double)
    assert max_difference(adapter(one), adapter(two)) <= 1e-5
    steps_one, steps_two = zip(*losses(one), strict=True), zip(*losses(two), strict=True)
    (s1, l1), (s2, l2) = steps_one, steps_two
    assert s1 == s2 == (1, 2, 3, 4, 5, 6)  # the main process logged each step once
    assert l2 == pytest.approx(l1, abs=1e-5)  # the logged loss is the global batch's
    status = json.loads((two / "status.json").read_text())
    assert status["state"] == "completed" and status["processes"] == 2
    if method.startswith("ours"):
        triggered = [r["value"] for r in read_metrics(two / "metrics.csv") if r["metric"] == "shake/trigger_rate"]
        assert max(triggered) > 0  # corrections ran, so the gathered votes decided them


def test_accelerate_launch_runs_the_same_data_parallel_path(tmp_path):
    """`accelerate launch --multi_gpu` on a machine without GPUs: loralab asks accelerate for gloo on CPU."""
    single, double = overrides(tmp_path / "one", "baseline"), overrides(tmp_path / "two", "baseline")
    assert train(1, single) == 0
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes=2"]
    settings = ["--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no", "-m", "loralab", "train"]
    sets = [token for value in double for token in ("--set", value)]
    done = subprocess.run([*launcher, *settings, *sets], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    two = run_of(double)
    assert json.loads((two / "status.json").read_text())["processes"] == 2
    assert max_difference(adapter(run_of(single)), adapter(two)) <= 1e-5


def test_a_killed_two_process_run_resumes_to_the_same_adapter(tmp_path):
    arguments = overrides(tmp_path, "grit", "train.checkpoint_every=3", "train.keep_last=2")
    assert train(2, arguments) == 0
    run_dir = run_of(arguments)
    reference = adapter(run_dir)
    # what a kill after the step-3 checkpoint leaves: no final checkpoint, no outputs, a running status
    shutil.rmtree(run_dir / "checkpoints" / "step-6")
    shutil.rmtree(run_dir / "adapter")
    (run_dir / "eval.json").unlink()
    status = json.loads((run_dir / "status.json").read_text())
    (run_dir / "status.json").write_text(json.dumps(status | {"state": "running"}))
    assert train(2, [*arguments, "io.overwrite=resume"]) == 0
    assert max_difference(adapter(run_dir), reference) <= 1e-6
    assert [step for step, _ in losses(run_dir)] == [1, 2, 3, 4, 5, 6]


def test_micro_batches_share_every_row_once_and_weigh_to_the_batch():
    indices = list(range(100, 111))  # 11 rows, micro-batches of 4: 4 + 4 + 3
    parts = [micro_batches(indices, 4, 2, rank) for rank in (0, 1)]
    rows = sorted(i for per_rank in parts for part in per_rank for i in part.indices)
    assert rows == indices
    assert [[p.start for p in per_rank] for per_rank in parts] == [[0, 4, 8], [2, 6, 9]]
    assert sum(p.weight for per_rank in parts for p in per_rank) / 2 == pytest.approx(1.0)
    assert micro_batches(indices, 4) == [
        type(parts[0][0])(0, indices[:4], 4 / 11),
        type(parts[0][0])(4, indices[4:8], 4 / 11),
        type(parts[0][0])(8, indices[8:], 3 / 11),
    ]
    assert smallest_part(33, 8, 8, 2) == 0  # the epoch's last batch has 1 example: one process would idle
    assert smallest_part(34, 8, 4, 2) == 1


def test_a_batch_too_small_for_the_processes_is_refused(monkeypatch):
    from loralab.training import recipe

    monkeypatch.setattr(recipe.collectives, "world_size", lambda: 2)
    config = load_config([], ["model.name=tiny-bert", "train.batch_size=8"])
    with pytest.raises(ConfigError, match=r"2 processes need ≥ 2 examples in every micro-batch"):
        recipe.check_parallel(33, config.train)
    recipe.check_parallel(32, config.train)


def test_a_deepspeed_accelerate_launch_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert main(["train", "--set", f"io.root={tmp_path}", *[t for v in TINY for t in ("--set", v)]]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "loralab: error: DeepSpeed is not supported: launch with an FSDP or DDP accelerate config, torchrun or "
        "loralab launch local"
    ]
    assert not any(tmp_path.iterdir())  # refused before the run directory exists
