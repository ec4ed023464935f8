"""`loralab hpo`: the space and its checks, exact trial counts across kills and workers, pruning, the
hierarchical stages, and the outputs (best_hparams.json, trials.csv, importance.png) against the study."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import multiprocessing
import multiprocessing.synchronize
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from matplotlib.image import imread
from optuna.trial import TrialState

from loralab.cli import main
from loralab.config import config_hash, hpo_space, load_config
from loralab.config.schema import LrGridConfig
from loralab.errors import ConfigError
from loralab.experiments import hpo, hpo_outputs, hpo_study
from loralab.training.control import KILL_AT, StopRun
from loralab.training.rundir import read_status

LR_GRID = "hpo.space={train.lr: [1.0e-4, 2.0e-4, 3.0e-4, 4.0e-4]}"


def tiny(tmp_path: Path, study: str = "s") -> list[str]:
    return [
        "model.name=tiny-bert",
        "task.name=synthetic/sentiment",
        "task.train_samples=32",
        "task.eval_samples=16",
        "train.batch_size=8",
        "train.max_steps=2",
        f"io.root={tmp_path / 'runs'}",
        f"hpo.storage=sqlite:///{tmp_path / 'hpo.db'}",
        f"hpo.study_name={study}",
        "hpo.heartbeat_interval=1",
        "hpo.grace_period=2",
    ]


def study_trials(tmp_path: Path, name: str) -> list[optuna.trial.FrozenTrial]:
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'hpo.db'}")
    return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)


def completed(trials) -> list[dict]:
    return [t.params for t in trials if t.state == TrialState.COMPLETE]


def distinct(params: list[dict]) -> int:
    return len({json.dumps(p, sort_keys=True) for p in params})


# ---- the space and the config -------------------------------------------------------------------------


def test_space_parses_every_distribution_flat_or_nested():
    dims = hpo_space.parse_space(
        {
            "train.lr": {"log_uniform": ["1e-6", 1e-3]},  # YAML 1.1 reads 1e-6 as a string
            "train": {"warmup_ratio": {"uniform": [0, 0.1]}},
            "method.adapter.r": {"int": [4, 16]},
            "method": {"gradient": {"eta": {"choice": [0.1, 0.2, 0.4]}}},
            "train.scheduler": ["linear", "cosine"],
        }
    )
    assert dims == {
        "train.lr": hpo_space.Dim("log_uniform", (1e-6, 1e-3)),
        "train.warmup_ratio": hpo_space.Dim("uniform", (0.0, 0.1)),
        "method.adapter.r": hpo_space.Dim("int", (4, 16)),
        "method.gradient.eta": hpo_space.Dim("choice", (0.1, 0.2, 0.4)),
        "train.scheduler": hpo_space.Dim("choice", ("linear", "cosine")),
    }
    grid = hpo_space.grid_points({k: dims[k] for k in ("method.gradient.eta", "train.scheduler")})
    assert len(grid) == 6 and grid[0] == {"method.gradient.eta": 0.1, "train.scheduler": "linear"}
    assert hpo_space.overrides({"train.lr": 1e-5, "a": "x", "b": None}) == ["train.lr=1.0e-05", 'a="x"', "b=null"]
    assert load_config([], ["train.lr=1.0e-05"]).train.lr == 1e-5


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "hpo.space={train.lr: {loguniform: [1e-6, 1e-3]}}",
            "unknown distribution 'loguniform' (did you mean 'log_uniform'",
        ),
        ("hpo.space={train.lr: {log_uniform: [0, 1e-3]}}", "log_uniform needs low > 0"),
        ("hpo.space={train.lr: {uniform: [0.5, 0.1]}}", "uniform needs low < high"),
        ("hpo.space={method.adapter.r: {int: [4.5, 16]}}", "int needs [low, high] (two integers)"),
        ("hpo.space={train.lr: {choice: []}}", "choice needs a non-empty list"),
        ("hpo.space={train.lr: [1e-4, 1e-4]}", "repeated values"),
        ("hpo.space={io.root: [a, b]}", "cannot be searched"),
        ("hpo.samplr=grid", "unknown key 'hpo.samplr' (did you mean 'sampler'"),
        ("hpo.pruner=asha", "hpo.pruner: expected one of"),
        ("hpo.schedule=preevl", "unknown schedule 'preevl' (did you mean 'preeval'"),
        ("hpo.hierarchical.lr_grid.points=0", "hpo.hierarchical.lr_grid.points: must be ≥ 1"),
    ],
)
def test_bad_hpo_entries_are_one_line_config_errors(override, message):
    with pytest.raises(ConfigError) as caught:
        load_config([], [override])
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_a_misspelt_space_key_is_named_before_what_the_sampler_lacks(tmp_path, capsys):
    """TPE without hpo.n_trials and a typo in the space: the typo is the error (not 'hpo.n_trials is needed')."""
    argv = ["hpo", "model.name=tiny-bert", f"io.root={tmp_path}", "hpo.space={train.lrr: [1.0e-4, 3.0e-4]}"]
    assert main(argv) == 2
    assert "has a bad config: unknown key 'train.lrr' (did you mean 'lr'?)" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing started


def test_grid_sampler_needs_choice_dimensions():
    space = "hpo.space={train.lr: {log_uniform: [1e-6, 1e-3]}, train.warmup_ratio: [0, 0.1]}"
    with pytest.raises(ConfigError, match=r"hpo.sampler=grid needs a choice list .*train.lr is log_uniform"):
        load_config([], ["hpo.sampler=grid", space])
    assert load_config([], ["hpo.sampler=tpe", space]).hpo.sampler == "tpe"


def test_the_run_hash_ignores_the_hpo_section():
    plain = load_config([], ["train.lr=1e-4"])
    tuned = load_config(
        [], ["train.lr=1e-4", "hpo.sampler=grid", "hpo.n_trials=7", "hpo.space={train.lr: [1.0e-4, 2.0e-4]}"]
    )
    assert tuned.hpo != plain.hpo and config_hash(tuned) == config_hash(plain)


def test_lr_grid_even_choice_and_clipped_neighbourhood():
    grid = hpo_space.lr_grid(LrGridConfig(min_exp=-6, max_exp=-3, points=15))
    assert len(grid) == 15 and grid[0] == 1e-6 and grid[-1] == 1e-3
    assert hpo_space.evenly(grid, 5) == [grid[0], grid[4], grid[7], grid[11], grid[14]]
    assert hpo_space.neighbourhood(grid, grid[7], 7) == grid[4:11]
    assert hpo_space.neighbourhood(grid, 1.1e-6, 7) == grid[0:4]  # clipped at the low end
    assert hpo_space.neighbourhood(grid, grid[14], 7) == grid[11:15]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["hpo.space={train.lrr: [1.0e-4, 2.0e-4]}", "hpo.sampler=grid"], "unknown key 'train.lrr'"),
        (["hpo.space={train.lr: {log_uniform: [1e-6, 1e-3]}}", "hpo.sampler=grid"], "needs a choice list"),
        (["hpo.space={train.lr: {log_uniform: [1e-6, 1e-3]}}"], "hpo.n_trials is needed with hpo.sampler=tpe"),
        ([], "hpo.space is empty"),
        (["hpo.sampler=grid", LR_GRID, "hpo.metric=acuracy"], "not 'acuracy' (did you mean 'accuracy'"),
        (["hpo.sampler=grid", LR_GRID, "--workers", "0"], "--workers must be ≥ 1"),
        ([LR_GRID, "--schedule", "finale"], "unknown schedule 'finale'"),
        (["--schedule", "final"], "no study 'synthetic-sentiment-tiny-bert-lora-preeval'"),
        (
            ["hpo.mode=hierarchical", "train.batch_size=16", "hpo.hierarchical.knobs={method.gradient.etaa: [0.1]}"],
            "unknown key 'method.gradient.etaa' (did you mean 'eta'",
        ),
    ],
)
def test_cli_errors_exit_2_before_anything_trains(tmp_path, capsys, arguments, message):
    base = [a for a in tiny(tmp_path) if not a.startswith("hpo.study_name")]
    assert main(["hpo", *base, *arguments]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not list((tmp_path / "runs").glob("synthetic-sentiment"))


# ---- the claim loop with a stand-in objective (no training) ------------------------------------------------


def fake_objective(values):
    def evaluate(trial, plan, params):
        return values(params)

    return evaluate


def test_importance_plot_and_outputs_match_the_study(tmp_path, monkeypatch):
    monkeypatch.setattr(
        hpo_study, "evaluate", fake_objective(lambda p: p["train.lr"] * 1e3 + p["method.adapter.r"] / 100)
    )
    space = "hpo.space={train.lr: [1.0e-4, 2.0e-4, 3.0e-4], method.adapter.r: [4, 8, 16]}"
    (result,) = hpo.run_hpo([], [*tiny(tmp_path), "hpo.sampler=grid", space])
    assert result.finished and result.complete == 9 and result.plot == "importance"
    directory = Path(result.plan.directory)
    assert directory == tmp_path / "runs" / "hpo" / "s"

    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'hpo.db'}")
    best = json.loads((directory / "best_hparams.json").read_text())
    assert best["params"] == study.best_trial.params == {"train.lr": 3e-4, "method.adapter.r": 16}
    assert (best["value"], best["trial"]) == (study.best_value, study.best_trial.number)
    assert (best["metric"], best["direction"]) == ("accuracy", "maximize")
    check_trials_csv(directory / "trials.csv", study)

    image = imread(directory / "importance.png")
    assert image.ndim == 3 and float(image.var()) > 0
    figure, kind = hpo_outputs.draw(study, result.plan, list(result.plan.dims))
    assert kind == "importance"
    figure.canvas.draw()
    assert {t.get_text() for t in figure.axes[0].get_yticklabels()} == {"train.lr", "method.adapter.r"}
    assert any(t.get_text() for t in figure.axes[0].get_xticklabels())


def forked_exit_codes(target, args: tuple, count: int) -> list[int | None]:
    """Run `target(*args)` in `count` forked processes at once; their exit codes."""
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=target, args=args) for _ in range(count)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=300)
    return [worker.exitcode for worker in workers]


def write_outputs_repeatedly(plan: hpo_study.StudyPlan, rounds: int) -> None:
    for _ in range(rounds):
        hpo_outputs.write_outputs(plan)


def test_workers_finishing_together_write_the_outputs_side_by_side(tmp_path, monkeypatch):
    """Independent workers (SLURM array tasks) each write the study's outputs when it ends; with one shared
    temporary name a worker's rename found its file renamed away by another (FileNotFoundError, exit 1)."""
    monkeypatch.setattr(hpo_study, "evaluate", fake_objective(lambda p: p["train.lr"] * 1e3))
    (result,) = hpo.run_hpo([], [*tiny(tmp_path), "hpo.sampler=grid", LR_GRID])
    expected = {name: (Path(result.plan.directory) / name).read_bytes() for name in ("trials.csv", "best_hparams.json")}
    assert forked_exit_codes(write_outputs_repeatedly, (result.plan, 15), 3) == [0, 0, 0]
    directory = Path(result.plan.directory)
    assert {name: (directory / name).read_bytes() for name in expected} == expected
    assert float(imread(directory / "importance.png").var()) > 0
    assert not list(directory.glob(".*.tmp"))  # every temporary file was renamed into place


def open_new_storage_together(url: str, start: multiprocessing.synchronize.Barrier) -> None:
    start.wait()
    hpo_study.open_storage(url, heartbeat_interval=10, grace_period=20)


def test_workers_opening_a_new_sqlite_study_together_all_get_it(tmp_path):
    """Workers started at once race to create a new SQLite database's tables; the loser used to get
    "table alembic_version already exists" and exit 2 (the flaky three-worker test)."""
    for attempt in range(8):
        url = f"sqlite:///{tmp_path / f'race{attempt}.db'}"
        start = multiprocessing.get_context("fork").Barrier(4)
        assert forked_exit_codes(open_new_storage_together, (url, start), 4) == [0, 0, 0, 0], f"attempt {attempt}"
        assert optuna.get_all_study_summaries(hpo_study.open_storage(url)) == []


def test_one_parameter_falls_back_to_a_slice_plot(tmp_path, monkeypatch):
    monkeypatch.setattr(hpo_study, "evaluate", fake_objective(lambda p: -abs(math.log10(p["train.lr"]) + 4)))
    (result,) = hpo.run_hpo(
        [],
        [*tiny(tmp_path), "hpo.sampler=random", "hpo.n_trials=3", "hpo.space={train.lr: {log_uniform: [1e-6, 1e-2]}}"],
    )
    assert result.complete == 3 and result.plot == "slice"
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'hpo.db'}")
    figure, kind = hpo_outputs.draw(study, result.plan, ["train.lr"])
    figure.canvas.draw()
    (axes,) = figure.axes
    assert kind == "slice" and axes.get_xscale() == "log" and axes.get_xlabel() == "train.lr"
    assert any(t.get_text() for t in axes.get_xticklabels()) and any(t.get_text() for t in axes.get_yticklabels())
    assert float(imread(Path(result.plan.directory) / "importance.png").var()) > 0


def check_trials_csv(path: Path, study: optuna.Study) -> None:
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    trials = study.get_trials(deepcopy=False)
    assert [int(r["number"]) for r in rows] == [t.number for t in trials]
    for row, trial in zip(rows, trials, strict=True):
        assert row["state"] == trial.state.name
        assert (float(row["value"]) if row["value"] else None) == trial.value
        for key, value in trial.params.items():
            assert type(value)(row[key]) == value
        assert row["run_dir"] == ";".join(trial.user_attrs.get("run_dirs", []))


@pytest.mark.parametrize("storage", ["sqlite", "journal"])
def test_a_trial_without_heartbeat_is_failed_and_retried_with_its_parameters(tmp_path, storage):
    url = f"sqlite:///{tmp_path / 'hpo.db'}" if storage == "sqlite" else str(tmp_path / "hpo.jsonl")
    args = [*tiny(tmp_path), f"hpo.storage={url}", "hpo.sampler=grid", LR_GRID]
    plan = hpo.single_plan(hpo.resolve([], args))
    study = hpo_study.open_study(plan)
    trial, heartbeat = hpo_study.claim(study, plan)
    point = trial.user_attrs[hpo_study.POINT]
    heartbeat.stop()  # the worker hangs (alive, so only the heartbeat can tell): its last beat, an hour ago
    if storage == "sqlite":
        with sqlite3.connect(tmp_path / "hpo.db") as db:
            db.execute(
                "UPDATE trial_heartbeats SET heartbeat = datetime(heartbeat, '-1 hour') WHERE trial_id = ?",
                (trial._trial_id,),
            )
    else:
        study._storage.set_trial_system_attr(trial._trial_id, hpo_study.HEARTBEAT, time.time() - 3600)
    retried, beat = hpo_study.claim(study, plan)
    beat.stop()
    assert retried.number != trial.number and retried.user_attrs[hpo_study.POINT] == point
    assert study._storage.get_trial(trial._trial_id).state == TrialState.FAIL
    assert hpo_study.suggest(retried, plan) == plan.points[point]


def test_reporter_reports_each_eval_and_stops_the_run_when_the_pruner_says_so():
    class Trial:
        def __init__(self):
            self.reports, self.prune = [], False

        def report(self, value, step):
            self.reports.append((step, value))

        def should_prune(self):
            return self.prune

    trial = Trial()
    reporter = hpo_study.Reporter(trial, "accuracy")
    reporter(1, {"accuracy": 0.5}, False)
    reporter(2, {"full/accuracy": 0.6, "core/accuracy": 0.4}, False)
    trial.prune = True
    reporter(4, {"accuracy": 0.7}, True)  # the last eval is never pruned
    with pytest.raises(StopRun, match="pruned at step 3"):
        reporter(3, {"accuracy": 0.1}, False)
    assert trial.reports == [(1, 0.5), (2, 0.6), (4, 0.7), (3, 0.1)]


def test_pruner_and_sampler_choices_map_to_optuna(tmp_path):
    plan = hpo.single_plan(hpo.resolve([], [*tiny(tmp_path), "hpo.sampler=grid", LR_GRID, "hpo.startup_trials=2"]))
    median = hpo_study.make_pruner(dataclasses.replace(plan, pruner="median"))
    assert isinstance(median, optuna.pruners.MedianPruner) and median._n_startup_trials == 2
    assert isinstance(
        hpo_study.make_pruner(dataclasses.replace(plan, pruner="hyperband")), optuna.pruners.HyperbandPruner
    )
    assert isinstance(hpo_study.make_pruner(plan), optuna.pruners.NopPruner)
    tpe = dataclasses.replace(plan, sampler="tpe", points=None)
    assert isinstance(hpo_study.make_sampler(tpe, 0, 0), optuna.samplers.TPESampler)
    assert plan.n_trials == 4 and len({json.dumps(p) for p in plan.points}) == 4
    sample = hpo.single_plan(hpo.resolve([], [*tiny(tmp_path), "hpo.sampler=grid", LR_GRID, "hpo.n_trials=2"]))
    assert sample.n_trials == 2 and set(map(json.dumps, sample.points)) < set(map(json.dumps, plan.points))


def test_hierarchical_stages_search_near_the_best_baseline_lr(tmp_path, monkeypatch):
    grid = hpo_space.lr_grid(LrGridConfig(min_exp=-5, max_exp=-1, points=5))  # 1e-5 ... 1e-1
    target = grid[3]  # the baseline's best lr is 1e-2 on the evenly chosen points 1e-5, 1e-3, 1e-1

    def value(params):
        lr_term = -abs(math.log10(params["train.lr"]) - math.log10(target))
        knobs = params.get("method.gradient.eta", 0) + params.get("method.gradient.k", 0) / 100
        return lr_term + (knobs if params["method.name"] == "ours" else 0)

    monkeypatch.setattr(hpo_study, "evaluate", fake_objective(value))
    knobs = "hpo.hierarchical.knobs={method.gradient.eta: [0.1, 0.3], method.gradient.k: [2, 4]}"
    args = [
        *tiny(tmp_path, "h"),
        "hpo.mode=hierarchical",
        knobs,
        "hpo.hierarchical.lr_grid={min_exp: -5, max_exp: -1, points: 5}",
        "hpo.hierarchical.baseline_lr_points=3",
        "hpo.hierarchical.lr_neighbor_points=3",
        "train.batch_size=16",
    ]
    results = hpo.run_hpo([], args)
    assert [r.plan.name for r in results] == ["h-baseline", "h-s1", "h-s2", "h-s3"]
    assert all(r.finished for r in results)

    baseline = study_trials(tmp_path, "h-baseline")
    assert sorted(t.params["train.lr"] for t in baseline) == [grid[0], grid[2], grid[4]]
    assert {t.params["method.name"] for t in baseline} == {"baseline"}
    best_lr = json.loads((Path(results[0].plan.directory) / "best_hparams.json").read_text())["params"]["train.lr"]
    neighbours = set(hpo_space.neighbourhood(grid, best_lr, 3))
    assert best_lr in (grid[2], grid[4]) and len(neighbours) <= 3
    for name in ("h-s1", "h-s2", "h-s3"):
        trials = study_trials(tmp_path, name)
        assert trials and all(t.state == TrialState.COMPLETE for t in trials)
        assert {t.params["train.lr"] for t in trials} <= neighbours
        defaults = {0.2, 8.0} if name == "h-s1" else set()  # s1 varies one knob, the others at the preset's values
        assert {t.params["method.gradient.eta"] for t in trials} <= {0.1, 0.3} | defaults
        assert {t.params["method.gradient.k"] for t in trials} <= {2, 4} | defaults
        assert {t.params["method.name"] for t in trials} == {"ours"}
        assert distinct([t.params for t in trials]) == len(trials)
    s1 = json.loads((Path(results[1].plan.directory) / "best_hparams.json").read_text())
    assert s1["seeded_from"]["params"]["train.lr"] == best_lr and s1["stage"] == "s1"
    s2 = study_trials(tmp_path, "h-s2")
    assert len(s2) == 2**3  # keep_s1 = 2 values of lr, eta and k
    s3 = results[3]
    assert s3.complete == 3 and s3.plan.seeds == (42, 43) and s3.plan.score_weights == (0.5, 0.4, 0.1)
    assert s3.best["params"]["method.gradient.eta"] == 0.3 and s3.best["params"]["method.gradient.k"] == 4
    assert [a for a in s3.plan.overrides if a.startswith("train.max_steps")][-1] == "train.max_steps=8"  # 4 × 2

    top = ["hpo.study_name=h-final", "hpo.top_k=1", "hpo.source_study=h", "hpo.seeds=[2, 3]"]
    (final,) = hpo.run_hpo([], [*args, *top])  # the final schedule's step: the best baseline and the best s3
    assert final.plan.extra["candidates_from"] == ["h-baseline", "h-s3"] and final.plan.seeds == (2, 3)
    assert [p["method.name"] for p in final.plan.points] == ["baseline", "ours"]
    assert final.plan.points[1] == s3.best["params"] and final.complete == 2

    again = hpo.run_hpo([], args)  # everything is there: no stage runs a trial
    assert [len(study_trials(tmp_path, r.plan.name)) for r in again] == [
        len(study_trials(tmp_path, r.plan.name)) for r in results
    ]


def test_final_schedule_reruns_the_top_k_of_preeval_over_the_final_seeds(tmp_path, monkeypatch):
    values = {1e-4: 0.1, 2e-4: 0.2, 3e-4: 0.9, 4e-4: 0.5}
    monkeypatch.setattr(hpo_study, "evaluate", fake_objective(lambda p: values[p["train.lr"]]))
    args = [a for a in tiny(tmp_path) if not a.startswith("hpo.study_name")] + ["hpo.sampler=grid", LR_GRID]
    (preeval,) = hpo.run_hpo([], [*args, "hpo.schedule=preeval"])
    assert preeval.plan.name == "synthetic-sentiment-tiny-bert-lora-preeval" and preeval.complete == 4
    preeval_config = load_config(preeval.plan.files, preeval.plan.overrides)
    assert preeval_config.train.epochs == 1 and preeval_config.io.overwrite == "resume"

    (final,) = hpo.run_hpo([], [*args, "hpo.schedule=final", "hpo.top_k=2"])
    assert final.plan.name == "synthetic-sentiment-tiny-bert-lora-final"
    assert final.plan.points == ({"train.lr": 3e-4}, {"train.lr": 4e-4})
    assert final.plan.seeds == (2, 3, 5, 7, 11) and final.complete == 2
    final_config = load_config(final.plan.files, final.plan.overrides)
    assert final_config.train.epochs == 3 and final_config.io.overwrite == "resume"  # the config's full budget


# ---- real trials on tiny-bert ------------------------------------------------------------------------------


@pytest.mark.slow
def test_grid_study_runs_each_point_once_and_a_rerun_runs_nothing(tmp_path, capsys):
    args = [
        *tiny(tmp_path, "grid"),
        "hpo.sampler=grid",
        "hpo.space={train.lr: [1.0e-4, 3.0e-4], method.adapter.r: [4, 8]}",
    ]
    assert main(["hpo", *args, "--n-trials", "4"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("hpo grid: 4 complete, 0 pruned, 0 failed of 4; best accuracy=")
    trials = study_trials(tmp_path, "grid")
    assert len(trials) == 4 and distinct(completed(trials)) == 4
    for trial in trials:
        (run_dir,) = trial.user_attrs["run_dirs"]
        assert read_status(Path(run_dir))["state"] == "completed"
        assert json.loads((Path(run_dir) / "eval.json").read_text())["metrics"]["accuracy"] == trial.value
    directory = tmp_path / "runs" / "hpo" / "grid"
    study = optuna.load_study(study_name="grid", storage=f"sqlite:///{tmp_path / 'hpo.db'}")
    check_trials_csv(directory / "trials.csv", study)
    best = json.loads((directory / "best_hparams.json").read_text())
    assert best["run_dir"] == study.best_trial.user_attrs["run_dir"] and best["params"] == study.best_trial.params
    assert float(imread(directory / "importance.png").var()) > 0

    assert main(["hpo", *args]) == 0
    assert len(study_trials(tmp_path, "grid")) == 4


@pytest.mark.slow
def test_a_run_killed_after_its_last_checkpoint_resumes(tmp_path):
    """A retried trial whose worker died between the final checkpoint and status 'completed' finishes."""
    from loralab.training.recipe import run_training
    from loralab.training.rundir import write_status

    config = load_config([], [*tiny(tmp_path), "io.overwrite=resume"])
    first = run_training(config, show_progress=False)
    write_status(first.directory, state="running")  # as if killed right after the last checkpoint
    again = run_training(config, show_progress=False)
    assert again.action == "resume" and again.metrics == first.metrics
    assert read_status(again.directory)["state"] == "completed"


@pytest.mark.slow
def test_a_pruned_trial_stops_its_run_and_counts(tmp_path, monkeypatch):
    monkeypatch.setattr(hpo_study, "make_pruner", lambda plan: optuna.pruners.ThresholdPruner(lower=0.99))
    args = [
        *tiny(tmp_path, "prune"),
        "train.max_steps=3",
        "train.eval_every=1",
        "hpo.sampler=grid",
        "hpo.space={train.lr: [1.0e-4, 1.0e-3]}",
    ]
    (result,) = hpo.run_hpo([], args)
    assert result.finished and result.pruned == 2 and result.best is None
    for trial in study_trials(tmp_path, "prune"):
        assert trial.state == TrialState.PRUNED and list(trial.intermediate_values) == [1]
        status = read_status(Path(trial.user_attrs["run_dir"]))
        assert status["state"] == "pruned" and status["step"] == 1 and "pruned at step 1" in status["reason"]


@pytest.mark.slow
def test_hierarchical_end_to_end_on_tiny_bert(tmp_path):
    args = [
        *tiny(tmp_path, "e2e"),
        "train.batch_size=16",
        "train.max_steps=1",
        "hpo.mode=hierarchical",
        "hpo.hierarchical.knobs={method.gradient.eta: [0.1, 0.4]}",
        "hpo.hierarchical.lr_grid={min_exp: -4, max_exp: -3, points: 2}",
        "hpo.hierarchical.baseline_lr_points=2",
        "hpo.hierarchical.lr_neighbor_points=1",
        "hpo.hierarchical.keep_s1=1",
        "hpo.hierarchical.combine_s2=1",
        "hpo.hierarchical.seeds_s3=1",
    ]
    assert main(["hpo", *args]) == 0
    s3 = study_trials(tmp_path, "e2e-s3")
    (trial,) = s3
    assert trial.state == TrialState.COMPLETE and trial.params["method.name"] == "ours"
    status = read_status(Path(trial.user_attrs["run_dir"]))
    assert status["state"] == "completed" and status["step"] == 4  # epochs [1, 2, 4] × train.max_steps 1


# ---- killed processes -------------------------------------------------------------------------------------


def hpo_command(tmp_path: Path, study: str, *extra: str) -> list[str]:
    """The grid study as a process."""
    return [sys.executable, "-m", "loralab", "hpo", *tiny(tmp_path, study), "hpo.sampler=grid", LR_GRID, *extra]


def killing(tmp_path: Path, step: int) -> dict[str, str]:
    """The environment in which the first process to finish `step` of a trial's run SIGKILLs itself (the recipe's
    test hook): a worker dies at a known point of its trial, however fast the machine is."""
    token = tmp_path / "kill-token"
    token.touch()
    return {**os.environ, KILL_AT: f"{step}:{token}"}


def check_exactly_four(tmp_path: Path, study: str) -> list[optuna.trial.FrozenTrial]:
    trials = study_trials(tmp_path, study)
    done = completed(trials)
    assert len(done) == 4 and distinct(done) == 4
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    return trials


@pytest.mark.slow
def test_a_killed_study_resumes_to_exactly_n_trials(tmp_path):
    """The study process dies after step 1 of its first trial; run again, it fails that trial, retries it with the
    same parameters in the same run directory (resumed), and ends with exactly 4 trials."""
    command = hpo_command(tmp_path, "kill", "--n-trials", "4")
    killed = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, env=killing(tmp_path, 1))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    (victim,) = [t for t in study_trials(tmp_path, "kill") if t.state == TrialState.RUNNING]
    assert read_status(Path(victim.user_attrs["run_dir"]))["state"] == "running"

    rerun = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "4 complete, 0 pruned, 0 failed of 4" in rerun.stdout
    trials = check_exactly_four(tmp_path, "kill")
    killed_trial = next(t for t in trials if t.number == victim.number)
    assert killed_trial.state == TrialState.FAIL
    retry = next(t for t in trials if t.system_attrs.get("failed_trial") == victim.number)
    assert retry.state == TrialState.COMPLETE and retry.params == victim.params
    assert retry.user_attrs["run_dir"] == victim.user_attrs["run_dir"]  # the same run directory, resumed


@pytest.mark.slow
def test_two_workers_one_killed_still_run_exactly_n_trials(tmp_path):
    """One of two worker processes dies after step 1 of a trial; the study still ends with exactly 4 trials."""
    command = hpo_command(tmp_path, "workers", "--workers", "2")
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=killing(tmp_path, 1))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "4 complete, 0 pruned, 0 failed of 4" in done.stdout
    trials = check_exactly_four(tmp_path, "workers")
    (victim,) = [t for t in trials if t.state == TrialState.FAIL]
    retry = next(t for t in trials if t.system_attrs.get("failed_trial") == victim.number)
    assert retry.state == TrialState.COMPLETE and retry.params == victim.params
    pids = {t.user_attrs[hpo_study.WORKER]["pid"] for t in trials}
    assert len(pids) >= 2 and not (tmp_path / "kill-token").exists()


def storage_trials(storage: str, name: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=hpo_study.open_storage(storage)).get_trials(deepcopy=False)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_three_independent_workers_share_one_study_to_exactly_n_trials(tmp_path, kind):
    """Three `loralab hpo` processes started at once (as three SLURM array tasks would be) on one study."""
    storage = f"sqlite:///{tmp_path / 'hpo.db'}" if kind == "sqlite" else str(tmp_path / "hpo.log")
    command = [*hpo_command(tmp_path, "three"), f"hpo.storage={storage}"]
    workers = [
        subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    outputs = [worker.communicate(timeout=600) for worker in workers]
    assert [w.returncode for w in workers] == [0, 0, 0], [err[-1500:] for _, err in outputs]
    trials = storage_trials(storage, "three")
    done = completed(trials)
    assert len(done) == 4 and distinct(done) == 4 and len(trials) == 4
    assert sorted(p["train.lr"] for p in done) == [1.0e-4, 2.0e-4, 3.0e-4, 4.0e-4]
    pids = {t.user_attrs[hpo_study.WORKER]["pid"] for t in trials}
    assert len(pids) >= 2  # the trials were shared out, not run by whichever worker came first
