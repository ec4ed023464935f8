"""`loralab report --plots`: curves are numpy's mean ± sample std over seeds, figures are drawn, labelled and only
where their data exist; the table on stdout does not change."""

from __future__ import annotations

import csv
import json

import matplotlib.image
import numpy as np
import pytest
import yaml
from matplotlib.container import BarContainer, ErrorbarContainer

from loralab.cli import main
from loralab.experiments.curves import Member, assign_labels, module_labels, report_figures, write_plots
from loralab.experiments.report import find_groups
from loralab.tracking import CSV_FIELDS

STEPS = (10, 20, 30)


def write_run(root, method, config_hash, seed, rows, *, r=8, task="task", state="completed"):
    """A run directory: status, eval.json, config.yaml and `rows` [(step, split, metric, value)] as metrics.csv."""
    run = root / task / "model" / method / config_hash / f"seed{seed}"
    run.mkdir(parents=True)
    final = {metric: value for _, split, metric, value in rows if split == "eval"}
    (run / "eval.json").write_text(json.dumps({"metrics": final, "n": 10}))
    status = {"state": state, "trainable_params": 50, "total_params": 1000, "step_time_s": 0.1, "peak_mem_mb": 1.0}
    (run / "status.json").write_text(json.dumps(status | {"tokens_per_s": 100.0}))
    config = {"seed": seed, "method": {"name": method, "adapter": {"r": r}}, "io": {"root": str(root)}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    with open(run / "metrics.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_FIELDS)
        writer.writerows((step, split, metric, value, 0.0) for step, split, metric, value in rows)
    return run


def curve_rows(split, metric, values, steps=STEPS):
    return [(step, split, metric, float(value)) for step, value in zip(steps, values, strict=True)]


def write_grit(run, ks, final):
    """grit.csv rows {step: [k per module]} over modules m0, m1, …; grit_ranks.json {module: final k} at r 8."""
    with open(run / "grit.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(("step", "module", "r", "k", "two_sided", "eig_a_0"))
        for step, per_module in ks.items():
            writer.writerows((step, f"layer.{i}.q", 8, k, True, 1.0) for i, k in enumerate(per_module))
    ranks = {f"layer.{i}.q": {"r": 8, "k_a": k, "k_g": k} for i, k in enumerate(final)}
    (run / "grit_ranks.json").write_text(json.dumps(ranks))


LORA_ACC = {1: [0.5, 0.6, 0.7], 2: [0.4, 0.7, 0.8], 3: [0.6, 0.65, 0.9]}
LORA_LOSS = {1: [0.9, 0.6, 0.4], 2: [1.0, 0.7, 0.5], 3: [0.8, 0.5, 0.45]}
OURS = {1: ([0.6, 0.7, 0.8], [0.5, 0.55, 0.6], [0.2, 0.4, 0.1]), 2: ([0.5, 0.8, 0.9], [0.4, 0.6, 0.7], [0.1, 0.3, 0.3])}
GRIT_K = {1: {10: [8, 6, 7], 20: [5, 6, 4]}, 2: {10: [8, 8, 7], 20: [6, 3, 4]}}
GRIT_FINAL = {1: [5, 6, 4], 2: [6, 3, 4]}


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    for seed in LORA_ACC:
        rows = curve_rows("eval", "accuracy", LORA_ACC[seed]) + curve_rows("train", "loss", LORA_LOSS[seed])
        if seed == 1:
            rows.append((40, "eval", "accuracy", 0.95))  # only one seed has step 40: left out of the curve
        write_run(root, "lora", "abcd1234", seed, rows)
    write_run(root, "lora", "eeee5555", 1, curve_rows("eval", "accuracy", [0.3, 0.5, 0.6]), r=16)
    write_run(root, "lora", "abcd1234", 4, curve_rows("eval", "accuracy", [0.0, 0.0, 0.0]), state="failed")
    for seed, (full, core, trigger) in OURS.items():
        rows = curve_rows("eval", "full/accuracy", full) + curve_rows("eval", "core/accuracy", core)
        rows += curve_rows("train", "loss", [0.9, 0.7, 0.6]) + curve_rows("train", "shake/trigger_rate", trigger)
        for name in ("C_r", "C_R", "A_b"):
            rows += curve_rows("train", f"shake/{name}_mean", [seed * 0.1, 0.2, 0.3])
        write_run(root, "ours", "1234abcd", seed, rows)
    for seed in GRIT_K:
        run = write_run(root, "grit", "9999aaaa", seed, curve_rows("eval", "accuracy", [0.5, 0.6, 0.7]))
        write_grit(run, GRIT_K[seed], GRIT_FINAL[seed])
        modules = [
            {"module": f"layer.{i}.q", "label": f"L{i}.q", "r": 8, "rank_utilisation": 0.1 * (i + seed)}
            for i in range(3)
        ]
        (run / "analysis").mkdir()
        (run / "analysis" / "analysis.json").write_text(json.dumps({"lora": {"modules": modules}}))
    return root


def line(figure, prefix, axes=0):
    [found] = [item for item in figure.axes[axes].get_lines() if item.get_label().startswith(prefix)]
    return found


def band_limits(collection, steps=STEPS):
    """{x: (lowest y, highest y)} of a fill_between polygon."""
    vertices = collection.get_paths()[0].vertices
    return {x: (vertices[vertices[:, 0] == x, 1].min(), vertices[vertices[:, 0] == x, 1].max()) for x in steps}


def assert_band(figure, prefix, values):
    """The group's line is the mean over seeds at each step and its band mean ± sample std."""
    mean, std = values.mean(axis=0), values.std(axis=0, ddof=1)
    drawn = line(figure, prefix)
    np.testing.assert_array_equal(drawn.get_xdata(), STEPS)
    np.testing.assert_allclose(drawn.get_ydata(), mean)
    [band] = [c for c in figure.axes[0].collections if np.allclose(c.get_facecolor()[0][:3], drawn_rgb(drawn))]
    limits = band_limits(band)
    np.testing.assert_allclose([limits[x] for x in STEPS], np.stack([mean - std, mean + std], axis=1))


def drawn_rgb(artist):
    return matplotlib.colors.to_rgb(artist.get_color())


def test_curves_are_mean_and_sample_std_over_seeds(runs):
    figures, _ = report_figures(find_groups([runs]))
    assert_band(figures["task_accuracy"], "lora abcd1234", np.array(list(LORA_ACC.values())))
    assert_band(figures["task_train-loss"], "lora abcd1234", np.array(list(LORA_LOSS.values())))
    assert_band(figures["task_accuracy"], "ours", np.array([full for full, _, _ in OURS.values()]))  # full/ as plain
    assert_band(figures["task_core-accuracy"], "ours", np.array([core for _, core, _ in OURS.values()]))
    assert_band(figures["task_shake-trigger-rate"], "ours", np.array([t for _, _, t in OURS.values()]))
    single = line(figures["task_accuracy"], "lora eeee5555")  # one seed: its values, no band
    np.testing.assert_allclose(single.get_ydata(), [0.3, 0.5, 0.6])
    assert len(figures["task_accuracy"].axes[0].collections) == 3
    assert [len(axes.get_lines()) for axes in figures["task_shake-c2"].axes] == [1, 1, 1]


def test_pngs_are_drawn_and_labelled(runs, tmp_path):
    groups = find_groups([runs])
    files, notes = write_plots(groups, tmp_path / "plots")
    figures, _ = report_figures(groups)
    assert notes == []
    assert sorted(path.name for path in files) == sorted(f"{stem}.{ext}" for stem in figures for ext in ("png", "pdf"))
    for path in files:
        assert path.stat().st_size > 0
        if path.suffix == ".png":
            assert matplotlib.image.imread(path).var() > 0
    for stem, figure in figures.items():
        figure.canvas.draw()
        for axes in figure.axes:
            assert axes.get_title() and axes.get_xlabel() and axes.get_ylabel(), stem
            assert any(t.get_text() for t in axes.get_xticklabels()) and any(
                t.get_text() for t in axes.get_yticklabels()
            )
    legend = [t.get_text() for t in figures["task_accuracy"].axes[0].get_legend().get_texts()]
    assert len(legend) == len(set(legend)) == 4  # grit, lora ×2, ours: one entry per group
    assert legend[0] == "grit 9999aaaa · 2 seeds" and legend[3] == "ours 1234abcd · 2 seeds"
    assert legend[1:3] == ["lora abcd1234 (r=8) · 3 seeds", "lora eeee5555 (r=16) · 1 seed"]  # the differing key


def test_method_figures_only_where_their_data_exist(runs, tmp_path):
    figures, notes = report_figures(find_groups([runs]))
    stems = {"task_shake-trigger-rate", "task_shake-c2", "task_grit-k", "task_grit-ranks", "task_rank-utilisation"}
    assert stems <= set(figures) and notes == []
    assert [item.get_label() for item in figures["task_shake-trigger-rate"].axes[0].get_lines()] == [
        "ours 1234abcd · 2 seeds"
    ]
    plain = tmp_path / "plain"
    write_run(plain, "lora", "abcd1234", 1, curve_rows("eval", "accuracy", [0.1, 0.2, 0.3]))
    figures, notes = report_figures(find_groups([plain]))
    assert set(figures) == {"task_accuracy"}
    [note] = notes  # one info line names everything skipped
    assert note.startswith("report: plots skipped") and all(
        k in note for k in ("Shake", "GRIT k", "GRIT final", "rank")
    )


def test_grit_rank_line_is_the_mean_over_modules(runs):
    figures, _ = report_figures(find_groups([runs]))
    figure = figures["task_grit-k"]
    drawn = line(figure, "grit 9999aaaa")
    pooled = {step: [k for seed in GRIT_K.values() for k in seed[step]] for step in (10, 20)}
    np.testing.assert_array_equal(drawn.get_xdata(), [10, 20])
    np.testing.assert_allclose(drawn.get_ydata(), [np.mean(pooled[10]), np.mean(pooled[20])])
    limits = band_limits(figure.axes[0].collections[0], steps=(10, 20))
    assert limits == {step: (min(values), max(values)) for step, values in pooled.items()}  # min–max over modules
    final = np.array(list(GRIT_FINAL.values()))
    ranks = figures["task_grit-ranks"].axes[0]
    [bars] = [c for c in ranks.containers if isinstance(c, BarContainer)]
    np.testing.assert_allclose([b.get_height() for b in bars], final.mean(axis=0))
    [whiskers] = [c for c in ranks.containers if isinstance(c, ErrorbarContainer)]
    segments = whiskers.lines[2][0].get_segments()
    np.testing.assert_allclose([s[1, 1] - s[0, 1] for s in segments], 2 * final.std(axis=0, ddof=1))
    [bars] = [c for c in figures["task_rank-utilisation"].axes[0].containers if isinstance(c, BarContainer)]
    np.testing.assert_allclose([b.get_height() for b in bars], [0.15, 0.25, 0.35])  # mean over the two seeds


def test_labels_tell_groups_and_modules_apart(tmp_path):
    for root in ("a", "b"):  # the same group under two roots
        write_run(tmp_path / root, "lora", "abcd1234", 1, curve_rows("eval", "accuracy", [0.1, 0.2, 0.3]))
    members = [Member.load(group) for group in find_groups([tmp_path / "a", tmp_path / "b"])]
    assign_labels(members)
    assert [m.label for m in members] == ["lora abcd1234 #1", "lora abcd1234 #2"]
    assert [m.color for m in members] == ["C0", "C1"]
    names = [f"encoder.layer.0.{tail}" for tail in ("attention.output.dense", "output.dense", "attention.self.query")]
    assert module_labels([*names, "classifier.dense"]) == [
        "L0.attention.output.dense",  # two modules of block 0 end in `dense`: the names after the block index
        "L0.output.dense",
        "L0.query",
        "classifier.dense",
    ]


def test_cli_plots_leave_the_table_unchanged(runs, tmp_path, capsys):
    assert main(["report", str(runs)]) == 0
    table = capsys.readouterr().out
    assert main(["report", str(runs), "--plots", str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    assert captured.out == table
    written = [text.removeprefix("plot: ") for text in captured.err.splitlines() if text.startswith("plot: ")]
    stems, _ = report_figures(find_groups([runs]))
    expected = {str(tmp_path / "out" / f"{stem}.{ext}") for stem in stems for ext in ("png", "pdf")}
    assert len(stems) == 8 and set(written) == expected == {str(p) for p in (tmp_path / "out").iterdir()}


def test_cli_without_completed_runs_is_one_line_and_exit_2(tmp_path, capsys):
    write_run(
        tmp_path / "runs", "lora", "abcd1234", 1, curve_rows("eval", "accuracy", [0.1, 0.2, 0.3]), state="running"
    )
    assert main(["report", str(tmp_path / "runs"), "--plots", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.splitlines()) == 1
    assert captured.err.startswith("loralab: error: no completed runs") and not (tmp_path / "out").exists()
