"""A run's train.log holds what the run printed: its step and eval lines and loralab's warnings, in order."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from loralab.cli import main
from loralab.tracking import read_metrics

RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (INFO|WARNING) (.*)$")


def logged(directory: Path) -> list[tuple[str, str]]:
    """(level, message) of each train.log record; every line must be one timestamped record."""
    matches = [RECORD.match(line) for line in (directory / "train.log").read_text().splitlines()]
    assert all(matches), (directory / "train.log").read_text()
    return [(m[1], m[2]) for m in matches]


def run_cli(argv: list[str], capsys) -> tuple[Path, list[str]]:
    """Train through the CLI; the run directory and the lines it printed on stderr."""
    assert main(["train", "--json", *argv]) == 0
    out, err = capsys.readouterr()
    return Path(json.loads(out)["directory"]), err.splitlines()


def test_train_log_holds_the_printed_step_and_eval_lines(tmp_path, capsys):
    handlers = list(logging.getLogger("loralab").handlers)
    directory, printed = run_cli(
        [
            "model.name=tiny-bert",
            "task.train_samples=32",
            "task.eval_samples=8",
            "train.batch_size=8",
            "train.max_steps=6",
            "log.every=2",
            "train.eval_every=3",
            f"io.root={tmp_path}",
        ],
        capsys,
    )
    step_lines = [line for line in printed if line.startswith("step ")]
    assert logged(directory) == [("INFO", line) for line in step_lines]
    rows = read_metrics(directory / "metrics.csv")
    losses = [r["step"] for r in rows if r["metric"] == "loss"]
    evals = [r for r in rows if r["split"] == "eval" and r["metric"] == "accuracy"]
    assert losses == [2, 4, 6]
    assert [line.split()[1] for line in step_lines if "/" in line.split()[1]] == [f"{s}/6" for s in losses]
    assert [line for line in step_lines if ": eval " in line] == [
        f"step {r['step']}: eval accuracy={r['value']:.4f}" for r in evals
    ]
    assert logging.getLogger("loralab").handlers == handlers  # the run's file handler is gone


def test_a_warning_from_before_the_run_directory_existed_reaches_its_train_log_only(tmp_path, capsys, caplog):
    data = tmp_path / "sft.jsonl"
    rows = [
        {"instruction": "q" if i % 2 else "long words here " * 20, "input": "", "output": f"a{i}"} for i in range(12)
    ]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    sft = [
        "task.name=my/s",
        "task.format=sft",
        f"task.path={data}",
        "task.template=plain",
        "task.max_length=16",
        "model.name=tiny-llama",
        "train.max_steps=1",
        "eval.max_samples=2",
        f"io.root={tmp_path / 'runs'}",
    ]
    directory, printed = run_cli(sft, capsys)
    # pytest's handler takes the place of the CLI's terminal handler: what loralab warned is in caplog
    warned = [r.getMessage() for r in caplog.records if r.name == "loralab" and r.levelno == logging.WARNING]
    assert len(warned) == 1 and re.match(
        r"\d+ of \d+ examples have no answer token within task.max_length=16", warned[0]
    )
    records = logged(directory)
    assert records[0] == ("WARNING", warned[0])  # encoding warned before the run directory was made
    assert records[1:] == [("INFO", line) for line in printed if line.startswith("step ")]

    other, _ = run_cli(
        ["model.name=tiny-bert", "task.train_samples=8", "train.max_steps=1", f"io.root={tmp_path}"], capsys
    )
    assert [level for level, _ in logged(other)] == ["INFO", "INFO"]  # one step line, one eval line, no warning
