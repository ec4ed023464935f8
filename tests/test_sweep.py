"""`loralab sweep`: expansion order and parsing, errors, idempotent re-runs, the report's statistics, --jobs."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import yaml

from conftest import TINY
from loralab.cli import main
from loralab.errors import ConfigError
from loralab.experiments.sweep import ABLATIONS, expand, plan_sweep, split_values
from loralab.tracking import read_metrics


def sweep(root, *argv):
    return main(["sweep", *TINY, f"io.root={root}", *argv])


def parse_table(text: str) -> list[dict[str, str]]:
    """The Markdown table's rows as dicts keyed by the header."""
    lines = [line.strip("|").split(" | ") for line in text.splitlines() if line.startswith("| ")]
    header, *rows = ([cell.strip() for cell in line] for line in lines)
    return [dict(zip(header, row, strict=True)) for row in rows]


def numpy_mean_std(values, digits):
    values = np.array(values, dtype=float)
    return f"{values.mean():.{digits}f} ± {values.std(ddof=1):.{digits}f}"


# ---- expansion ------------------------------------------------------------------------------------


def test_expansion_is_the_product_in_a_stable_order():
    grids = ["method.adapter.dropout=0.0,0.1", "train.scheduler=linear,cosine"]
    lists = expand(["train.lr=1e-3"], grids, "rank", [1, 2])
    expected = [
        [
            "io.overwrite=skip",
            "train.lr=1e-3",
            *rank,
            f"method.adapter.dropout={d}",
            f"train.scheduler={s}",
            f"seed={k}",
        ]
        for rank, d, s, k in itertools.product(ABLATIONS["rank"], ("0.0", "0.1"), ("linear", "cosine"), (1, 2))
    ]
    assert len(lists) == 3 * 2 * 2 * 2 == 24
    assert lists == expected
    assert lists[0][2:4] == ["method.adapter.r=4", "method.adapter.alpha=8"]
    assert lists[1][-1] == "seed=2" and lists[2][-2:] == ["train.scheduler=cosine", "seed=1"]  # seeds fastest
    assert expand([], [], None, [42], skip_by_default=False) == [["seed=42"]]
    assert len(expand()) == 3  # the protocol's seeds 42, 1337, 2024


def test_ablation_presets_resolve_to_the_protocol_values():
    def values(name, *keys):
        runs = plan_sweep([], TINY, ablation=name, seeds=[1])
        return [tuple(getattr(run.config.method.adapter, key) for key in keys) for run in runs]

    assert values("rank", "r", "alpha") == [(4, 8.0), (8, 16.0), (16, 32.0)]
    assert values("alpha", "r", "alpha") == [(8, 8.0), (8, 16.0), (8, 32.0)]
    assert values("modules", "target_modules") == [("standard",), ("extended",), ("all-linear",)]


def test_grid_values_parse_as_yaml_with_bracketed_lists():
    grids = [
        "train.lr=1e-4,3.0e-4",
        "train.deterministic=true,false",
        "method.adapter.target_modules=[query,value],[query, key, value],all-linear",
    ]
    runs = plan_sweep([], TINY, grids, seeds=[7])
    assert len(runs) == 2 * 2 * 3
    seen = {
        (r.config.train.lr, r.config.train.deterministic, str(r.config.method.adapter.target_modules)) for r in runs
    }
    assert {lr for lr, _, _ in seen} == {1e-4, 3e-4}
    assert {flag for _, flag, _ in seen} == {True, False}
    assert {t for *_, t in seen} == {"['query', 'value']", "['query', 'key', 'value']", "all-linear"}
    assert all(run.config.seed == 7 for run in runs)
    assert split_values("'a,b',[1,{x: 2, y: 3}],c") == ["'a,b'", "[1,{x: 2, y: 3}]", "c"]


def test_a_misspelled_task_fails_the_sweep_before_anything_trains():
    overrides = [text for text in TINY if not text.startswith("task.name=")]
    with pytest.raises(ConfigError, match="unknown task 'synthetic/sentimnt'"):
        plan_sweep([], [*overrides, "task.name=synthetic/sentimnt"], seeds=[1])


def test_overwrite_defaults_to_skip_unless_set(tmp_path):
    assert {run.config.io.overwrite for run in plan_sweep([], TINY, seeds=[1])} == {"skip"}
    assert plan_sweep([], [*TINY, "io.overwrite=force"], seeds=[1])[0].config.io.overwrite == "force"
    config = tmp_path / "exp.yaml"
    config.write_text("io:\n  overwrite: resume\n")
    assert plan_sweep([str(config)], TINY, seeds=[1])[0].config.io.overwrite == "resume"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--ablation", "rnak"], "unknown ablation 'rnak' (did you mean 'rank'?)"),
        (["--grid", "method.adapter.r"], "--grid 'method.adapter.r' is not of the form a.b.c=v1,v2"),
        (["--grid", "=4,8"], "is not of the form"),
        (["--grid", "method.adapter.r="], "--grid method.adapter.r has no values"),
        (["--grid", "method.adapter.r=4,,8"], "has an empty value"),
        (["--grid", "method.adapter.r=4", "--grid", "method.adapter.r=8"], "given more than once"),
        (["--grid", "seed=1,2"], "give the seeds with --seeds"),
        (["--ablation", "rank", "--grid", "method.adapter.alpha=4"], "conflicts with --ablation rank"),
        (["method.adapter.r=4", "--grid", "method.adapter.r=8,16"], "method.adapter.r is set by the sweep"),
        (["--seeds", "1,x"], "--seeds takes comma-separated integers"),
        (["--seeds", "1,1"], "repeats a seed"),
        (["--seeds", "-3"], "non-negative"),
        (["--jobs", "0"], "--jobs must be ≥ 1"),
        (["--grid", "method.adapter.rr=4,8"], "unknown key 'method.adapter.rr' (did you mean 'r'?)"),
        (["--grid", "method.adapter.r=4,big"], "sweep run 4/6 (method.adapter.r=big seed=42): method.adapter.r:"),
        (["--grid", "log.every=1,2", "--seeds", "1"], "resolve to the same run directory"),
        (["io.overwrite=ask"], "io.overwrite=ask is interactive"),
    ],
)
def test_bad_sweeps_are_one_line_and_exit_2(tmp_path, capsys, argv, message):
    assert sweep(tmp_path / "runs", *argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("loralab: error: ") and captured.err.count("\n") == 1
    assert message in captured.err
    assert not (tmp_path / "runs").exists()


def test_dry_run_lists_the_runs_and_trains_nothing(tmp_path, capsys):
    root = tmp_path / "runs"
    assert sweep(root, "--grid", "method.adapter.r=4,8", "--seeds", "42,1337", "--dry-run") == 0
    shared, *lines = capsys.readouterr().out.splitlines()
    assert shared == f"every run: {' '.join(TINY)} io.root={root}"  # the quickstart sets io.overwrite=skip itself
    assert lines[-1] == "4 runs: 4 to run, 0 to skip"
    assert [line.split()[:2] for line in lines[:-1]] == [[f"[{i}/4]", "run"] for i in range(1, 5)]
    assert lines[0].endswith("/seed42  method.adapter.r=4 seed=42") and lines[3].endswith(
        "method.adapter.r=8 seed=1337"
    )
    assert str(root / "synthetic-sentiment" / "tiny-bert" / "lora") in lines[0]
    assert not root.exists()


# ---- running --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sweep_runs_once_then_skips_and_reports_numpy_statistics(tmp_path, capsys):
    root = tmp_path / "runs"
    argv = ["--grid", "method.adapter.r=4,8", "--seeds", "42,1337", "--out", str(tmp_path / "table.md")]
    assert sweep(root, *argv) == 0
    first = capsys.readouterr()
    runs = sorted(root.rglob("seed*"))
    assert len(runs) == 4 and len({run.parent for run in runs}) == 2
    assert all(json.loads((run / "status.json").read_text())["state"] == "completed" for run in runs)
    assert {run.name for run in runs} == {"seed42", "seed1337"}
    assert first.err.count(" done ") == 4 and (tmp_path / "table.md").read_text() == first.out

    rows = {row["run"].rsplit("/", 1)[-1]: row for row in parse_table(first.out)}
    assert set(rows) == {run.parent.name for run in runs}
    for group in {run.parent for run in runs}:
        row, seeds = rows[group.name], sorted(group.glob("seed*"))
        assert row["seeds"] == "2"
        accuracy = [json.loads((seed / "eval.json").read_text())["metrics"]["accuracy"] for seed in seeds]
        assert row["accuracy"] == numpy_mean_std(accuracy, 4)
        status = [json.loads((seed / "status.json").read_text()) for seed in seeds]
        assert row["step s"] == numpy_mean_std([s["step_time_s"] for s in status], 3)
        assert row["tokens/s"] == numpy_mean_std([s["tokens_per_s"] for s in status], 1)
        rank = yaml.safe_load((seeds[0] / "config.yaml").read_text())["method"]["adapter"]["r"]
        assert f"{row['run']}: method.adapter.r={rank}" in first.err  # the legend names each group's point

    stamps = {run: ((run / "status.json").stat().st_mtime_ns, (run / "eval.json").stat().st_mtime_ns) for run in runs}
    ended = {run: json.loads((run / "status.json").read_text())["ended"] for run in runs}
    assert sweep(root, *argv) == 0
    again = capsys.readouterr()
    assert again.err.count(" skipped (completed) ") == 4 and " started " not in again.err
    assert {
        run: ((run / "status.json").stat().st_mtime_ns, (run / "eval.json").stat().st_mtime_ns) for run in runs
    } == (stamps)
    assert {run: json.loads((run / "status.json").read_text())["ended"] for run in runs} == ended
    assert sorted(root.rglob("seed*")) == runs and again.out == first.out

    assert sweep(root, *argv, "--dry-run") == 0
    assert capsys.readouterr().out.splitlines()[-1] == "4 runs: 0 to run, 4 to skip"


@pytest.mark.slow
def test_jobs_2_trains_in_child_processes_and_matches_jobs_1(tmp_path, capsys, monkeypatch):
    grid = ["--grid", "method.adapter.r=4,8", "--seeds", "42"]
    assert sweep(tmp_path / "one", *grid) == 0

    def no_training_here(*args, **kwargs):
        raise AssertionError("--jobs 2 must train in child processes")

    monkeypatch.setattr("loralab.training.recipe.run_training", no_training_here)
    assert sweep(tmp_path / "two", *grid, "--jobs", "2") == 0
    assert capsys.readouterr().err.count(" done ") == 4  # two runs in each sweep

    one = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("seed*"))
    two = sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("seed*"))
    assert one == two and len(one) == 2
    for run in one:
        a, b = tmp_path / "one" / run, tmp_path / "two" / run
        assert json.loads((a / "eval.json").read_text()) == json.loads((b / "eval.json").read_text())
        curve = lambda d: [r for r in read_metrics(d / "metrics.csv") if r["metric"] in ("loss", "grad_norm")]  # noqa: E731
        assert curve(a) == curve(b) and curve(a)


@pytest.mark.slow
def test_a_failed_run_does_not_stop_the_others(tmp_path, capsys):
    root = tmp_path / "runs"
    argv = ["sweep", *TINY[1:], f"io.root={root}", "--grid", "model.name=no-such-model,tiny-bert", "--seeds", "42"]
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert "[1/2] failed model.name=no-such-model seed=42: cannot load model 'no-such-model'" in captured.err
    assert "[2/2] done model.name=tiny-bert seed=42" in captured.err
    assert "loralab: 1 of 2 runs failed:" in captured.err
    (row,) = parse_table(captured.out)
    assert row["run"].startswith("synthetic-sentiment/tiny-bert/lora/") and row["seeds"] == "1"
    assert [run.parent.parent.parent.name for run in root.rglob("seed42")] == ["tiny-bert"]


def test_expand_rejects_an_empty_seed_list():
    with pytest.raises(ConfigError, match="at least one seed"):
        expand([], [], None, [])
