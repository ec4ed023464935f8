"""Publish a PEFT adapter to the Hugging Face Hub with a model card: base model, task, method, metrics, config hash,
loralab version (`loralab export RUN --push-to-hub REPO_ID`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from tempfile import TemporaryDirectory

from loralab import __version__
from loralab.errors import AdapterError, LoraLabError, first_line

CARD = "README.md"
RUN_CONFIG = "loralab_config.yaml"  # the run's resolved config, uploaded beside the adapter


def card_facts(adapter: Path, run: Path | None) -> dict:
    """What the card states: from the run (config.yaml, eval.json) when there is one, else the adapter's config."""
    facts = {"base model": json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")}
    if run is None or not (run / "config.yaml").is_file():
        return facts | {"metrics": {}}
    from loralab.config import config_hash, load_config

    config = load_config([str(run / "config.yaml")])
    method, evaluated = config.method, run / "eval.json"
    return facts | {
        "base model": config.model.name,
        "task": config.task.name,
        "method": f"{method.name} (adapter {method.adapter.kind}, gradient {method.gradient.kind})",
        "config hash": config_hash(config),
        "metrics": json.loads(evaluated.read_text())["metrics"] if evaluated.is_file() else {},
    }


def model_card(repo_id: str, facts: dict) -> str:
    """The Hub model card: PEFT front matter, a table of the facts and one of the final metrics."""
    rows = [f"| {key} | {value} |" for key, value in facts.items() if key != "metrics" and value is not None]
    metrics = [f"| {name} | {value:.4f} |" for name, value in facts["metrics"].items()]
    lines = [
        "---",
        "library_name: peft",
        *([f"base_model: {facts['base model']}"] if facts["base model"] else []),
        "tags: [loralab, peft, lora]",
        "---",
        "",
        f"# {repo_id.rsplit('/', 1)[-1]}",
        "",
        f"A PEFT adapter trained with loralab {__version__}; load it with `PeftModel.from_pretrained`.",
        "",
        "| | |",
        "| --- | --- |",
        *rows,
        f"| loralab | {__version__} |",
    ]
    if metrics:
        lines += ["", "## Final evaluation", "", "| metric | value |", "| --- | --- |", *metrics]
    if "config hash" in facts:
        lines += ["", f"`{RUN_CONFIG}` is the run's resolved config: `loralab train --config {RUN_CONFIG}`."]
    return "\n".join(lines) + "\n"


def push_adapter(adapter: Path, repo_id: str, private: bool, run: Path | None = None) -> list[str]:
    """Upload a PEFT adapter, its model card and (from a run) the run's config to `repo_id`; the uploaded files.

    Offline, unreachable or refused by the Hub: one LoraLabError line."""
    import huggingface_hub

    if not (adapter / "adapter_config.json").is_file():
        raise AdapterError(
            f"{adapter} is not a PEFT adapter (no adapter_config.json); only PEFT adapters can be pushed"
        )
    if huggingface_hub.is_offline_mode():
        raise LoraLabError(f"cannot push to {repo_id}: the Hub is offline (HF_HUB_OFFLINE is set)")
    with TemporaryDirectory() as folder:
        staging = Path(folder)
        for file in adapter.iterdir():
            if file.is_file():
                shutil.copy2(file, staging / file.name)
        (staging / CARD).write_text(model_card(repo_id, card_facts(adapter, run)))
        if run is not None and (run / "config.yaml").is_file():
            shutil.copy2(run / "config.yaml", staging / RUN_CONFIG)
        try:
            api = huggingface_hub.HfApi()
            api.create_repo(repo_id, private=private, exist_ok=True)
            api.upload_folder(folder_path=str(staging), repo_id=repo_id, commit_message="loralab export")
        except Exception as exc:  # network, authentication or a refused name: one line, nothing half-done locally
            raise LoraLabError(f"cannot push to {repo_id}: {first_line(exc)}") from None
        return sorted(file.name for file in staging.iterdir())
