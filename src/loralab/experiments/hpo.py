"""`loralab hpo`: Optuna studies over a config's hyper-parameters, one run directory per trial and seed.

Three shapes, each a list of `StudyPlan`s run one after the other (`hpo_study.optimize` runs one):

- single (`hpo.mode: single`): one study over `hpo.space` with the grid, TPE or random sampler;
- hierarchical (`hpo.mode: hierarchical`, the Shake-to-Align scaffold's protocol): stage `baseline` tunes the
  baseline's lr over evenly chosen points of a log grid; its best_hparams.json seeds the method's stages, whose lr stays
  within the grid points around the best baseline lr: s1 tries each knob's candidates one knob at a time and
  keeps the best few per knob, s2 tries their product, s3 reruns the best combinations longer, over seeds,
  scored on the eval curve. Each stage is its own study (`<name>-baseline`, `-s1`, `-s2`, `-s3`);
- top-k (`hpo.top_k`, the `final` schedule): the best configs of a source study (the `preeval` one) rerun at
  the config's own budget over `hpo.seeds`.

Schedules (`--schedule`, `hpo.schedule`) are packaged config files applied over the `--config` files and
under the overrides. Every problem with the config, the space or a point is a ConfigError before anything
trains.
"""

from __future__ import annotations

import itertools
import json
import logging
import multiprocessing
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from loralab.config import hpo_space
from loralab.config.hpo_space import Dim
from loralab.config.load import config_hash, config_to_dict, load_config, packaged_schedule
from loralab.config.schema import HpoConfig, RunConfig
from loralab.data import task_spec
from loralab.errors import ConfigError, LoraLabError, RunError, did_you_mean
from loralab.experiments.hpo_outputs import BEST, StudyResult, write_outputs
from loralab.experiments.hpo_study import (
    POINT,
    StudyPlan,
    is_journal,
    open_storage,
    open_study,
    optimize,
    quiet_optuna,
)
from loralab.training.rundir import slug

log = logging.getLogger("loralab")


@dataclass(frozen=True)
class Context:
    """The resolved command: config files (the schedule's last), overrides, the config, metric and storage."""

    files: tuple[str, ...]
    overrides: tuple[str, ...]
    config: RunConfig
    metric: str
    storage: str

    @property
    def hpo(self) -> HpoConfig:
        return self.config.hpo

    @property
    def name(self) -> str:
        return self.hpo.study_name or derived_name(self.config, self.hpo.schedule)


def resolve(files: Sequence[str], overrides: Sequence[str]) -> Context:
    config = load_config(files, overrides)
    files = tuple(files)
    if config.hpo.schedule is not None:
        files = (*files, str(packaged_schedule(config.hpo.schedule)))
        config = load_config(files, overrides)
    root = Path(config.io.root).resolve()
    storage = config.hpo.storage
    if storage is None:
        root.mkdir(parents=True, exist_ok=True)
        storage = f"sqlite:///{root / 'hpo.db'}"
    elif is_journal(storage):
        storage = str(Path(storage).resolve())
    return Context(files, tuple(overrides), config, resolve_metric(config), storage)


def resolve_metric(config: RunConfig) -> str:
    """`hpo.metric`, or the task's first metric; a name the task does not report is a ConfigError."""
    spec = task_spec(config.task)
    metric = config.hpo.metric
    if metric is None:
        if not spec.metrics:
            raise ConfigError(f"hpo.metric: task {config.task.name} has no default metric; set hpo.metric")
        return spec.metrics[0]
    plain = metric.removeprefix("full/").removeprefix("core/").removeprefix("verbalizer_")
    if spec.metrics and spec.answer != "gsm8k" and plain not in spec.metrics:
        raise ConfigError(
            f"hpo.metric: task {config.task.name} reports {', '.join(spec.metrics)}, not '{metric}'"
            + did_you_mean(plain, spec.metrics)
        )
    return metric


def derived_name(config: RunConfig, schedule: str | None) -> str:
    """<task>-<model>-<method>[-<schedule>]; the method is the hierarchical mode's method there."""
    hpo = config.hpo
    method = hpo.hierarchical.method if hpo.mode == "hierarchical" else config.method.name
    model = Path(config.model.name).name if os.sep in config.model.name else config.model.name
    return "-".join([slug(config.task.name), slug(model), slug(method), *([schedule] if schedule else [])])


# ---- plans ------------------------------------------------------------------------------------------


def make_plan(
    context: Context,
    name: str,
    dims: dict[str, Dim],
    points: Sequence[dict[str, Any]] | None,
    n_trials: int,
    stage: Sequence[str] = (),
    seeds: Sequence[int] | None = None,
    score_weights: Sequence[float] | None = None,
    extra: dict[str, Any] | None = None,
) -> StudyPlan:
    """A study of `context` with the stage's overrides (method, budget) after the user's."""
    hpo = context.hpo
    overrides = (*context.overrides, *stage)
    base = load_config(context.files, overrides)
    return StudyPlan(
        name=name,
        storage=context.storage,
        directory=str(Path(base.io.root).resolve() / "hpo" / name),
        files=context.files,
        overrides=overrides,
        base_hash=config_hash(base),
        dims=dims,
        points=None if points is None else tuple(points),
        n_trials=n_trials,
        sampler=hpo.sampler,
        pruner=hpo.pruner,
        seed=hpo.seed,
        startup_trials=hpo.startup_trials,
        direction=hpo.direction,
        metric=context.metric,
        seeds=tuple(seeds or hpo.seeds or [base.seed]),
        score_weights=None if score_weights is None else tuple(score_weights),
        timeout=hpo.timeout,
        heartbeat_interval=hpo.heartbeat_interval,
        grace_period=hpo.grace_period or 2 * hpo.heartbeat_interval,
        extra=extra or {},
    )


def points_plan(context: Context, name: str, points: Sequence[dict[str, Any]], **options: Any) -> StudyPlan:
    """A study that runs each point once: one categorical dimension per key, over the values the points use."""
    points = unique(points)
    dims: dict[str, Dim] = {}
    for point in points:
        for key, value in point.items():
            values = dims[key].values if key in dims else ()
            if not any(json.dumps(value) == json.dumps(v) for v in values):
                dims[key] = Dim("choice", (*values, value))
    return make_plan(context, name, dims, points, len(points), **options)


def unique(points: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    seen, kept = set(), []
    for point in points:
        text = json.dumps(point, sort_keys=True)
        if text not in seen:
            seen.add(text)
            kept.append(dict(point))
    return kept


def single_plan(context: Context) -> StudyPlan:
    hpo = context.hpo
    dims = hpo_space.parse_space(hpo.space)
    if hpo.sampler != "grid":
        return make_plan(context, context.name, dims, None, hpo.n_trials)
    points = hpo_space.grid_points(dims)
    if hpo.n_trials is not None and hpo.n_trials < len(points):  # a seeded sample of the grid, in grid order
        chosen = sorted(random.Random(hpo.seed).sample(range(len(points)), hpo.n_trials))
        points = [points[i] for i in chosen]
    return make_plan(context, context.name, dims, points, len(points))


def probe_space(context: Context) -> None:
    """Build a config for every probe value of every dimension of `hpo.space` (see `probe`)."""
    dims = hpo_space.parse_space(context.hpo.space)
    probe(context, (), [{key: value} for key, dim in dims.items() for value in dim.probes()])


def probe(context: Context, stage: Sequence[str], points: Sequence[dict[str, Any]]) -> None:
    """Build the config of each point (no model is loaded): a bad key or value is a ConfigError now."""
    for point in points:
        try:
            load_config(context.files, [*context.overrides, *stage, *hpo_space.overrides(point)])
        except ConfigError as exc:
            shown = ", ".join(f"{k}={v}" for k, v in point.items())
            raise ConfigError(f"hpo: the trial {shown} has a bad config: {exc}") from None


def budget(config: RunConfig, epochs: float) -> tuple[str, ...]:
    """A stage's budget: `epochs` epochs, or that multiple of train.max_steps when it is set."""
    if config.train.max_steps is not None:
        return (f"train.max_steps={max(1, round(config.train.max_steps * epochs))}",)
    return (f"train.epochs={hpo_space.format_value(float(epochs))}",)


# ---- running ------------------------------------------------------------------------------------------


def run_hpo(files: Sequence[str], overrides: Sequence[str], workers: int = 1) -> list[StudyResult]:
    """Resolve, check and run the command's studies; each ends with its outputs written."""
    if workers < 1:
        raise ConfigError(f"--workers must be ≥ 1, got {workers}")
    quiet_optuna()
    context = resolve(files, overrides)
    if not (context.hpo.top_k or context.hpo.mode == "hierarchical"):
        probe_space(context)  # a misspelt key in the space is what to say first, before what the search lacks
    hpo_space.check_search(context.hpo)
    if context.hpo.top_k:
        return [run_plan(top_k_plan(context), workers)]
    if context.hpo.mode == "hierarchical":
        return run_hierarchical(context, workers)
    return [run_plan(single_plan(context), workers)]


def run_plan(plan: StudyPlan, workers: int = 1) -> StudyResult:
    """Run one study to n_trials finished trials (here, or in `workers` spawned processes); write its outputs."""
    Path(plan.directory).mkdir(parents=True, exist_ok=True)
    open_study(plan)  # creates it, or refuses one made for other trials, before any worker starts
    if workers == 1:
        optimize(plan)
    else:
        run_workers(plan, workers)
    return write_outputs(plan)


def run_workers(plan: StudyPlan, workers: int) -> None:
    """`workers` spawned processes, each running the same claim loop on the shared study."""
    context = multiprocessing.get_context("spawn")
    threads = max(1, (os.cpu_count() or 1) // workers)
    processes = [
        context.Process(target=worker_main, args=(plan, index, threads), name=f"loralab-hpo-{index}")
        for index in range(workers)
    ]
    for process in processes:
        process.start()
    try:
        while any(process.is_alive() for process in processes):  # is_alive also reaps a killed one
            time.sleep(0.5)
    except KeyboardInterrupt:
        for process in processes:
            process.terminate()
        raise
    for index, process in enumerate(processes):
        if process.exitcode:
            log.warning("%s: worker %d (pid %s) exited with code %s", plan.name, index, process.pid, process.exitcode)


def worker_main(plan: StudyPlan, index: int, threads: int) -> None:
    """A spawned worker: its own logging and torch threads, then the claim loop."""
    import torch

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    logging.getLogger("loralab").setLevel(logging.INFO)
    torch.set_num_threads(threads)
    try:
        optimize(plan, worker=index)
    except LoraLabError as exc:
        print(f"loralab: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


# ---- top-k (the final schedule) ---------------------------------------------------------------------


def top_k_plan(context: Context) -> StudyPlan:
    """The best `hpo.top_k` trials of the source study (hierarchical: of its baseline and s3 stages)."""
    hpo = context.hpo
    source = hpo.source_study or derived_name(context.config, "preeval")
    sources = [f"{source}-baseline", f"{source}-s3"] if hpo.mode == "hierarchical" else [source]
    points = [point for name in sources for point in best_points(context.storage, name, hpo.top_k)]
    plan = points_plan(context, context.name, points, extra={"candidates_from": sources})
    probe(context, (), plan.points or ())
    return plan


def best_points(storage: str, name: str, count: int) -> list[dict[str, Any]]:
    try:
        study = optuna.load_study(study_name=name, storage=open_storage(storage))
    except KeyError:
        raise ConfigError(f"hpo.top_k: no study '{name}' in {storage}; run the preeval schedule first") from None
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    sign = -1 if study.direction == optuna.study.StudyDirection.MAXIMIZE else 1
    complete.sort(key=lambda t: (sign * t.value, t.number))
    if not complete:
        raise ConfigError(f"hpo.top_k: study '{name}' has no completed trial")
    return [dict(t.params) for t in complete[:count]]


# ---- hierarchical -----------------------------------------------------------------------------------------


def run_hierarchical(context: Context, workers: int) -> list[StudyResult]:
    """baseline → s1 → s2 → s3 (the Shake-to-Align scaffold's protocol); stops after a stage that did not finish."""
    config, h = context.config, context.hpo.hierarchical
    grid = hpo_space.lr_grid(h.lr_grid)
    knobs = hpo_space.knobs(h)
    baseline = points_plan(
        context,
        f"{context.name}-baseline",
        [
            {"method.name": h.baseline_method, "train.lr": lr, "train.warmup_ratio": warmup}
            for lr in hpo_space.evenly(grid, h.baseline_lr_points)
            for warmup in h.warmup_grid
        ],
        extra={"stage": "baseline"},
    )
    probe(context, (), baseline.points or ())
    ours = (f"method.name={h.method}",)
    probe(context, ours, [{key: value} for key, values in knobs.items() for value in values])
    probe(context, ours, [{"train.lr": grid[0]}, {"train.lr": grid[-1]}])

    results = [run_plan(baseline, workers)]
    best_file = Path(baseline.directory) / BEST
    if not results[-1].finished or not best_file.is_file():
        return results
    best = json.loads(best_file.read_text())
    best_lr = best["params"]["train.lr"]
    method_config = config_to_dict(load_config(context.files, [*context.overrides, *ours]))
    defaults = {
        "method.name": h.method,
        "train.lr": best_lr,
        "train.warmup_ratio": best["params"]["train.warmup_ratio"],
        **{key: dotted(method_config, key) for key in knobs},
    }
    axes = {"train.lr": hpo_space.neighbourhood(grid, best_lr, h.lr_neighbor_points), **knobs}
    seeded = {"seeded_from": {"file": str(best_file), "params": best["params"], "value": best["value"]}}

    s1_points = unique([{**defaults, key: value} for key, values in axes.items() for value in values])
    s1 = points_plan(
        context, f"{context.name}-s1", s1_points, stage=budget(config, h.epochs[0]), extra={"stage": "s1", **seeded}
    )
    results.append(run_plan(s1, workers))
    if not results[-1].finished:
        return results
    values = point_values(s1)
    kept = {}
    for key, candidates in axes.items():
        scored = [(values[i], c) for c in candidates if (i := index_of(s1, {**defaults, key: c})) in values]
        kept[key] = [c for _, c in rank(scored, context.hpo.direction)[: h.keep_s1]] or [defaults[key]]

    s2_points = [{**defaults, **dict(zip(kept, combo, strict=True))} for combo in itertools.product(*kept.values())]
    extra = {"stage": "s2", "kept": kept, **seeded}
    s2 = points_plan(context, f"{context.name}-s2", s2_points, stage=budget(config, h.epochs[1]), extra=extra)
    results.append(run_plan(s2, workers))
    if not results[-1].finished:
        return results
    values = point_values(s2)
    scored = [(values[i], i) for i in values]
    top = [(s2.points or ())[i] for _, i in rank(scored, context.hpo.direction)[: h.combine_s2]]

    s3 = points_plan(
        context,
        f"{context.name}-s3",
        top,
        stage=budget(config, h.epochs[2]),
        seeds=[config.seed + i for i in range(h.seeds_s3)],
        score_weights=h.score_weights,
        extra={"stage": "s3", **seeded},
    )
    results.append(run_plan(s3, workers))
    return results


def dotted(tree: dict, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            raise RunError(f"hpo.hierarchical.knobs: no config key '{key}'")
        tree = tree[part]
    return tree


def point_values(plan: StudyPlan) -> dict[int, float]:
    """Point index → value of its completed trial."""
    study = open_study(plan)
    return {t.user_attrs[POINT]: t.value for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}


def index_of(plan: StudyPlan, point: dict[str, Any]) -> int | None:
    text = json.dumps(point, sort_keys=True)
    return next((i for i, p in enumerate(plan.points or ()) if json.dumps(p, sort_keys=True) == text), None)


def rank(scored: list[tuple[float, Any]], direction: str) -> list[tuple[float, Any]]:
    """Best first; ties keep their order."""
    sign = -1 if direction == "maximize" else 1
    return sorted(scored, key=lambda pair: sign * pair[0])
