"""Scripting: `--json` on train, eval, score, report, sweep and hpo prints one JSON object on stdout and nothing else
there; human output keeps the run directory on one line when piped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loralab.cli import main

pytestmark = pytest.mark.slow

TINY = ["model.name=tiny-bert", "task.train_samples=16", "task.eval_samples=8", "train.max_steps=1"]


def json_of(argv: list[str], capsys, code: int = 0) -> dict:
    """Run the CLI with --json; stdout must be exactly one line holding one JSON object."""
    capsys.readouterr()
    assert main([*argv, "--json"]) == code
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.endswith("\n"), out
    return json.loads(out)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A deep io.root (a path longer than a terminal is wide) with one trained tiny run."""
    deep = tmp_path_factory.mktemp("json") / ("a-rather-long-folder-name-" * 4) / "runs"
    assert main(["train", *TINY, f"io.root={deep}"]) == 0
    return deep


def run_directory(root: Path) -> Path:
    (found,) = root.rglob("seed42")
    return found


def test_train(root, capsys):
    reply = json_of(["train", *TINY, f"io.root={root}"], capsys)
    assert reply["verb"] == "train" and reply["action"] == "skip"  # the quickstart's io.overwrite=skip
    assert Path(reply["directory"]) == run_directory(root) and len(reply["config_hash"]) == 8
    assert reply["metrics"] == json.loads((run_directory(root) / "eval.json").read_text())["metrics"]


def test_eval_and_score(root, capsys, tmp_path):
    run = run_directory(root)
    reply = json_of(["eval", "--run", str(run), "--out", str(tmp_path / "eval")], capsys)
    assert (reply["verb"], reply["action"], reply["directory"]) == ("eval", "eval", str(tmp_path / "eval"))
    assert reply["metrics"] == pytest.approx(json.loads((run / "eval.json").read_text())["metrics"])
    predictions = str(run / "predictions.jsonl")
    scored = json_of(["score", "--task", "synthetic/sentiment", "--predictions", predictions], capsys)
    assert scored["verb"] == "score" and scored["metrics"] == pytest.approx(reply["metrics"])


def test_report(root, capsys):
    (group,) = json_of(["report", str(root)], capsys)["groups"]
    assert group["directories"] == [str(run_directory(root))] and group["std"] == {"accuracy": None}
    assert (
        group["metrics"]["accuracy"]
        == json.loads((run_directory(root) / "eval.json").read_text())["metrics"]["accuracy"]
    )


def test_sweep_reuses_the_run(root, capsys):
    reply = json_of(["sweep", *TINY, f"io.root={root}", "--seeds", "42"], capsys)
    (run,) = reply["runs"]
    assert (reply["verb"], run["action"], Path(run["directory"])) == ("sweep", "skipped", run_directory(root))
    planned = json_of(["sweep", *TINY, f"io.root={root}", "--seeds", "42,7", "--dry-run"], capsys)
    assert [run["action"] for run in planned["runs"]] == ["skip", "new"] and planned["action"] == "dry-run"


def test_hpo(root, tmp_path, capsys):
    study = [f"hpo.storage=sqlite:///{tmp_path / 'hpo.db'}", "hpo.sampler=grid", "hpo.space={train.lr: [0.001]}"]
    reply = json_of(["hpo", *TINY, f"io.root={root}", *study, "--study", "s"], capsys)
    (found,) = reply["studies"]
    assert (found["name"], found["complete"], found["finished"]) == ("s", 1, True)
    assert found["best"]["params"] == {"train.lr": 0.001} and Path(found["best"]["run_dir"]).is_dir()


def test_an_error_leaves_stdout_empty(capsys):
    assert main(["train", "train.lrr=1", "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("loralab: error: unknown key 'train.lrr'")


def test_piped_human_output_keeps_the_directory_on_one_line(root):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "40"}
    argv = [sys.executable, "-m", "loralab", "train", *TINY, f"io.root={root}"]
    out = subprocess.run(argv, capture_output=True, text=True, env=env, check=True).stdout
    assert f"run directory: {run_directory(root)}\n" in out
