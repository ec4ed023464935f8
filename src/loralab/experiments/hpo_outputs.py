"""What a study leaves in `<io.root>/hpo/<study>/`: best_hparams.json, trials.csv, importance.png, a summary.

The figure is drawn with matplotlib (no pyplot state, no plotly): Optuna's fANOVA importances as bars when two
or more parameters vary over enough completed trials, otherwise a slice plot (the value against each parameter).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from optuna.trial import FrozenTrial, TrialState

from loralab.experiments.hpo_study import ERROR, StudyPlan, is_finished, open_study

BEST, TRIALS, PLOT = "best_hparams.json", "trials.csv", "importance.png"
MIN_TRIALS_FOR_IMPORTANCE = 4


@dataclass
class StudyResult:
    """A study after its workers stopped: the counts by outcome and the best trial (None before any completes)."""

    plan: StudyPlan
    complete: int
    pruned: int
    failed: int  # failed by an error in the run (counted); trials of dead workers are retried, not counted
    best: dict[str, Any] | None
    plot: str | None

    @property
    def finished(self) -> bool:
        return self.complete + self.pruned + self.failed >= self.plan.n_trials

    def line(self) -> str:
        counts = f"{self.complete} complete, {self.pruned} pruned, {self.failed} failed of {self.plan.n_trials}"
        if self.best is None:
            return f"hpo {self.plan.name}: {counts}; no completed trial; {self.plan.directory}"
        params = " ".join(f"{k}={v}" for k, v in self.best["params"].items())
        best = f"best {self.plan.metric}={self.best['value']:.4f} (trial {self.best['trial']}: {params})"
        return f"hpo {self.plan.name}: {counts}; {best}; {self.plan.directory}"


def write_outputs(plan: StudyPlan) -> StudyResult:
    """Read the study back and (re)write its outputs; every file is replaced atomically."""
    study = open_study(plan)
    trials = study.get_trials(deepcopy=False)
    directory = Path(plan.directory)
    directory.mkdir(parents=True, exist_ok=True)
    keys = param_keys(plan, trials)
    atomic_write(directory / TRIALS, trials_csv(trials, keys))
    best = best_record(study, plan)
    if best is not None:
        atomic_write(directory / BEST, json.dumps(best, indent=2, default=str) + "\n")
    plot = None
    if any(t.state == TrialState.COMPLETE for t in trials):
        figure, plot = draw(study, plan, keys)
        temporary = temporary_for(directory / PLOT)
        figure.savefig(temporary, dpi=100, format="png")
        temporary.replace(directory / PLOT)
    return StudyResult(
        plan,
        complete=sum(t.state == TrialState.COMPLETE for t in trials),
        pruned=sum(t.state == TrialState.PRUNED for t in trials),
        failed=sum(is_finished(t) and t.state == TrialState.FAIL for t in trials),
        best=best,
        plot=plot,
    )


def atomic_write(path: Path, text: str) -> None:
    temporary = temporary_for(path)
    temporary.write_text(text)
    temporary.replace(path)


def temporary_for(path: Path) -> Path:
    """A temporary name beside `path` of this process's own: workers that finish together each write their outputs
    (the last replace wins), and a name they shared would be renamed away under another worker."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def param_keys(plan: StudyPlan, trials: list[FrozenTrial]) -> list[str]:
    """The plan's dimensions in order, then any other parameter the trials hold."""
    keys = list(plan.dims)
    for trial in trials:
        keys += [key for key in trial.params if key not in keys]
    return keys


def trials_csv(trials: list[FrozenTrial], keys: list[str]) -> str:
    """number, state, value, one column per parameter, duration_s, run_dir (all seeds, ';'-separated), error."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["number", "state", "value", *keys, "duration_s", "run_dir", "error"])
    for trial in trials:
        duration = trial.duration.total_seconds() if trial.duration is not None else None
        writer.writerow(
            [
                trial.number,
                trial.state.name,
                "" if trial.value is None else repr(trial.value),
                *(cell(trial.params.get(key)) for key in keys),
                "" if duration is None else f"{duration:.3f}",
                ";".join(trial.user_attrs.get("run_dirs", [])),
                trial.user_attrs.get(ERROR, ""),
            ]
        )
    return buffer.getvalue()


def cell(value: Any) -> str:
    return "" if value is None else repr(value) if isinstance(value, float) else str(value)


def best_record(study: optuna.Study, plan: StudyPlan) -> dict[str, Any] | None:
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if not complete:
        return None
    best = study.best_trial
    return {
        "study": plan.name,
        "params": best.params,
        "value": best.value,
        "trial": best.number,
        "run_dir": best.user_attrs.get("run_dir"),
        "run_dirs": best.user_attrs.get("run_dirs", []),
        "metric": plan.metric,
        "direction": plan.direction,
        "seeds": list(plan.seeds),
        "score": "final"
        if plan.score_weights is None
        else dict(zip(("best", "final", "mean"), plan.score_weights, strict=True)),
        "complete_trials": len(complete),
        **plan.extra,
    }


# ---- the figure -----------------------------------------------------------------------------------


def draw(study: optuna.Study, plan: StudyPlan, keys: list[str]) -> tuple[Figure, str]:
    """fANOVA importances when they can be computed, else a slice plot; returns the figure and its kind."""
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    varying = [
        k for k in keys if all(k in t.params for t in complete) and len({repr(t.params[k]) for t in complete}) > 1
    ]
    if len(varying) >= 2 and len(complete) >= MIN_TRIALS_FOR_IMPORTANCE:
        try:
            evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
            importances = optuna.importance.get_param_importances(study, evaluator=evaluator, params=varying)
        except Exception:  # too few distinct values, incompatible distributions: the slice plot says more
            importances = None
        if importances and all(math.isfinite(v) for v in importances.values()):
            return importance_figure(plan, importances), "importance"
    return slice_figure(plan, complete, [k for k in keys if any(k in t.params for t in complete)]), "slice"


def new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def importance_figure(plan: StudyPlan, importances: dict[str, float]) -> Figure:
    names = list(importances)[::-1]
    figure = new_figure(7, 1.2 + 0.5 * len(names))
    axes = figure.add_subplot()
    axes.barh(names, [importances[n] for n in names], color="tab:blue")
    axes.set_xlabel(f"importance for {plan.metric} (fANOVA)")
    axes.set_title(f"{plan.name}: parameter importance")
    return figure


def slice_figure(plan: StudyPlan, complete: list[FrozenTrial], keys: list[str]) -> Figure:
    series = [(key, [(t.params[key], t.value) for t in complete if key in t.params]) for key in keys]
    if not series:  # nothing varied: the value against the trial number
        series = [("trial", [(t.number, t.value) for t in complete])]
    columns = min(len(series), 3)
    rows = math.ceil(len(series) / columns)
    figure = new_figure(4.2 * columns, 3.4 * rows)
    for index, (key, points) in enumerate(series):
        axes = figure.add_subplot(rows, columns, index + 1)
        xs, ys = [x for x, _ in points], [y for _, y in points]
        if all(isinstance(x, int | float) and not isinstance(x, bool) for x in xs):
            axes.scatter(xs, ys, color="tab:blue")
            dim = plan.dims.get(key)
            logarithmic = dim is not None and dim.kind == "log_uniform"
            if xs and min(xs) > 0 and (logarithmic or max(xs) / min(xs) >= 100):
                axes.set_xscale("log")
        else:
            labels = sorted({str(x) for x in xs})
            axes.scatter([labels.index(str(x)) for x in xs], ys, color="tab:blue")
            axes.set_xticks(range(len(labels)), labels)
        axes.set_xlabel(key)
        axes.set_ylabel(plan.metric)
    figure.suptitle(f"{plan.name}: {plan.metric} against each parameter")
    return figure
