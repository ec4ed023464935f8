"""Adapters that PEFT implements: any PEFT config by type name, and the shared PEFT save/load path."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from peft import PeftConfig, PeftModel, TaskType, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from torch import nn

from loralab.adapters.base import LoraView, check_safetensors, read_json, require_directory, write_side_file
from loralab.errors import AdapterError, ConfigError, first_line, unknown

TASK_TYPES = {"seq_cls": TaskType.SEQ_CLS, "causal_lm": TaskType.CAUSAL_LM, "masked_lm": None}  # MLM: plain PeftModel
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class PeftAdapter:
    """Base for adapters realised as a PEFT model; subclasses build the PeftConfig for a given model."""

    name = "peft"

    def __init__(self, head: str) -> None:
        self.head = head

    def peft_config(self, model: nn.Module) -> PeftConfig:
        raise NotImplementedError

    def side_data(self) -> dict:
        """Method-specific metadata written to loralab.json beside the PEFT files."""
        return {"adapter": self.name}

    def apply(self, model: nn.Module) -> nn.Module:
        try:
            with peft_deprecations_silenced():
                return get_peft_model(model, self.peft_config(model))
        except ValueError as exc:
            raise ConfigError(f"method.adapter: PEFT cannot apply {self.name} to this model: {exc}") from None

    def lora_modules(self, model: nn.Module) -> dict[str, LoraView]:
        return {}

    def save(self, model: nn.Module, directory: Path) -> None:
        model.save_pretrained(str(directory))
        write_side_file(Path(directory), self.side_data())

    def load(self, model: nn.Module, directory: Path) -> nn.Module:
        return load_peft_adapter(model, directory)


@contextmanager
def peft_deprecations_silenced() -> Iterator[None]:
    """PEFT wraps a model by reading `is_gradient_checkpointing`, which transformers 5 deprecates; not ours to fix."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def load_peft_adapter(
    model: nn.Module, directory: Path, is_trainable: bool = False, adapter_name: str = "default"
) -> nn.Module:
    """Load a PEFT adapter directory onto a base model, failing in one line on missing/corrupt files."""
    directory = require_directory(directory)
    require_peft_type(directory / ADAPTER_CONFIG)
    check_safetensors(directory / ADAPTER_WEIGHTS)
    try:
        with peft_deprecations_silenced():
            # PEFT only warns when the layers it built find no weights in the file (e.g. a BERT adapter on a
            # RoBERTa base: same target names, other prefixes) and leaves them at init; that must not pass.
            warnings.filterwarnings("error", message=".*Found missing adapter keys", category=UserWarning)
            return PeftModel.from_pretrained(
                model, str(directory), adapter_name=adapter_name, is_trainable=is_trainable
            )
    except UserWarning:
        raise AdapterError(
            f"cannot load adapter {directory} onto this base model: some of its layers have no weights in the "
            "adapter file (was it trained on another architecture?)"
        ) from None
    except KeyError as exc:  # PEFT looks up a module or weight the base model does not have
        raise AdapterError(
            f"cannot load adapter {directory} onto this base model: it has no {exc.args[0]!r} (another task head "
            "or architecture?)"
        ) from None
    except (ValueError, RuntimeError, TypeError) as exc:
        raise AdapterError(f"cannot load adapter {directory} onto this base model: {first_line(exc)}") from None


def require_peft_type(config_file: Path) -> None:
    """The adapter config names a PEFT type PEFT knows, or the load fails here in one line (not on a KeyError)."""
    config = read_json(config_file)
    if "peft_type" not in config:
        raise AdapterError(f"{config_file} has no peft_type: not a PEFT adapter config")
    try:
        peft_config_class(str(config["peft_type"]))
    except ConfigError as exc:
        raise AdapterError(f"{config_file}: {str(exc).removeprefix('method.adapter.peft_type: ')}") from None


def peft_config_class(peft_type: str) -> type:
    """PEFT's config class for a type name such as 'LORA', 'IA3' or 'loha' (case-insensitive)."""
    by_name = {
        str(key.value if hasattr(key, "value") else key).upper(): cls
        for key, cls in PEFT_TYPE_TO_CONFIG_MAPPING.items()
    }
    name = peft_type.upper().replace("-", "_")
    if name not in by_name:
        raise ConfigError("method.adapter.peft_type: " + unknown("PEFT type", name, by_name))  # case-insensitive hint
    return by_name[name]


class AnyPeftAdapter(PeftAdapter):
    """`method.adapter.kind: peft` — any PEFT method by type name plus its keyword arguments."""

    name = "peft"

    def __init__(self, head: str, peft_type: str, kwargs: dict[str, Any]) -> None:
        super().__init__(head)
        self.config_class = peft_config_class(peft_type)
        self.kwargs = dict(kwargs)
        self.peft_type = peft_type
        self.peft_config(None)  # validate the keyword arguments before any model is loaded

    def peft_config(self, model: nn.Module | None) -> PeftConfig:
        try:
            return self.config_class(task_type=TASK_TYPES[self.head], **self.kwargs)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"method.adapter.kwargs for PEFT type {self.peft_type}: {exc}") from None

    def side_data(self) -> dict:
        return {"adapter": self.name, "peft_type": self.peft_type}


def uniform_scaling(config: dict, directory: Path) -> float:
    """The one LoRA scaling (α/r, or α/√r for rsLoRA) of a saved adapter without per-module patterns."""
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise AdapterError(f"{directory}: adapters with per-module rank or alpha patterns cannot be rewritten here")
    rank = config["r"]
    return config["lora_alpha"] / (math.sqrt(rank) if config.get("use_rslora") else rank)
