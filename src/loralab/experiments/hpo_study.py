"""One Optuna study run by one or many workers: storage, the claim loop, heartbeats, retries, one trial.

Every worker runs `optimize(plan)`. Workers coordinate only through the study's storage, plus a file lock
beside the study's outputs that makes "count the trials, then start one" atomic among the workers that share
that disk. Under the lock a worker

1. fails the trials whose worker died — a stale heartbeat (RDB storages: Optuna's own heartbeat and
   `fail_stale_trials`; journal files: a heartbeat in a system attribute) or a local worker process that is
   gone — and queues a retry of each with the same parameters (Optuna's retry callback: a WAITING copy);
2. counts finished trials (complete, pruned, or failed by an error in the run) and active ones (running,
   waiting); stops once `n_trials` are finished, waits while finished + active ≥ `n_trials`;
3. otherwise takes a waiting retry, or, for a list of points (a grid, a stage's candidates), enqueues the
   first point no trial holds, or lets the sampler propose a new trial.

So a study ends with exactly `n_trials` finished trials however often its workers are killed, and no point of
a grid is run twice. A trial whose worker died does not count; its retry resumes the same run directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import logging
import math
import os
import platform
import statistics
import threading
import time
import traceback
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy.exc
from optuna.trial import TrialState

from loralab.config import hpo_space
from loralab.config.hpo_space import Dim
from loralab.config.load import load_config
from loralab.config.schema import RunConfig
from loralab.errors import ConfigError, LoraLabError, RunError, first_line
from loralab.tracking import read_metrics
from loralab.training.control import StopRun
from loralab.training.rundir import run_dir_for

log = logging.getLogger("loralab")

POINT = "loralab:point"  # user attr: index of the trial's point in plan.points
ERROR = "loralab:error"  # user attr: why the run failed (a finished, counted trial)
SCHEMA_ATTEMPTS = 10
WORKER = "loralab:worker"  # user attr: host, pid and process start time of the worker running it
HEARTBEAT = "loralab:heartbeat"  # system attr: last heartbeat (journal storages, which have none of their own)
SIGNATURE = "loralab:signature"  # study user attr: what the trials mean (config hash, space, metric, seeds)
DONE_STATES = (TrialState.COMPLETE, TrialState.PRUNED)


@dataclass(frozen=True)
class StudyPlan:
    """Everything a worker needs to run one study (picklable: spawned workers get it as is)."""

    name: str
    storage: str
    directory: str  # <io.root>/hpo/<name>: outputs and the claim lock
    files: tuple[str, ...]
    overrides: tuple[str, ...]  # the user's overrides, then the stage's (method, budget)
    base_hash: str  # config hash of files + overrides: a study holds trials of one base config
    dims: dict[str, Dim]
    points: tuple[dict[str, Any], ...] | None  # each run exactly once (grid, stage candidates); None = sampler
    n_trials: int
    sampler: str
    pruner: str
    seed: int
    startup_trials: int
    direction: str
    metric: str
    seeds: tuple[int | None, ...]  # run seeds per trial (None: the config's)
    score_weights: tuple[float, ...] | None  # None: the final metric; else best, final, mean of the eval curve
    timeout: float | None
    heartbeat_interval: int
    grace_period: int
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # written into best_hparams.json

    def signature(self) -> str:
        parts = [self.base_hash, self.dims, self.points, self.metric, self.direction, self.seeds, self.score_weights]
        return json.dumps(parts, sort_keys=True, default=repr)


# ---- storage and study ----------------------------------------------------------------------------


def quiet_optuna() -> None:
    """Optuna's per-trial log lines and experimental-API warnings off; loralab logs each trial itself."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", category=FutureWarning, module="optuna")
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")


def is_journal(storage: str) -> bool:
    """A plain path ending .log or .jsonl is a journal file (Optuna's JournalStorage, for shared disks)."""
    return "://" not in storage and storage.endswith((".log", ".jsonl"))


def retry_callback() -> Any:
    """Optuna's callback that queues a dead trial again with the same parameters (renamed in Optuna 4.9)."""
    storages = optuna.storages
    retry = getattr(storages, "RetryHeartbeatStaleTrialCallback", None) or storages.RetryFailedTrialCallback
    return retry(max_retry=None)


def open_storage(url: str, heartbeat_interval: int | None = None, grace_period: int | None = None):
    """A journal file, or an RDB storage (SQLite, PostgreSQL, MySQL) with a heartbeat and retries of dead trials."""
    if is_journal(url):
        from optuna.storages import journal

        path = Path(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        backend = getattr(journal, "JournalFileBackend", None) or optuna.storages.JournalFileStorage
        return optuna.storages.JournalStorage(backend(str(path)))
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    heartbeat: dict[str, Any] = {}
    if heartbeat_interval is not None:
        callback = "heartbeat_stale_trial_callback"  # Optuna ≥ 4.9; before, failed_trial_callback
        if callback not in inspect.signature(optuna.storages.RDBStorage).parameters:
            callback = "failed_trial_callback"
        heartbeat = {"heartbeat_interval": heartbeat_interval, "grace_period": grace_period, callback: retry_callback()}
    try:
        return rdb_storage(url, engine, heartbeat)
    except Exception as exc:  # a malformed URL, a missing driver, an unreachable server
        raise ConfigError(f"hpo.storage {url!r} cannot be opened: {first_line(exc)}") from None


def rdb_storage(url: str, engine: dict[str, Any], heartbeat: dict[str, Any]) -> optuna.storages.RDBStorage:
    """Optuna's RDBStorage, retried while workers started together race to create a new database's tables."""
    for attempt in range(SCHEMA_ATTEMPTS - 1):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine, **heartbeat)
        except sqlalchemy.exc.DBAPIError as exc:
            if not is_schema_race(exc):
                raise
            time.sleep(0.2 * (attempt + 1))
    return optuna.storages.RDBStorage(url, engine_kwargs=engine, **heartbeat)


def is_schema_race(exc: sqlalchemy.exc.DBAPIError) -> bool:
    """Another worker created the same table or version row first (SQLite: "table ... already exists")."""
    return isinstance(exc, sqlalchemy.exc.IntegrityError) or "already exists" in str(exc)


def open_study(plan: StudyPlan, sampler: optuna.samplers.BaseSampler | None = None) -> optuna.Study:
    """Create or load the plan's study; one made for other trials (another config or space) is refused."""
    quiet_optuna()
    study = optuna.create_study(
        storage=open_storage(plan.storage, plan.heartbeat_interval, plan.grace_period),
        study_name=plan.name,
        direction=plan.direction,
        sampler=sampler,
        pruner=make_pruner(plan),
        load_if_exists=True,
    )
    stored = study.user_attrs.get(SIGNATURE)
    if stored is None:
        study.set_user_attr(SIGNATURE, plan.signature())
    elif stored != plan.signature():
        raise ConfigError(
            f"study '{plan.name}' in {plan.storage} holds trials of another config, space, metric or seeds; "
            "set hpo.study_name (or --study) for a new study"
        )
    return study


def make_sampler(plan: StudyPlan, worker: int, existing: int) -> optuna.samplers.BaseSampler:
    """The plan's sampler, seeded per worker and by the trials already there (a restart proposes new points)."""
    seed = plan.seed + 1000 * worker + existing
    if plan.sampler == "tpe" and plan.points is None:
        return optuna.samplers.TPESampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)  # random; for points every value is fixed in advance


def make_pruner(plan: StudyPlan) -> optuna.pruners.BasePruner:
    if plan.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=plan.startup_trials, n_warmup_steps=0)
    if plan.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, reduction_factor=3)
    return optuna.pruners.NopPruner()


# ---- locks, heartbeats, dead workers --------------------------------------------------------------


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` among processes sharing the disk (a no-op where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def this_worker() -> dict[str, Any]:
    return {"host": platform.node(), "pid": os.getpid(), "started": process_started(os.getpid())}


def process_started(pid: int) -> float | None:
    """The start time of a live, non-zombie process; None when there is none."""
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil comes with accelerate
        return None
    try:
        process = psutil.Process(pid)
        return None if process.status() == psutil.STATUS_ZOMBIE else process.create_time()
    except psutil.Error:
        return None


def worker_is_gone(trial: optuna.trial.FrozenTrial) -> bool:
    """True when the trial's worker ran on this host and that process is no longer alive."""
    worker = trial.user_attrs.get(WORKER)
    if not isinstance(worker, dict) or worker.get("host") != platform.node() or worker.get("started") is None:
        return False
    return process_started(int(worker["pid"])) != worker["started"]


class Heartbeat:
    """Beats for one running trial from a thread: Optuna's RDB heartbeat, or a system attr on a journal."""

    def __init__(self, study: optuna.Study, trial_id: int, interval: int) -> None:
        self.storage, self.trial_id, self.interval = study._storage, trial_id, interval
        self.native = has_native_heartbeat(self.storage)
        self.stopped = threading.Event()
        self.beat()  # before the claim lock is released, so a trial is never left without one
        self.thread = threading.Thread(target=self.run, name=f"heartbeat-{trial_id}", daemon=True)
        self.thread.start()

    def beat(self) -> None:
        if self.native:
            self.storage.record_heartbeat(self.trial_id)
        else:
            self.storage.set_trial_system_attr(self.trial_id, HEARTBEAT, time.time())

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                self.beat()
            except Exception:  # the trial finished or was failed meanwhile
                return

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join()


def has_native_heartbeat(storage: optuna.storages.BaseStorage) -> bool:
    """An RDB storage made with a heartbeat interval (journal storages have no heartbeat of their own)."""
    interval = getattr(storage, "get_heartbeat_interval", None)
    return interval is not None and interval() is not None


def reap_dead_trials(study: optuna.Study, plan: StudyPlan) -> None:
    """Fail the running trials whose worker died and queue a retry of each (same parameters)."""
    if has_native_heartbeat(study._storage):
        optuna.storages.fail_stale_trials(study)  # the storage's retry callback queues the copies
    now = time.time()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        beat = trial.system_attrs.get(HEARTBEAT)
        stale = beat is not None and now - float(beat) > plan.grace_period
        started = trial.datetime_start.timestamp() if trial.datetime_start else now
        orphan = WORKER not in trial.user_attrs and now - started > plan.grace_period  # died right after ask
        if stale or orphan or worker_is_gone(trial):
            fail_and_retry(study, trial)


def fail_and_retry(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    try:
        if not study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
            return
    except optuna.exceptions.UpdateFinishedTrialError:
        return  # another worker got there first
    log.warning(
        "%s trial %d: its worker is gone; queued again with the same parameters", study.study_name, trial.number
    )
    retry_callback()(study, study._storage.get_trial(trial._trial_id))


# ---- the claim loop ---------------------------------------------------------------------------------


def is_finished(trial: optuna.trial.FrozenTrial) -> bool:
    """Counted towards n_trials: complete, pruned, or failed by an error in the run (not by a dead worker)."""
    return trial.state in DONE_STATES or (trial.state == TrialState.FAIL and ERROR in trial.user_attrs)


def holds_point(trial: optuna.trial.FrozenTrial) -> bool:
    return is_finished(trial) or trial.state in (TrialState.RUNNING, TrialState.WAITING)


def study_counts(trials: list[optuna.trial.FrozenTrial]) -> tuple[int, int]:
    """(finished, active) trials."""
    finished = sum(is_finished(t) for t in trials)
    active = sum(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials)
    return finished, active


def next_point(plan: StudyPlan, trials: list[optuna.trial.FrozenTrial]) -> int | None:
    held = {t.user_attrs.get(POINT) for t in trials if holds_point(t)}
    return next((i for i in range(len(plan.points or ())) if i not in held), None)


STOP = "stop"


def claim(study: optuna.Study, plan: StudyPlan) -> tuple[optuna.Trial, Heartbeat] | str | None:
    """Under the claim lock: a trial to run (with its heartbeat going), STOP, or None (wait and ask again)."""
    reap_dead_trials(study, plan)
    trials = study.get_trials(deepcopy=False)
    finished, active = study_counts(trials)
    if finished >= plan.n_trials:
        return STOP
    waiting = any(t.state == TrialState.WAITING for t in trials)
    if not waiting:
        if finished + active >= plan.n_trials:
            return None
        if plan.points is not None:
            index = next_point(plan, trials)
            if index is None:
                return None
            study.enqueue_trial(plan.points[index], user_attrs={POINT: index})
    trial = study.ask()
    trial.set_user_attr(WORKER, this_worker())
    return trial, Heartbeat(study, trial._trial_id, plan.heartbeat_interval)


def optimize(plan: StudyPlan, worker: int = 0) -> None:
    """One worker's loop: claim a trial, run it, until the study has n_trials finished (or the timeout)."""
    quiet_optuna()
    study = open_study(plan)
    study.sampler = make_sampler(plan, worker, len(study.get_trials(deepcopy=False)))
    lock = Path(plan.directory) / ".claim.lock"
    started = time.monotonic()
    poll = max(0.2, min(2.0, plan.heartbeat_interval / 2))
    while plan.timeout is None or time.monotonic() - started < plan.timeout:
        with file_lock(lock):
            claimed = claim(study, plan)
        if claimed == STOP:
            return
        if claimed is None:
            time.sleep(poll)
            continue
        run_trial(study, plan, *claimed)


# ---- one trial ----------------------------------------------------------------------------------------


def run_trial(study: optuna.Study, plan: StudyPlan, trial: optuna.Trial, heartbeat: Heartbeat) -> None:
    """Run the trial's seeds and tell the study: complete, pruned, or failed (an error is recorded)."""
    state, value = TrialState.COMPLETE, None
    try:
        params = suggest(trial, plan)
        log.info("%s trial %d: %s", plan.name, trial.number, params)
        value = evaluate(trial, plan, params)
        if not math.isfinite(value):
            raise RunError(f"{plan.metric} is {value}")
    except StopRun as stop:
        state = TrialState.PRUNED
        log.info("%s trial %d %s", plan.name, trial.number, stop)
    except KeyboardInterrupt:
        heartbeat.stop()
        fail_and_retry(study, study._storage.get_trial(trial._trial_id))
        raise
    except Exception as exc:
        state = TrialState.FAIL
        trial.set_user_attr(ERROR, first_line(exc))
        if not isinstance(exc, LoraLabError):
            log.warning("%s", traceback.format_exc())
        log.warning("%s trial %d failed: %s", plan.name, trial.number, first_line(exc))
    finally:
        heartbeat.stop()
    try:
        study.tell(trial, value if state == TrialState.COMPLETE else None, state=state)
    except optuna.exceptions.UpdateFinishedTrialError:  # failed as dead meanwhile; its retry counts instead
        log.warning("%s trial %d was failed by another worker while it ran", plan.name, trial.number)
        return
    if state == TrialState.COMPLETE:
        log.info("%s trial %d: %s=%.4f", plan.name, trial.number, plan.metric, value)


def suggest(trial: optuna.Trial, plan: StudyPlan) -> dict[str, Any]:
    """The trial's parameters: its point's fixed values, or the sampler's (a retry keeps the old ones)."""
    if plan.points is not None:
        point = plan.points[trial.user_attrs[POINT]]
        return {key: trial.suggest_categorical(key, plan.dims[key].values) for key in point}
    return {key: suggest_dim(trial, key, dim) for key, dim in plan.dims.items()}


def suggest_dim(trial: optuna.Trial, key: str, dim: Dim) -> Any:
    if dim.kind == "choice":
        return trial.suggest_categorical(key, dim.values)
    low, high = dim.values
    if dim.kind == "int":
        return trial.suggest_int(key, low, high)
    return trial.suggest_float(key, low, high, log=dim.kind == "log_uniform")


def trial_config(plan: StudyPlan, params: dict[str, Any], seed: int | None) -> RunConfig:
    """The base config with the trial's parameters as overrides; a study's run may always be resumed."""
    extra = [] if seed is None else [f"seed={seed}"]
    config = load_config(plan.files, [*plan.overrides, *hpo_space.overrides(params), *extra])
    if config.io.overwrite in ("error", "ask"):  # a retried trial continues its own run directory
        config = dataclasses.replace(config, io=dataclasses.replace(config.io, overwrite="resume"))
    return config


class Reporter:
    """The on_eval callback of a trial's first seed: each eval to the pruner; StopRun when it says prune."""

    def __init__(self, trial: optuna.Trial, metric: str) -> None:
        self.trial, self.metric = trial, metric

    def __call__(self, step: int, metrics: dict[str, float], last: bool) -> None:
        value = metric_value(metrics, self.metric)
        self.trial.report(value, step)
        if not last and self.trial.should_prune():
            raise StopRun(f"pruned at step {step} ({self.metric}={value:.4f})")


def evaluate(trial: optuna.Trial, plan: StudyPlan, params: dict[str, Any]) -> float:
    """Train each seed (resuming or reusing its run directory) and return the mean score."""
    from loralab.training.recipe import run_training

    directories: list[str] = []
    scores = []
    for index, seed in enumerate(plan.seeds):
        config = trial_config(plan, params, seed)
        directory = run_dir_for(config).resolve()
        directories.append(str(directory))
        trial.set_user_attr("run_dirs", directories)
        trial.set_user_attr("run_dir", directories[0])
        reporter = Reporter(trial, plan.metric) if index == 0 else None
        with file_lock(run_lock(config, directory)):  # trials of equal parameters never share a run at once
            outcome = run_training(config, show_progress=False, on_eval=reporter)
        scores.append(score(outcome.directory, outcome.metrics, plan))
    if len(scores) > 1:
        trial.set_user_attr("seed_values", scores)
    return statistics.fmean(scores)


def run_lock(config: RunConfig, directory: Path) -> Path:
    return Path(config.io.root) / "hpo" / ".locks" / ("-".join(directory.parts[-5:]) + ".lock")


def metric_value(metrics: dict[str, float], metric: str) -> float:
    """`metric` from a run's metrics; a dual-rank run's full view stands for the plain name."""
    for name in (metric, f"full/{metric}"):
        if name in metrics:
            return float(metrics[name])
    raise RunError(f"hpo.metric '{metric}' is not among the run's eval metrics: {', '.join(sorted(metrics))}")


def score(directory: Path, final: dict[str, float], plan: StudyPlan) -> float:
    """The final metric, or the weighted best, final and mean of the run's eval curve (metrics.csv)."""
    value = metric_value(final, plan.metric)
    if plan.score_weights is None:
        return value
    names = {plan.metric, f"full/{plan.metric}"}
    rows = read_metrics(directory / "metrics.csv")
    curve = [row["value"] for row in rows if row["split"] == "eval" and row["metric"] in names] or [value]
    best = max(curve) if plan.direction == "maximize" else min(curve)
    w_best, w_final, w_mean = plan.score_weights
    return w_best * best + w_final * value + w_mean * statistics.fmean(curve)
