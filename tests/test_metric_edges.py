"""Metric edge cases: correlations where they are undefined, and metric names refused before a run trains."""

from __future__ import annotations

import dataclasses
import json
import math
import warnings

import pytest
from scipy.stats import pearsonr, spearmanr

from conftest import tiny
from loralab.config import load_config
from loralab.data import get_task
from loralab.errors import ConfigError, unknown
from loralab.evaluation.evaluate import check_task_metrics
from loralab.evaluation.metrics import METRICS, compute_metrics
from loralab.training.recipe import run_training
from loralab.training.rundir import read_status

CORRELATIONS = ["pearson", "spearman"]


@pytest.mark.parametrize(
    ("predicted", "gold"),
    [
        ([2.5], [1.0]),  # one pair: scipy raises
        ([0.3, 0.3, 0.3], [1.0, 2.0, 3.0]),  # constant predictions: scipy warns and gives NaN
        ([0.1, 0.7, 0.2], [4.0, 4.0, 4.0]),  # constant references
    ],
)
def test_undefined_correlations_are_nan_without_warnings(predicted, gold):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scipy's ConstantInputWarning would fail the test
        scores = compute_metrics(CORRELATIONS, predicted, gold)
    assert math.isnan(scores["pearson"]) and math.isnan(scores["spearman"])


@pytest.mark.parametrize(
    ("predicted", "gold"),
    [
        ([1.0, 2.0], [3.0, 1.0]),  # the fewest pairs that define a correlation: exactly -1
        ([0.1, 2.0, 2.0, 4.0, 1.0], [0, 2, 3, 5, 1]),  # tied predictions, integer references
        ([0.5, -1.2, 3.3, 0.0, 2.2, 1.1], [1.0, 0.2, 2.9, -0.4, 1.8, 2.0]),
    ],
)
def test_defined_correlations_equal_scipy(predicted, gold):
    scores = compute_metrics(CORRELATIONS, predicted, gold)
    assert scores["pearson"] == pytest.approx(float(pearsonr(predicted, gold)[0]))
    assert scores["spearman"] == pytest.approx(float(spearmanr(predicted, gold)[0]))
    if len(predicted) == 2:
        assert scores["pearson"] == pytest.approx(-1.0) and scores["spearman"] == pytest.approx(-1.0)


def test_regression_run_with_a_one_row_eval_split_completes_and_saves_its_adapter(tmp_path):
    data = tmp_path / "r.jsonl"
    data.write_text("".join(json.dumps({"text": f"t{i}", "label": 1.5 + i / 10}) + "\n" for i in range(10)))
    keys = ["task.format=regression", "task.name=my/r", f"task.path={data}", "model.name=tiny-bert"]
    config = load_config([], [*keys, "train.max_steps=1", f"io.root={tmp_path / 'runs'}"])
    outcome = run_training(config, show_progress=False)
    directory = outcome.directory
    assert read_status(directory)["state"] == "completed"
    assert len((directory / "predictions.jsonl").read_text().splitlines()) == 1  # the held-out split: one row
    assert json.loads((directory / "eval.json").read_text())["n"] == 1
    assert sorted(outcome.metrics) == CORRELATIONS and all(math.isnan(v) for v in outcome.metrics.values())
    assert (directory / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(
    ("typed", "meant"),
    [("acc", "accuracy"), ("mc", "mcc"), ("macro", "macro_f1"), ("acuracy", "accuracy"), ("rogueL", "rougeL")],
)
def test_a_misspelt_metric_suggests_what_it_abbreviates_first(typed, meant):
    assert unknown("metric", typed, METRICS) == f"unknown metric '{typed}' (did you mean '{meant}'?)"


def test_an_unknown_metric_is_refused_before_the_run_directory_exists(tmp_path):
    with pytest.raises(ConfigError, match=r"^task\.metrics: unknown metric 'acc' \(did you mean 'accuracy'\?\)$"):
        run_training(tiny(tmp_path, "task.metrics=[accuracy, acc]"), show_progress=False)
    assert not (tmp_path / "runs").exists()


def test_only_metrics_looked_up_by_name_are_checked():
    stsb = get_task("glue/stsb")
    check_task_metrics(stsb)
    with pytest.raises(ConfigError, match=r"unknown metric 'pearsn' \(did you mean 'pearson'\?\)"):
        check_task_metrics(dataclasses.replace(stsb, metrics=("spearman", "pearsn")))
    gsm8k = get_task("gsm8k")  # scored by eval.profile's metrics, which are not in METRICS
    assert gsm8k.metrics == ("strict_match", "flexible_extract") and not set(gsm8k.metrics) & set(METRICS)
    check_task_metrics(gsm8k)
