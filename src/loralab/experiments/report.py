"""`loralab report`: completed runs grouped by everything but the seed, as mean ± std tables (Markdown, CSV, LaTeX).

A group is a config-hash directory (`<task>/<model>/<method>/<hash>/`); its seeds are the `seed*/` runs in it
that completed. A dual-rank run's full view is reported as the plain metric, beside its `core/` metric, so
methods line up in one column. Final metrics come from `eval.json`; best metrics are the maxima of each run's
eval curve in `metrics.csv`. The std is the sample standard deviation (n − 1); one seed shows no ± part.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from loralab.errors import RunError
from loralab.tracking import read_metrics
from loralab.training.rundir import read_status


@dataclass
class Group:
    """The completed seeds of one configuration."""

    name: str
    runs: list[Path]

    def final(self) -> dict[str, list[float]]:
        return collect(json.loads((run / "eval.json").read_text())["metrics"] for run in self.runs)

    def best(self) -> dict[str, list[float]]:
        return collect(best_eval(run) for run in self.runs)

    def status(self, key: str) -> list[float]:
        values = (read_status(run).get(key) for run in self.runs)
        return [float(value) for value in values if value is not None]


def collect(per_run) -> dict[str, list[float]]:
    """Values per metric over runs; `full/<m>` (the adapter as trained) is reported as `<m>`, `core/<m>` kept."""
    values: dict[str, list[float]] = {}
    for metrics in per_run:
        for name, value in metrics.items():
            values.setdefault(name.removeprefix("full/"), []).append(float(value))
    return values


def best_eval(run: Path) -> dict[str, float]:
    """The best value of each eval metric over the run's eval curve (max: loralab's eval metrics are higher-better)."""
    best: dict[str, float] = {}
    for row in read_metrics(run / "metrics.csv"):
        if row["split"] == "eval":
            best[row["metric"]] = max(best.get(row["metric"], row["value"]), row["value"])
    return best


def find_groups(paths: list[Path]) -> list[Group]:
    """Completed runs under `paths`, grouped by their config-hash directory."""
    runs: dict[Path, list[Path]] = {}
    for root in paths:
        if not root.exists():
            raise RunError(f"no such run directory: {root}")
        for eval_file in sorted(root.rglob("eval.json")):
            run = eval_file.parent
            if run.name.startswith("seed") and read_status(run).get("state") == "completed":
                runs.setdefault(run.parent, []).append(run)
    if not runs:
        raise RunError(f"no completed runs under {', '.join(map(str, paths))}")
    return [Group(name="/".join(group.parts[-4:]), runs=members) for group, members in sorted(runs.items())]


def mean_std(values: list[float], digits: int = 4) -> str:
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table(groups: list[Group]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: group, seeds, final and best of every eval metric, trainable %, mean step time (s), tokens/s,
    peak memory."""
    finals, bests = [g.final() for g in groups], [g.best() for g in groups]
    metrics = sorted({name for final in finals for name in final})
    header = [
        "run",
        "seeds",
        *metrics,
        *(f"best {m}" for m in metrics),
        "trainable %",
        "step s",
        "tokens/s",
        "peak MB",
    ]
    rows = []
    for group, final, best in zip(groups, finals, bests, strict=True):
        counts = zip(group.status("trainable_params"), group.status("total_params"), strict=True)
        trainable = [100 * t / n for t, n in counts]
        rows.append(
            [
                group.name,
                str(len(group.runs)),
                *(mean_std(final.get(m, [])) for m in metrics),
                *(mean_std(best.get(m, [])) for m in metrics),
                mean_std(trainable, 3),
                mean_std(group.status("step_time_s"), 3),
                mean_std(group.status("tokens_per_s"), 1),
                mean_std(group.status("peak_mem_mb"), 1),
            ]
        )
    return header, rows


def summaries(groups: list[Group]) -> list[dict]:
    """Each group as data (`report --json`): its run directories, and per eval metric the mean and sample std of
    the final values and the mean of the best ones (std null for one seed)."""
    return [
        {
            "name": group.name,
            "directories": [str(run) for run in group.runs],
            "metrics": {name: statistics.mean(values) for name, values in final.items()},
            "std": {name: statistics.stdev(values) if len(values) > 1 else None for name, values in final.items()},
            "best": {name: statistics.mean(values) for name, values in group.best().items()},
        }
        for group, final in ((group, group.final()) for group in groups)
    ]
