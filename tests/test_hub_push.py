"""`loralab export RUN --push-to-hub REPO_ID`: the calls huggingface_hub receives are recorded (no Hub is reachable
here): the repository created (private or not), the uploaded files (the PEFT adapter byte for byte, the model card,
the run's config) and the card's facts; offline, a failed upload and a non-PEFT adapter are one line and exit 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import ClassVar

import huggingface_hub
import pytest
import yaml

from loralab import __version__
from loralab.cli import main
from loralab.config import config_hash, load_config

pytestmark = pytest.mark.slow

TINY = ["model.name=tiny-bert", "task.train_samples=16", "task.eval_samples=8", "train.max_steps=1"]


class RecordedApi:
    """huggingface_hub.HfApi that records create_repo and what upload_folder would send; `fail` makes it raise."""

    calls: ClassVar[list[tuple[str, dict]]] = []
    uploaded: ClassVar[dict[str, bytes]] = {}
    fail: ClassVar[Exception | None] = None

    def create_repo(self, repo_id: str, **kwargs) -> None:
        RecordedApi.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        if RecordedApi.fail is not None:
            raise RecordedApi.fail

    def upload_folder(self, folder_path: str, repo_id: str, **kwargs) -> None:
        RecordedApi.calls.append(("upload_folder", {"repo_id": repo_id, **kwargs}))
        RecordedApi.uploaded = {path.name: path.read_bytes() for path in Path(folder_path).iterdir()}


@pytest.fixture
def hub(monkeypatch):
    monkeypatch.setattr(RecordedApi, "calls", [])
    monkeypatch.setattr(RecordedApi, "uploaded", {})
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordedApi)
    monkeypatch.setattr(huggingface_hub, "is_offline_mode", lambda: False)
    return RecordedApi


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("push") / "runs"
    assert main(["train", *TINY, f"io.root={root}"]) == 0
    (found,) = root.rglob("seed42")
    return found


def test_push_uploads_the_adapter_its_card_and_the_config(run, hub, capsys):
    assert main(["export", str(run), "--push-to-hub", "me/tiny-lora", "--private"]) == 0
    assert hub.calls[0] == ("create_repo", {"repo_id": "me/tiny-lora", "private": True, "exist_ok": True})
    assert hub.calls[1][0] == "upload_folder" and hub.calls[1][1]["repo_id"] == "me/tiny-lora"
    files = [path for path in (run / "adapter").iterdir() if path.is_file() and path.name != "README.md"]
    adapter = {path.name: path.read_bytes() for path in files}  # PEFT's own README.md gives way to the card
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(adapter)
    assert set(hub.uploaded) == {*adapter, "README.md", "loralab_config.yaml"}
    assert all(hub.uploaded[name] == data for name, data in adapter.items())  # the adapter byte for byte
    assert yaml.safe_load(hub.uploaded["loralab_config.yaml"]) == yaml.safe_load((run / "config.yaml").read_text())
    card = hub.uploaded["README.md"].decode()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "peft" and front["base_model"] == "tiny-bert" and "loralab" in front["tags"]
    config = load_config([str(run / "config.yaml")])
    for fact in (
        "| task | synthetic/sentiment |",
        f"| config hash | {config_hash(config)} |",
        f"| loralab | {__version__} |",
    ):
        assert fact in card
    assert "| method | lora (adapter lora, gradient none) |" in card
    for name, value in json.loads((run / "eval.json").read_text())["metrics"].items():
        assert f"| {name} | {value:.4f} |" in card
    assert "pushed " in capsys.readouterr().out


def test_an_adapter_directory_alone_gets_the_base_model_from_its_config(run, hub, tmp_path):
    adapter = Path(shutil.copytree(run / "adapter", tmp_path / "adapter"))
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": "org/base"}))
    assert main(["export", str(adapter), "--push-to-hub", "me/bare"]) == 0
    assert hub.calls[0][1]["private"] is False and "loralab_config.yaml" not in hub.uploaded
    card = hub.uploaded["README.md"].decode()
    assert "base_model: org/base" in card and "| base model | org/base |" in card and "config hash" not in card


def one_line_error(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    (line,) = capsys.readouterr().err.splitlines()
    return line


def test_offline_is_one_line(run, capsys):
    line = one_line_error(["export", str(run), "--push-to-hub", "me/x"], capsys)  # the suite runs with HF_HUB_OFFLINE
    assert line == "loralab: error: cannot push to me/x: the Hub is offline (HF_HUB_OFFLINE is set)"


def test_a_refused_upload_is_one_line(run, hub, monkeypatch, capsys):
    monkeypatch.setattr(hub, "fail", PermissionError("401 Client Error: Unauthorized\nInvalid credentials"))
    line = one_line_error(["export", str(run), "--push-to-hub", "me/x"], capsys)
    assert line == "loralab: error: cannot push to me/x: 401 Client Error: Unauthorized"


def test_not_a_peft_adapter_and_no_out_are_one_line(tmp_path, run, hub, capsys):
    line = one_line_error(["export", str(tmp_path), "--push-to-hub", "me/x"], capsys)
    assert line.endswith("is not a PEFT adapter (no adapter_config.json); only PEFT adapters can be pushed")
    assert one_line_error(["export", str(run)], capsys).startswith("loralab: error: export needs --out DIR")
    assert hub.calls == []
