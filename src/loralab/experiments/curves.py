"""`loralab report --plots DIR`: convergence curves and method-specific figures of the report's groups.

Per task (the `<task>/` level of the run directories): one figure per eval metric and one for the training loss,
x = step, one line per group (config hash) = the mean over its seeds, with a ±1 sample-std (n − 1) band where two
or more seeds have the curve. A dual-rank run's `full/<m>` is drawn as `<m>` (as in the table), `core/<m>` on its
own figure.

Step alignment: a group's curve keeps only the steps that every one of its seeds logged (the intersection); nothing
is interpolated, and each point's mean and std are over the same n seeds, so the band means the same thing along the
whole curve. Seeds of one config log at the same steps, so in practice this only cuts the tail of a seed that ran
longer. A seed that never logged the metric is left out of that metric's curve.

Method-specific figures, drawn only where the runs hold their data (otherwise one info line names what was skipped):

- Shake-to-Align: `shake/trigger_rate`, and the C2 statistics `shake/{C_r,C_R,A_b}_mean` (one panel each) from
  metrics.csv, mean ± std over seeds as above.
- GRIT: the rank k at each reprojection from `grit.csv`: the line is the mean of k over every module row the group's
  seeds wrote at that step (pooled over modules and seeds), the band its min–max; and bars of the final
  rank k_a per module from `grit_ranks.json` (mean over seeds, ± std whiskers), a dashed line at r. GRIT keeps one k
  per module for both sides (k_g = k_a), so k_a is the module's rank.
- Rank utilisation: where `loralab analyze` wrote `<run>/analysis/analysis.json`, bars of the entropy effective rank
  / r per LoRA module (mean over the seeds analysed, ± std whiskers), a dashed line at 1.

Legend labels are `<method> <config-hash>`; groups of one task that share a method also get the config keys in which
they differ (`r=16, lr=0.0001`, from each group's `config.yaml`), and `#1`, `#2`, … if the labels still collide (the
same group under two roots). A group keeps its label and colour across a task's figures. Files:
`<DIR>/<task>_<metric>`, `_train-loss`, `_shake-trigger-rate`, `_shake-c2`, `_grit-k`, `_grit-ranks`,
`_rank-utilisation`, each `.png` (150 dpi) and `.pdf` (`analysis.plots.save_figure`).
"""

from __future__ import annotations

import csv
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from loralab.analysis.plots import save_figure, width_for
from loralab.config.load import HASH_EXCLUDED, dotted_items
from loralab.experiments.report import Group
from loralab.tracking import read_metrics
from loralab.training.rundir import slug

SHAKE_C2 = ("C_r", "C_R", "A_b")
LABEL_KEYS = 3  # config differences shown in a legend label
UNHASHED = tuple(f"{section}." for section in HASH_EXCLUDED)  # the config hash's own exclusions (and `seed`)
BLOCK = re.compile(r"\.(\d+)\.")  # a numbered block in a module name (no torch import for it)


@dataclass
class Band:
    """One group's line on a figure: steps, the centre line, the band (None: no band) and the seeds behind it."""

    steps: np.ndarray
    center: np.ndarray
    low: np.ndarray | None
    high: np.ndarray | None
    seeds: int


@dataclass
class Member:
    """A group as drawn: where it lives, its label and colour, and its runs' logged curves."""

    group: Group
    task: str
    method: str
    config_hash: str
    label: str = ""
    color: str = ""
    curves: list[dict[tuple[str, str], dict[int, float]]] = field(default_factory=list)

    @classmethod
    def load(cls, group: Group) -> Member:
        task, _, method, config_hash = group.runs[0].parent.resolve().parts[-4:]  # also for a relative group path
        member = cls(group, task, method, config_hash)
        member.curves = [run_curves(run / "metrics.csv") for run in group.runs]
        return member

    def band(self, split: str, metric: str) -> Band | None:
        return seed_band([curves.get((split, metric), {}) for curves in self.curves])

    def config(self) -> dict:
        path = self.group.runs[0] / "config.yaml"
        return (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}


def run_curves(path: Path) -> dict[tuple[str, str], dict[int, float]]:
    """{(split, metric): {step: value}} of one metrics.csv; eval `full/<m>` as `<m>`; a repeated step keeps the last."""
    curves: dict[tuple[str, str], dict[int, float]] = {}
    for row in read_metrics(path):
        metric = row["metric"].removeprefix("full/") if row["split"] == "eval" else row["metric"]
        curves.setdefault((row["split"], metric), {})[row["step"]] = row["value"]
    return curves


def seed_band(per_seed: list[dict[int, float]]) -> Band | None:
    """Mean over seeds at the steps all of them logged, ± the sample std where there are two or more seeds."""
    present = [curve for curve in per_seed if curve]
    if not present:
        return None
    steps = sorted(set.intersection(*(set(curve) for curve in present)))
    if not steps:
        return None
    values = np.array([[curve[step] for step in steps] for curve in present])
    mean = values.mean(axis=0)
    if len(present) < 2:
        return Band(np.array(steps), mean, None, None, 1)
    std = values.std(axis=0, ddof=1)
    return Band(np.array(steps), mean, mean - std, mean + std, len(present))


def pooled_band(rows: list[dict[int, list[float]]]) -> Band | None:
    """Per step: the mean of every value the seeds logged (e.g. k over modules and seeds), the band its min–max."""
    pooled: dict[int, list[float]] = {}
    for per_step in rows:
        for step, values in per_step.items():
            pooled.setdefault(step, []).extend(values)
    if not pooled:
        return None
    steps = sorted(pooled)
    stack = [np.array(pooled[step]) for step in steps]
    center, low, high = (np.array([f(v) for v in stack]) for f in (np.mean, np.min, np.max))
    return Band(np.array(steps), center, low, high, sum(1 for per_step in rows if per_step))


# ---- labels --------------------------------------------------------------------------------------------------


def short_key(key: str) -> str:
    """`method.adapter.r` → `r`; `model.name` → `model` (a bare `name` says nothing)."""
    parts = key.split(".")
    return parts[-2] if parts[-1] == "name" and len(parts) > 1 else parts[-1]


def config_differences(configs: list[dict]) -> list[str]:
    """For each config, `key=value` of the hashed keys whose values differ among them (the first few)."""
    flat = [dotted_items(config) for config in configs]
    keys = list(dict.fromkeys(key for f in flat for key in f if key != "seed" and not key.startswith(UNHASHED)))
    differing = [key for key in keys if len({repr(f.get(key)) for f in flat}) > 1]
    more = "…" if len(differing) > LABEL_KEYS else ""
    shown = differing[:LABEL_KEYS]
    return [", ".join(f"{short_key(key)}={f.get(key)}" for key in shown) + more for f in flat]


def assign_labels(members: list[Member]) -> None:
    """`<method> <hash>`, the differing config keys where a method repeats, `#k` where labels still collide."""
    by_method: dict[str, list[Member]] = {}
    for member in members:
        by_method.setdefault(member.method, []).append(member)
    for same in by_method.values():
        suffixes = config_differences([m.config() for m in same]) if len(same) > 1 else [""]
        for member, suffix in zip(same, suffixes, strict=True):
            member.label = f"{member.method} {member.config_hash}" + (f" ({suffix})" if suffix else "")
    counts, seen = Counter(m.label for m in members), Counter()
    for index, member in enumerate(members):
        if counts[member.label] > 1:
            seen[member.label] += 1
            member.label = f"{member.label} #{seen[member.label]}"
        member.color = f"C{index % 10}"


# ---- figures -------------------------------------------------------------------------------------------------


def seeds_text(count: int) -> str:
    return f"{count} seed" + ("s" if count != 1 else "")


def draw_bands(axes, lines: list[tuple[Member, Band]]) -> None:
    for member, band in lines:
        marker = "." if len(band.steps) <= 40 else None
        label = f"{member.label} · {seeds_text(band.seeds)}"
        axes.plot(band.steps, band.center, color=member.color, marker=marker, linewidth=1.5, label=label)
        if band.low is not None:
            axes.fill_between(band.steps, band.low, band.high, color=member.color, alpha=0.2, linewidth=0)


def curve_figure(title: str, panels: list[tuple[str, list[tuple[Member, Band]]]]) -> Figure:
    """Lines with bands against step; one panel per (y label, lines), the legend on the first panel."""
    figure = Figure(figsize=(7.0, 4.5) if len(panels) == 1 else (4.2 * len(panels), 4.2), layout="constrained")
    all_axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for axes, (ylabel, lines) in zip(all_axes, panels, strict=True):
        draw_bands(axes, lines)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_xlabel("step")
        axes.set_ylabel(ylabel)
        axes.set_title(title if len(panels) == 1 else ylabel)
    if len(panels) > 1:
        figure.suptitle(title)
    all_axes[0].legend(fontsize="small")
    return figure


def bars_figure(
    title: str, ylabel: str, modules: list[str], bars: list[tuple[Member, dict[str, list[float]]]], reference: float
) -> Figure:
    """Grouped bars per module (one colour per group: the mean over seeds, ± std whiskers), a dashed reference line."""
    size = (width_for(len(modules) * max(1, len(bars) // 2)) + 3.0, 4.5)  # + the legend beside the axes
    figure = Figure(figsize=size, layout="constrained")
    axes = figure.add_subplot()
    width = 0.8 / len(bars)
    positions = np.arange(len(modules))
    for index, (member, values) in enumerate(bars):
        samples = [values.get(module, []) for module in modules]
        means = [np.mean(v) if v else np.nan for v in samples]
        errors = [np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in samples]
        seeds = max(len(v) for v in samples)
        offsets = positions - 0.4 + width * (index + 0.5)
        axes.bar(
            offsets, means, width=width, yerr=errors, color=member.color, label=f"{member.label} · {seeds_text(seeds)}"
        )
    axes.axhline(reference, color="grey", linestyle="--", linewidth=1)
    axes.set_xticks(positions, module_labels(modules), rotation=60, ha="right", fontsize="small")
    axes.set_xlabel("module")
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return figure


# ---- data of the method-specific figures ---------------------------------------------------------------------


def grit_rows(run: Path) -> dict[int, list[float]]:
    """{step: [k of each module reprojected then]} from a run's grit.csv ({} without one)."""
    path = run / "grit.csv"
    if not path.exists():
        return {}
    per_step: dict[int, list[float]] = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            per_step.setdefault(int(row["step"]), []).append(float(row["k"]))
    return per_step


def per_module(documents: list[dict[str, float]]) -> dict[str, list[float]]:
    """{module: [value of each seed that has it]}."""
    values: dict[str, list[float]] = {}
    for document in documents:
        for module, value in document.items():
            values.setdefault(module, []).append(float(value))
    return values


def grit_final_ranks(member: Member) -> tuple[dict[str, list[float]], float]:
    """{module: [final k_a per seed]} from grit_ranks.json, and the largest r."""
    paths = [run / "grit_ranks.json" for run in member.group.runs]
    documents = [json.loads(path.read_text()) for path in paths if path.exists()]
    ranks = per_module([{module: entry["k_a"] for module, entry in doc.items()} for doc in documents])
    return ranks, max((entry["r"] for doc in documents for entry in doc.values()), default=0)


def rank_utilisation(member: Member) -> dict[str, list[float]]:
    """{module: [effective rank / r per analysed seed]} from `<run>/analysis/analysis.json`."""
    paths = [run / "analysis" / "analysis.json" for run in member.group.runs]
    documents = [json.loads(path.read_text()) for path in paths if path.exists()]
    modules = [doc.get("lora", {}).get("modules", []) for doc in documents]
    return per_module([{m["module"]: m["rank_utilisation"] for m in seed} for seed in modules])


def module_labels(modules: list[str]) -> list[str]:
    """`L<block>.<last name>` as `loralab analyze` labels modules, `L<block>.<all names after the block index>` where
    two would read the same (`L0.attention.output.dense`); outside numbered blocks the last two names."""

    def label(module: str, whole: bool) -> str:
        match = BLOCK.search(f".{module}.")
        if match is None:
            return ".".join(module.split(".")[-2:])
        tail = f".{module}."[match.end() :].strip(".")
        return f"L{match.group(1)}.{tail if whole else tail.rsplit('.', 1)[-1]}"

    short = [label(module, whole=False) for module in modules]
    counts = Counter(short)
    return [label(m, whole=True) if counts[s] > 1 else s for m, s in zip(modules, short, strict=True)]


def module_order(names) -> list[str]:
    """Modules in natural order (layer 2 before layer 10)."""
    return sorted(set(names), key=lambda name: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)])


# ---- one task's figures ----------------------------------------------------------------------------------------


def lines_of(members: list[Member], split: str, metric: str) -> list[tuple[Member, Band]]:
    return [(m, band) for m in members if (band := m.band(split, metric)) is not None]


def task_figures(task: str, members: list[Member], found: set[str]) -> dict[str, Figure]:
    """`<task>_<name>` → Figure for one task's groups; adds the kinds of method data seen to `found`."""
    figures: dict[str, Figure] = {}
    eval_metrics = sorted({metric for m in members for c in m.curves for split, metric in c if split == "eval"})
    for metric in eval_metrics:
        lines = lines_of(members, "eval", metric)
        if lines:
            figures[f"{task}_{slug(metric)}"] = curve_figure(
                f"{task}: {metric} (mean ± std over seeds)", [(metric, lines)]
            )
    if lines := lines_of(members, "train", "loss"):
        figures[f"{task}_train-loss"] = curve_figure(
            f"{task}: training loss (mean ± std over seeds)", [("training loss", lines)]
        )

    if lines := lines_of(members, "train", "shake/trigger_rate"):
        found.add("shake")
        title = f"{task}: Shake-to-Align trigger rate (mean ± std over seeds)"
        figures[f"{task}_shake-trigger-rate"] = curve_figure(title, [("share of blocks triggered", lines)])
    panels = [(f"{s} (mean over blocks)", lines_of(members, "train", f"shake/{s}_mean")) for s in SHAKE_C2]
    if panels := [(ylabel, lines) for ylabel, lines in panels if lines]:
        found.add("shake")
        figures[f"{task}_shake-c2"] = curve_figure(
            f"{task}: Shake-to-Align C2 statistics (mean ± std over seeds)", panels
        )

    grit_lines = [(m, band) for m in members if (band := pooled_band([grit_rows(r) for r in m.group.runs]))]
    if grit_lines:
        found.add("grit.csv")
        title = f"{task}: GRIT rank k per module (mean, min–max band)"
        figures[f"{task}_grit-k"] = curve_figure(title, [("rank k at reprojection", grit_lines)])
    finals = [(m, *grit_final_ranks(m)) for m in members]
    if finals := [(m, ranks, r) for m, ranks, r in finals if ranks]:
        found.add("grit_ranks.json")
        modules = module_order(module for _, ranks, _ in finals for module in ranks)
        bars = [(m, ranks) for m, ranks, _ in finals]
        r = max(r for _, _, r in finals)
        figures[f"{task}_grit-ranks"] = bars_figure(f"{task}: GRIT final rank k (r = {r})", "k", modules, bars, r)
    analysed = [(m, values) for m in members if (values := rank_utilisation(m))]
    if analysed:
        found.add("analysis")
        modules = module_order(module for _, values in analysed for module in values)
        title = f"{task}: rank utilisation (entropy effective rank / r)"
        figures[f"{task}_rank-utilisation"] = bars_figure(title, "effective rank / r", modules, analysed, 1.0)
    return figures


MISSING = {
    "shake": "Shake-to-Align (no shake/* metrics)",
    "grit.csv": "GRIT k vs step (no grit.csv rows)",
    "grit_ranks.json": "GRIT final ranks (no grit_ranks.json)",
    "analysis": "rank utilisation (no analysis/analysis.json; `loralab analyze RUN` writes it)",
}


def report_figures(groups: list[Group]) -> tuple[dict[str, Figure], list[str]]:
    """Every figure of the groups, by file stem, and the info lines on what was skipped for want of data."""
    tasks: dict[str, list[Member]] = {}
    for group in groups:
        member = Member.load(group)
        tasks.setdefault(member.task, []).append(member)
    figures: dict[str, Figure] = {}
    found: set[str] = set()
    for task, members in tasks.items():
        assign_labels(members)
        figures |= task_figures(task, members, found)
    skipped = [text for kind, text in MISSING.items() if kind not in found]
    notes = [f"report: plots skipped, no data in these runs: {'; '.join(skipped)}"] if skipped else []
    if not figures:
        notes.append("report: no curves to plot (no eval or training-loss rows in metrics.csv)")
    return figures, notes


def write_plots(groups: list[Group], directory: Path) -> tuple[list[Path], list[str]]:
    """Save every figure as `<directory>/<stem>.png` and `.pdf`; the files written and the info lines."""
    figures, notes = report_figures(groups)
    files = [path for stem, figure in figures.items() for path in save_figure(figure, directory, stem)]
    return files, notes
