"""Metric logging: `metrics.csv` always (append-only, flushed each write); optional trackers, fail-open.

The CSV is long-format (`step,split,metric,value,time`), so rules can add metrics at any step without
rewriting a header. A tracker that cannot start or fails mid-run logs one warning and is dropped.
"""

from __future__ import annotations

import csv
import logging
import time
from pathlib import Path
from typing import Any

from loralab.config.load import dotted_items

log = logging.getLogger("loralab")
CSV_FIELDS = ("step", "split", "metric", "value", "time")


class MetricsCSV:
    """Append-only metrics file; `truncate_after(step)` drops rows a resumed run will log again."""

    def __init__(self, path: Path) -> None:
        self.path = path
        new = not path.exists() or path.stat().st_size == 0
        self.handle = open(path, "a", newline="")  # noqa: SIM115 - kept open for the whole run
        self.writer = csv.writer(self.handle)
        if new:
            self.writer.writerow(CSV_FIELDS)
            self.handle.flush()

    def log(self, step: int, split: str, metrics: dict[str, float]) -> None:
        now = round(time.time(), 3)
        for name, value in metrics.items():
            self.writer.writerow((step, split, name, value, now))
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()

    @staticmethod
    def truncate_after(path: Path, step: int) -> None:
        """Keep the header and the whole rows up to `step` (used when resuming from a checkpoint).

        What a crash or a bad copy leaves (a last line without its newline, NUL or non-UTF-8 bytes, a row of
        another width) is dropped with one warning instead of being kept for good; a damaged header drops it all.
        """
        if not path.exists():
            return
        lines = path.read_bytes().decode("utf-8", errors="replace").splitlines(keepends=True)
        rows = list(csv.reader(line for line in lines if whole_line(line)))
        header = rows[0] if rows and rows[0][:1] == ["step"] else []
        whole = [row for row in rows[1:] if header and len(row) == len(header) and row[0].isdecimal()]
        damaged = len(lines) - len(whole) - (1 if header else 0)
        if damaged:
            log.warning("%s: dropped %d damaged line(s) a crash or copy left", path, damaged)
        kept = ([header] if header else []) + [row for row in whole if int(row[0]) <= step]
        temporary = path.with_suffix(".tmp")
        with open(temporary, "w", newline="") as handle:
            csv.writer(handle).writerows(kept)
        temporary.replace(path)


def whole_line(line: str) -> bool:
    """Whether a CSV line was written whole: ends in its newline, holds no NUL and no undecodable byte."""
    return line.endswith("\n") and "\x00" not in line and "\ufffd" not in line


class RowsCSV:
    """Append-only wide CSV of per-module diagnostic rows (`step` first); the header is the first row's keys."""

    def __init__(self, path: Path) -> None:
        self.path, self.handle, self.writer = path, None, None

    def write(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        if self.writer is None:
            new = not self.path.exists() or self.path.stat().st_size == 0
            self.handle = open(self.path, "a", newline="")  # noqa: SIM115 - kept open for the whole run
            self.writer = csv.DictWriter(self.handle, fieldnames=list(rows[0]))
            if new:
                self.writer.writeheader()
        self.writer.writerows(rows)
        self.handle.flush()

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Rows of a metrics.csv as dicts with numeric step and value."""
    with open(path, newline="") as handle:
        return [
            {"step": int(r["step"]), "split": r["split"], "metric": r["metric"], "value": float(r["value"])}
            for r in csv.DictReader(handle)
        ]


class Tracker:
    """One external tracker; subclasses wrap a library's init/log/finish."""

    name = "tracker"

    def start(self, run_dir: Path, run_name: str, config: dict) -> None: ...

    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def finish(self) -> None: ...


class TensorBoardTracker(Tracker):
    name = "tensorboard"

    def start(self, run_dir: Path, run_name: str, config: dict) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)

    def finish(self) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    name = "wandb"

    def start(self, run_dir: Path, run_name: str, config: dict) -> None:
        import wandb

        settings = config["log"]["wandb"]  # project, entity, mode (offline | online)
        self.run = wandb.init(dir=str(run_dir), name=run_name, config=config, reinit=True, **settings)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def finish(self) -> None:
        self.run.finish()


class MlflowTracker(Tracker):
    """MLflow with a SQLite store and an artifact folder inside the run dir: no server, nothing outside the run.

    MLflow 3 refuses its file store by default (maintenance mode); a SQLite file is the local store it supports.
    """

    name = "mlflow"

    def start(self, run_dir: Path, run_name: str, config: dict) -> None:
        import mlflow

        self.mlflow = mlflow
        folder = (run_dir / "mlflow").resolve()
        folder.mkdir(exist_ok=True)
        mlflow.set_tracking_uri(f"sqlite:///{folder / 'mlflow.db'}")
        if mlflow.get_experiment_by_name("loralab") is None:
            mlflow.create_experiment("loralab", artifact_location=(folder / "artifacts").as_uri())
        mlflow.set_experiment("loralab")
        mlflow.start_run(run_name=run_name)
        mlflow.log_params(dotted_items(config))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.mlflow.log_metrics(metrics, step=step)

    def finish(self) -> None:
        self.mlflow.end_run()


class SwanlabTracker(Tracker):
    name = "swanlab"

    def start(self, run_dir: Path, run_name: str, config: dict) -> None:
        import swanlab

        self.run = swanlab.init(experiment_name=run_name, config=config, logdir=str(run_dir / "swanlab"), mode="local")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def finish(self) -> None:
        self.run.finish()


TRACKERS = {cls.name: cls for cls in (TensorBoardTracker, WandbTracker, MlflowTracker, SwanlabTracker)}


class Trackers:
    """The enabled trackers behind one fail-open front: a failure warns once and drops that tracker."""

    def __init__(self, trackers: list[Tracker]) -> None:
        self.active = trackers

    @classmethod
    def start(cls, names: list[str], run_dir: Path, run_name: str, config: dict) -> Trackers:
        return cls([t for t in (TRACKERS[name]() for name in names) if guarded(t, "start", run_dir, run_name, config)])

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.active = [t for t in self.active if guarded(t, "log", step, metrics)]

    def finish(self) -> None:
        for tracker in self.active:
            guarded(tracker, "finish")
        self.active = []


def guarded(tracker: Tracker, method: str, *args: Any) -> bool:
    """Call a tracker method; on any failure warn once and report it as dropped."""
    try:
        getattr(tracker, method)(*args)
        return True
    except Exception as exc:  # fail-open: no tracker may stop a run
        log.warning(
            "tracker %s failed in %s (%s: %s); continuing with metrics.csv only",
            tracker.name,
            method,
            type(exc).__name__,
            exc,
        )
        return False
