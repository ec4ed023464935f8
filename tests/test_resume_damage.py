"""Resume from a damaged run directory: it falls back to the newest checkpoint that verifies, with one warning, and
ends with the uninterrupted run's adapter; or it refuses in one line (exit code 2). Never a traceback.

One completed tiny run per module is the reference; each test copies it, simulates a crash (adapter/ gone, status
running), damages one thing and resumes through the CLI in-process.
"""

from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from loralab.cli import main
from loralab.tracking import MetricsCSV
from loralab.training.checkpoint import write_manifest
from loralab.training.rundir import load_status, read_status, write_status

ARGS = [
    "model.name=tiny-bert",
    "task.train_samples=32",
    "task.eval_samples=8",
    "train.batch_size=8",
    "train.max_steps=6",
    "train.checkpoint_every=2",
    "train.keep_last=3",
    "train.lr=1e-3",
    "log.every=1",
]
MEASURED = ("step_time_s", "tokens_per_s", "peak_mem_mb")


def args(root: Path) -> list[str]:
    return [f"io.root={root}", *ARGS]


def run_dir(root: Path) -> Path:
    return next(root.rglob("seed42"))


def adapter(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "adapter" / "adapter_model.safetensors"))


def metric_rows(directory: Path) -> list[list[str]]:
    """metrics.csv without what is measured rather than computed (time, speed, memory), which a resume changes."""
    rows = [line.split(",")[:4] for line in (directory / "metrics.csv").read_text().splitlines()]
    return [row for row in rows if row[2] not in MEASURED]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run, through the CLI as the resumes: 6 steps, checkpoints step-2, step-4, step-6."""
    root = tmp_path_factory.mktemp("reference")
    assert main(["train", *args(root)]) == 0
    return root


@pytest.fixture
def crashed(tmp_path, reference) -> Path:
    """A copy of the reference run as a crash before its adapter was saved leaves it."""
    shutil.copytree(reference, tmp_path / "runs")
    directory = run_dir(tmp_path / "runs")
    shutil.rmtree(directory / "adapter")
    write_status(directory, state="running")
    return directory


def resume(directory: Path, capsys) -> tuple[int, list[str]]:
    """`loralab train ... io.overwrite=resume` on the run's root: exit code and stderr lines."""
    capsys.readouterr()
    code = main(["train", *args(directory.parents[4]), "io.overwrite=resume"])
    return code, capsys.readouterr().err.splitlines()


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "loralab" and r.levelno >= logging.WARNING]


def assert_like_reference(directory: Path, reference: Path) -> None:
    """Completed, with the uninterrupted run's adapter bit for bit."""
    assert read_status(directory)["state"] == "completed"
    ours, theirs = adapter(directory), adapter(run_dir(reference))
    assert ours.keys() == theirs.keys()
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=0)


def assert_refused(code: int, lines: list[str], *fragments: str) -> str:
    """Exit code 2 and exactly one stderr line, the CLI's error line, holding each fragment."""
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("loralab: error: "), lines
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


def cut_in_half(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def random_bytes(file: Path) -> None:
    file.write_bytes(random.Random(0).randbytes(file.stat().st_size))


def random_bytes_new_manifest(file: Path) -> None:
    """Garbage that its manifest vouches for: only reading the file can tell."""
    random_bytes(file)
    (file.parent / "manifest.json").unlink()
    write_manifest(file.parent)


DAMAGE = {
    "trainable.safetensors cut in half": (
        "trainable.safetensors",
        cut_in_half,
        "trainable.safetensors has",
    ),
    "training_state.pt cut in half": ("training_state.pt", cut_in_half, "training_state.pt has"),
    "training_state.pt random bytes": (
        "training_state.pt",
        random_bytes,
        "training_state.pt does not match its sha256",
    ),
    "training_state.pt random bytes, manifest rewritten": (
        "training_state.pt",
        random_bytes_new_manifest,
        "training_state.pt unreadable (UnpicklingError",
    ),
    "trainer_state.json missing": ("trainer_state.json", Path.unlink, "trainer_state.json is missing"),
    "manifest.json missing": ("manifest.json", Path.unlink, "no manifest.json"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_newest_checkpoint_falls_back_to_the_one_before(crashed, reference, damage, capsys, caplog):
    name, spoil, reason = DAMAGE[damage]
    spoil(crashed / "checkpoints" / "step-6" / name)
    code, lines = resume(crashed, capsys)
    assert code == 0, lines
    (line,) = warnings(caplog)
    assert "from step-4, skipped step-6: " + reason in line, line
    assert_like_reference(crashed, reference)
    assert metric_rows(crashed) == metric_rows(run_dir(reference))


def test_no_checkpoint_verifies_refuses_in_one_line(crashed, capsys):
    for checkpoint in (crashed / "checkpoints").iterdir():
        cut_in_half(checkpoint / "trainable.safetensors")
    code, lines = resume(crashed, capsys)
    assert_refused(code, lines, str(crashed), "step-2: ", "step-6: ", "io.overwrite=force")
    assert read_status(crashed)["state"] == "running"


def test_status_json_not_utf8_is_reported_and_replaced(crashed, reference, capsys, caplog):
    (crashed / "status.json").write_bytes(b'{"state": "runn\xff\xfe')
    code, lines = resume(crashed, capsys)
    assert code == 0, lines
    (line,) = warnings(caplog)
    assert "status.json" in line and "utf-8" in line
    assert_like_reference(crashed, reference)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b'{"state": "runn\xff\xfe', "utf-8"),
        (b'{"state": "runn', "Unterminated string"),
        (b"\x00" * 64, "Expecting value"),
        (b'["running"]', "list"),
    ],
)
def test_damaged_status_json_reads_as_empty_with_a_reason(tmp_path, content, reason):
    (tmp_path / "status.json").write_bytes(content)
    status, damage = load_status(tmp_path)
    assert status == {} and reason in damage
    assert write_status(tmp_path, state="running") == {"state": "running"}


def test_half_written_metrics_line_is_dropped_before_appending(crashed, reference, capsys, caplog):
    """Killed after logging step 6 but before its checkpoint, in the middle of a metrics.csv line."""
    shutil.rmtree(crashed / "checkpoints" / "step-6")
    metrics = crashed / "metrics.csv"
    metrics.write_bytes(metrics.read_bytes()[:-12])
    code, lines = resume(crashed, capsys)
    assert code == 0, lines
    (line,) = warnings(caplog)
    assert "metrics.csv: dropped 1 damaged line" in line
    assert_like_reference(crashed, reference)
    assert metric_rows(crashed) == metric_rows(run_dir(reference))


def test_truncate_after_keeps_only_whole_rows(tmp_path, caplog):
    """A row too short, one with NUL bytes and a last line without its newline go; rows past the step too."""
    path = tmp_path / "metrics.csv"
    whole = "step,split,metric,value,time\r\n1,train,loss,0.5,1.0\r\n2,train,loss,0.4,2.0\r\n"
    path.write_bytes((whole + "2,train,loss\r\n3,tr\x00\x00ain,loss,0.3,3.0\r\n4,train,lo").encode())
    MetricsCSV.truncate_after(path, 1)
    assert path.read_text() == "step,split,metric,value,time\n1,train,loss,0.5,1.0\n"
    assert warnings(caplog) == [f"{path}: dropped 3 damaged line(s) a crash or copy left"]


def test_edited_config_yaml_refuses_and_is_kept(crashed, capsys):
    stored = crashed / "config.yaml"
    config = yaml.safe_load(stored.read_text())
    config["train"]["lr"] = 0.01
    config["log"]["every"] = 5  # outside the run hash: may differ, not named
    stored.write_text(yaml.safe_dump(config, sort_keys=False))
    edited = stored.read_text()
    code, lines = resume(crashed, capsys)
    line = assert_refused(code, lines, str(crashed), "config.yaml differs", "train.lr", "io.overwrite=force")
    assert "log.every" not in line
    assert stored.read_text() == edited


@pytest.mark.parametrize(
    ("content", "reason"),
    [(b"train: [1, 2\n", "malformed YAML"), (b"\xff\xfe", "cannot read config file"), (b"", "is empty")],
)
def test_unreadable_config_yaml_refuses(crashed, capsys, content, reason):
    (crashed / "config.yaml").write_bytes(content)
    code, lines = resume(crashed, capsys)
    assert_refused(code, lines, str(crashed), reason, "io.overwrite=force")
    assert (crashed / "config.yaml").read_bytes() == content
