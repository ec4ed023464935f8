"""Each tracker for real, offline: a tiny run logs to it, and its own store, read back with the library's reader
(or its record format), holds the same per-step losses as metrics.csv. A tracker that raises mid-run is dropped
with one warning and the run completes."""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path

import pytest

from conftest import tiny
from loralab.tracking import read_metrics
from loralab.training.recipe import run_training

pytestmark = pytest.mark.slow
STEPS = 3


def csv_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["value"] for r in read_metrics(run_dir / "metrics.csv") if r["metric"] == "loss"}


def tracked_run(tmp_path: Path, name: str) -> Path:
    outcome = run_training(tiny(tmp_path, f"log.trackers=[{name}]", f"train.max_steps={STEPS}"), False)
    return outcome.directory


def test_tensorboard_event_file_holds_the_losses(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tracked_run(tmp_path, "tensorboard")
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    logged = {e.step: e.value for e in events.Scalars("train/loss")}
    assert logged == pytest.approx(csv_losses(run_dir), rel=1e-6)  # event files store float32
    assert set(csv_losses(run_dir)) == set(range(1, STEPS + 1))


def wandb_history(run_file: Path) -> list[dict[str, str]]:
    """History records of a W&B offline run file: LevelDB-style log blocks of protobuf `Record`s."""
    from wandb.proto import wandb_internal_pb2

    raw, block, position = run_file.read_bytes(), 32768, 7  # 7 bytes of file header (":W&B", version)
    records, pieces = [], []
    while position + 7 <= len(raw):
        if block - position % block < 7:
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[position : position + 7])
        if length == 0 and kind == 0:
            break
        pieces.append(raw[position + 7 : position + 7 + length])
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(pieces))
            records.append(record)
            pieces = []
    return [
        {item.key or "/".join(item.nested_key): item.value_json for item in r.history.item}
        for r in records
        if r.HasField("history")
    ]


def test_wandb_offline_run_file_holds_the_losses(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tracked_run(tmp_path, "wandb")
    (run_file,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    history = [h for h in wandb_history(run_file) if "train/loss" in h]
    logged = {int(h["_step"]): float(h["train/loss"]) for h in history}
    assert logged == pytest.approx(csv_losses(run_dir), rel=1e-12)


def test_mlflow_store_holds_the_losses_and_the_config(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    run_dir = tracked_run(tmp_path, "mlflow")
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("loralab").experiment_id])
    logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/loss")}
    assert logged == pytest.approx(csv_losses(run_dir), rel=1e-12)
    assert run.data.params["train.max_steps"] == str(STEPS) and run.data.params["model.name"] == "tiny-bert"


def test_swanlab_local_logs_hold_the_losses(tmp_path, monkeypatch):
    pytest.importorskip("swanlab")
    monkeypatch.chdir(tmp_path)  # swanlab writes a .gitignore beside its folder; keep the checkout clean
    run_dir = tracked_run(tmp_path, "swanlab")
    series = {}
    for log_file in (run_dir / "swanlab").glob("run-*/logs/*/*.log"):
        series[log_file.parent.name] = [json.loads(line)["data"] for line in log_file.read_text().splitlines()]
    losses = [value for _, value in sorted(csv_losses(run_dir).items())]
    assert losses in series.values()  # one series per metric key, values in step order


def test_a_tracker_raising_on_log_is_dropped_once_and_the_run_completes(tmp_path, monkeypatch, caplog):
    from loralab import tracking

    calls = []

    def broken(self, step, metrics):
        calls.append(step)
        raise ConnectionError("server went away")

    monkeypatch.setattr(tracking.TensorBoardTracker, "start", lambda self, *args: None)
    monkeypatch.setattr(tracking.TensorBoardTracker, "log", broken)
    with caplog.at_level(logging.WARNING, logger="loralab"):
        run_dir = tracked_run(tmp_path, "tensorboard")
    warnings = [r for r in caplog.records if "tracker tensorboard failed in log" in r.getMessage()]
    assert len(warnings) == 1 and calls == [1]
    assert sorted(csv_losses(run_dir)) == list(range(1, STEPS + 1))
    assert json.loads((run_dir / "status.json").read_text())["state"] == "completed"
