"""`loralab sweep`: the cartesian product of grids, an ablation preset and seeds, run idempotently.

A sweep is a list of runs, each an override list for `load_config`: the shared overrides, then the point (one
set of an ablation preset, one value of each `--grid` key, in the order given, seeds innermost). Every run is
resolved and planned before anything trains, so a bad key or value anywhere fails the whole sweep at once.
Unless a config file or an override sets `io.overwrite`, a sweep uses `skip`: completed runs are reused and
incomplete ones resumed, so submitting a sweep again runs only what is missing.
"""

from __future__ import annotations

import itertools
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from loralab.config.load import config_file, load_config, parse_override, read_yaml_file
from loralab.config.schema import RunConfig
from loralab.errors import ConfigError, DataError, LoraLabError, RunError, first_line, unknown
from loralab.evaluation.records import stored_metrics
from loralab.experiments.report import find_groups, table
from loralab.tables import render
from loralab.training.rundir import plan_run

log = logging.getLogger("loralab")

DEFAULT_SEEDS = (42, 1337, 2024)
ADAPTER = "method.adapter"
# The LoRA experiment protocol's ablations: each is a list of override sets, one grid point per set.
ABLATIONS: dict[str, tuple[tuple[str, ...], ...]] = {
    "rank": tuple((f"{ADAPTER}.r={r}", f"{ADAPTER}.alpha={2 * r}") for r in (4, 8, 16)),
    "alpha": tuple((f"{ADAPTER}.r=8", f"{ADAPTER}.alpha={alpha}") for alpha in (8, 16, 32)),
    "modules": tuple((f"{ADAPTER}.target_modules={preset}",) for preset in ("standard", "extended", "all-linear")),
}
OPENING, CLOSING = "[{(", "]})"


# ---- expansion ------------------------------------------------------------------------------------


def split_values(raw: str) -> list[str]:
    """Split `v1,v2,[a,b]` on the commas that are outside brackets and quotes."""
    values, current, depth, quote = [], "", 0, ""
    for char in raw:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in OPENING:
            depth += 1
        elif char in CLOSING:
            depth -= 1
        elif char == "," and depth == 0:
            values.append(current.strip())
            current = ""
            continue
        current += char
    return [*values, current.strip()]


def parse_grid(text: str) -> tuple[str, list[str]]:
    """`key=v1,v2` → (key, [v1, v2]); the values stay text and parse as YAML when the run is resolved."""
    key, sep, raw = text.partition("=")
    key = key.strip().removeprefix("--")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--grid '{text}' is not of the form a.b.c=v1,v2")
    if not raw.strip():
        raise ConfigError(f"--grid {key} has no values")
    values = split_values(raw)
    if not all(values):
        raise ConfigError(f"--grid {key} has an empty value in '{raw}'")
    if key == "seed":
        raise ConfigError("--grid seed: give the seeds with --seeds")
    return key, values


def parse_seeds(text: str) -> list[int]:
    """`42,1337,2024` → [42, 1337, 2024]: distinct non-negative integers."""
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(f"--seeds takes comma-separated integers such as 42,1337,2024, got '{text}'") from None
    if any(seed < 0 for seed in seeds):
        raise ConfigError(f"--seeds must be non-negative, got '{text}'")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds repeats a seed: '{text}'")
    return seeds


def ablation_sets(name: str | None) -> tuple[tuple[str, ...], ...]:
    if name is None:
        return ((),)
    if name not in ABLATIONS:
        raise ConfigError("--ablation: " + unknown("ablation", name, ABLATIONS))
    return ABLATIONS[name]


def override_key(text: str) -> str:
    return parse_override(text)[0]


def expand(
    overrides: Sequence[str] = (),
    grids: Sequence[str] = (),
    ablation: str | None = None,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    skip_by_default: bool = True,
) -> list[list[str]]:
    """One override list per run: [io.overwrite=skip,] the shared overrides, then the point (the ablation's set,
    one value per grid key, seed=k). Ablation sets vary slowest, then the grids in the order given, seeds fastest."""
    parsed = [parse_grid(text) for text in grids]
    keys = [key for key, _ in parsed]
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        raise ConfigError(f"--grid {repeated[0]} is given more than once; list all its values in one --grid")
    sets = ablation_sets(ablation)
    clash = sorted({override_key(text) for text in sets[0]} & set(keys))
    if clash:
        raise ConfigError(f"--grid {clash[0]} conflicts with --ablation {ablation}, which sets it")
    varied = {*keys, *(override_key(text) for text in sets[0]), "seed"}
    for key in (override_key(text) for text in overrides):
        if key in varied:
            raise ConfigError(f"{key} is set by the sweep (--grid, --ablation or --seeds); drop the override")
    if not seeds:
        raise ConfigError("--seeds needs at least one seed")
    shared = ["io.overwrite=skip"] if skip_by_default else []
    shared += list(overrides)
    grid_points = itertools.product(*([f"{key}={value}" for value in values] for key, values in parsed))
    return [
        [*shared, *point_set, *grid_point, f"seed={seed}"]
        for point_set, grid_point in itertools.product(sets, list(grid_points))
        for seed in seeds
    ]


def sets_overwrite(files: Sequence[str]) -> bool:
    """Whether a config file sets io.overwrite (an override that sets it wins over the sweep's default anyway)."""
    for file in files:
        section = read_yaml_file(config_file(file)).get("io")
        if isinstance(section, dict) and "overwrite" in section:
            return True
    return False


# ---- planning -------------------------------------------------------------------------------------


@dataclass
class SweepRun:
    """One planned run: its override list, the point that names it, the resolved config and what it will do."""

    index: int
    total: int
    overrides: list[str]
    point: list[str]
    config: RunConfig
    directory: Path
    action: str  # new | resume | skip | force (new; the old directory is moved aside)

    @property
    def label(self) -> str:
        return f"[{self.index}/{self.total}]"

    @property
    def name(self) -> str:
        return " ".join(self.point)


def plan_sweep(
    files: Sequence[str],
    overrides: Sequence[str],
    grids: Sequence[str] = (),
    ablation: str | None = None,
    seeds: Sequence[int] = DEFAULT_SEEDS,
) -> list[SweepRun]:
    """Expand, resolve and plan every run (no side effects); any invalid run is one ConfigError for the sweep."""
    skip = not sets_overwrite(files)
    lists = expand(overrides, grids, ablation, seeds, skip_by_default=skip)
    shared = len(overrides) + skip  # what every run shares; the rest of its list is its point
    configs, errors = [], []
    for number, run_overrides in enumerate(lists, start=1):
        try:
            config = load_config(files, run_overrides)
            configs.append(config)
        except (ConfigError, DataError) as exc:
            errors.append((number, " ".join(run_overrides[shared:]), str(exc)))
    if errors:
        if len(errors) == len(lists) and len({message for *_, message in errors}) == 1:
            raise ConfigError(errors[0][2])
        number, point, message = errors[0]
        more = f" ({len(errors) - 1} more runs fail too)" if len(errors) > 1 else ""
        raise ConfigError(f"sweep run {number}/{len(lists)} ({point}): {message}{more}")
    runs = []
    seen: dict[Path, int] = {}
    for number, (run_overrides, config) in enumerate(zip(lists, configs, strict=True), start=1):
        if config.io.overwrite == "ask":
            raise ConfigError("io.overwrite=ask is interactive; a sweep takes error, resume, skip or force")
        plan = plan_run(config, interactive=False)
        if plan.directory in seen:
            raise ConfigError(
                f"sweep runs {seen[plan.directory]} and {number} resolve to the same run directory {plan.directory} "
                "(the hash leaves out seed, io and log)"
            )
        seen[plan.directory] = number
        action = "force" if plan.move_aside else plan.action
        point = run_overrides[shared:]
        runs.append(SweepRun(number, len(lists), run_overrides, point, config, plan.directory, action))
    return runs


PLANNED = {"new": "run", "resume": "resume", "skip": "skip", "force": "run (old directory moved aside)"}


def describe_plan(runs: Sequence[SweepRun]) -> str:
    """What `--dry-run` prints: the overrides all runs share, each run's action, directory and point, the counts."""
    shared = runs[0].overrides[: len(runs[0].overrides) - len(runs[0].point)]
    lines = [f"every run: {' '.join(shared)}"] if shared else []
    lines += [f"{run.label} {PLANNED[run.action]:<6} {run.directory}  {run.name}" for run in runs]
    skipped = sum(run.action == "skip" for run in runs)
    lines.append(f"{len(runs)} runs: {len(runs) - skipped} to run, {skipped} to skip")
    return "\n".join(lines) + "\n"


# ---- execution ------------------------------------------------------------------------------------


@dataclass
class RunResult:
    run: SweepRun
    state: str  # done | skipped | failed
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0


def in_process(run: SweepRun, files: Sequence[str], jobs: int) -> dict[str, float]:
    """Train one run in this process (accelerate's state is reset per run by the recipe)."""
    from loralab.training.recipe import run_training

    return run_training(run.config, show_progress=False).metrics


def train_argv(run: SweepRun, files: Sequence[str]) -> list[str]:
    """The `loralab train` arguments of one run: the sweep's config files, then the run's overrides as --set."""
    return ["train", *(f"--config={file}" for file in files), *(f"--set={text}" for text in run.overrides)]


def in_subprocess(run: SweepRun, files: Sequence[str], jobs: int) -> dict[str, float]:
    """Train one run as `python -m loralab train` in a fresh process, its output kept back; the first line of
    its error on failure."""
    command = [sys.executable, "-m", "loralab", *train_argv(run, files)]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))  # N runs share the cores
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        raise RunError(lines[-1].removeprefix("loralab: error: ") if lines else f"exit code {done.returncode}")
    return stored_metrics(run.directory)


def format_metrics(metrics: dict[str, float]) -> str:
    return " ".join(f"{name}={value:.4f}" for name, value in metrics.items())


def run_sweep(
    runs: Sequence[SweepRun],
    files: Sequence[str] = (),
    jobs: int = 1,
    echo: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
) -> list[RunResult]:
    """Run what is not complete, `jobs` at a time (1: in this process; more: one process per run); a failed run
    does not stop the others. One line per run: skipped, started, done with its final metrics, failed."""
    if jobs < 1:
        raise ConfigError(f"--jobs must be ≥ 1, got {jobs}")
    train = in_process if jobs == 1 else in_subprocess
    results: dict[int, RunResult] = {}
    for run in runs:
        if run.action == "skip":
            results[run.index] = RunResult(run, "skipped", stored_metrics(run.directory))
            echo(f"{run.label} skipped (completed) {run.name}: {format_metrics(results[run.index].metrics)}")

    def attempt(run: SweepRun) -> RunResult:
        echo(f"{run.label} started {run.name} → {run.directory}")
        started = time.time()
        try:
            result = RunResult(run, "done", train(run, files, jobs))
        except Exception as exc:  # a failed run is reported and the sweep goes on
            if not isinstance(exc, LoraLabError):
                log.error("%s %s failed", run.label, run.name, exc_info=True)
            result = RunResult(run, "failed", error=first_line(exc))
        result.seconds = time.time() - started
        if result.state == "done":
            echo(f"{run.label} done {run.name} ({result.seconds:.1f} s): {format_metrics(result.metrics)}")
        else:
            echo(f"{run.label} failed {run.name}: {result.error}")
        return result

    pending = [run for run in runs if run.action != "skip"]
    if jobs == 1:
        results.update((run.index, attempt(run)) for run in pending)
    else:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            results.update((result.run.index, result) for result in pool.map(attempt, pending))
    return [results[run.index] for run in runs]


def summary(results: Sequence[RunResult], fmt: str = "md") -> tuple[str, list[str]]:
    """The report table (mean ± std over seeds per grid point) of this sweep's completed runs, and a legend line
    per group naming its point; ('', []) when no run completed."""
    completed = [result.run for result in results if result.state != "failed"]
    if not completed:
        return "", []
    groups = find_groups([run.directory for run in completed])
    points = {"/".join(run.directory.parent.parts[-4:]): run.point[:-1] for run in completed}
    legend = [f"{group.name}: {' '.join(points.get(group.name, [])) or '(no grid)'}" for group in groups]
    return render(*table(groups), fmt), legend
