"""The CLI's success paths end to end on a tiny model: train, eval --run, eval --base/--adapter, score, config show."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from loralab.cli import main
from loralab.config import config_hash, load_config
from loralab.config.load import run_files

pytestmark = pytest.mark.slow

TINY = ["model.name=tiny-bert", "task.train_samples=48", "task.eval_samples=24", "train.max_steps=4", "train.lr=5e-3"]


def only_directory(root):
    (found,) = list(root.rglob("seed42"))
    return found


def test_train_eval_and_score_agree(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", *TINY]) == 0
    run = only_directory(tmp_path / "runs")
    trained = json.loads((run / "eval.json").read_text())["metrics"]
    records = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == 24
    assert trained["accuracy"] == pytest.approx(sum(r["prediction"] == r["reference"] for r in records) / 24)

    assert main(["eval", "--run", str(run)]) == 0
    (again,) = list(run.glob("eval-*"))
    assert json.loads((again / "eval.json").read_text())["metrics"] == pytest.approx(trained)
    reloaded = [json.loads(line) for line in (again / "predictions.jsonl").read_text().splitlines()]
    assert [r["prediction"] for r in reloaded] == [r["prediction"] for r in records]

    out = tmp_path / "standalone"
    argv = ["eval", "--base", "tiny-bert", "--adapter", str(run / "adapter"), "--task", "synthetic/sentiment"]
    assert main([*argv, "--out", str(out), "task.eval_samples=24"]) == 0
    assert json.loads((out / "eval.json").read_text())["metrics"] == pytest.approx(trained)

    scores = tmp_path / "scores.json"
    capsys.readouterr()
    predictions = str(run / "predictions.jsonl")
    assert main(["score", "--task", "synthetic/sentiment", "--predictions", predictions, "--out", str(scores)]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(scores.read_text()) == pytest.approx(trained)


def test_config_show_prints_the_hash_and_a_yaml_that_reproduces_it(tmp_path, capsys):
    overrides = ["model.name=tiny-llama", "task.name=synthetic/arithmetic", "method.adapter.r=16"]
    assert main(["config", "show", *overrides]) == 0
    text = capsys.readouterr().out
    printed = re.match(r"# config hash: ([0-9a-f]{8})\n", text).group(1)
    assert printed == config_hash(load_config(run_files([]), overrides))  # no --config: the quickstart, as train
    saved = tmp_path / "resolved.yaml"
    saved.write_text(text)
    assert yaml.safe_load(text)["method"]["adapter"]["r"] == 16
    assert config_hash(load_config([str(saved)], [])) == printed
