"""log.wandb.{project, entity, mode}: what the wandb tracker hands to wandb.init (recorded by a stand-in wandb module;
the offline files of the real library are tested in test_trackers.py), and an online init that fails drops the
tracker with one warning instead of stopping the run."""

from __future__ import annotations

import logging
import sys
import types

import pytest

from loralab.config import config_to_dict, load_config
from loralab.tracking import Trackers


class Recorder(types.ModuleType):
    """A stand-in `wandb` module: init records its keyword arguments, or raises `fail` when given."""

    def __init__(self, fail: Exception | None = None) -> None:
        super().__init__("wandb")
        self.calls: list[dict] = []
        self.fail = fail

    def init(self, **kwargs):
        self.calls.append(kwargs)
        if self.fail is not None:
            raise self.fail
        return types.SimpleNamespace(log=lambda metrics, step: None, finish=lambda: None)


def start(monkeypatch, tmp_path, fake: Recorder, *overrides: str) -> Trackers:
    monkeypatch.setitem(sys.modules, "wandb", fake)
    config = config_to_dict(load_config([], ["log.trackers=[wandb]", *overrides]))
    return Trackers.start(["wandb"], tmp_path, "run", config)


def test_offline_is_the_default(monkeypatch, tmp_path):
    fake = Recorder()
    start(monkeypatch, tmp_path, fake)
    (call,) = fake.calls
    assert (call["mode"], call["project"], call["entity"], call["dir"]) == ("offline", None, None, str(tmp_path))


def test_online_goes_to_the_project_and_entity(monkeypatch, tmp_path):
    fake = Recorder()
    trackers = start(
        monkeypatch, tmp_path, fake, "log.wandb.mode=online", "log.wandb.project=lora", "log.wandb.entity=lab"
    )
    (call,) = fake.calls
    assert (call["mode"], call["project"], call["entity"], call["name"]) == ("online", "lora", "lab", "run")
    assert call["config"]["log"]["wandb"]["mode"] == "online" and len(trackers.active) == 1


def test_an_online_init_that_fails_is_dropped_with_one_warning(monkeypatch, tmp_path, caplog):
    fake = Recorder(fail=ConnectionError("api.wandb.ai unreachable\nretrying ..."))
    with caplog.at_level(logging.WARNING, logger="loralab"):
        trackers = start(monkeypatch, tmp_path, fake, "log.wandb.mode=online")
    assert trackers.active == []
    (record,) = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "wandb" in record.getMessage() and "unreachable" in record.getMessage()
    trackers.log(1, {"train/loss": 1.0})  # the run goes on
    trackers.finish()


def test_a_wrong_mode_is_one_config_line():
    with pytest.raises(Exception, match=r"log.wandb.mode: expected one of 'offline', 'online', got 'live'"):
        load_config([], ["log.wandb.mode=live"])
