"""The Adapter protocol (what trains and how it is inserted) and the LoraView that gradient rules see."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from safetensors import safe_open
from torch import nn

from loralab.config.registry import Registry
from loralab.errors import AdapterError

SIDE_FILE = "loralab.json"
HEAD_PREFIXES = ("classifier", "score")


@dataclass
class LoraView:
    """A gradient rule's view of one LoRA module: A (r×d_in), B (d_out×r), scaling, dual-rank split."""

    module: nn.Module
    A: nn.Parameter
    B: nn.Parameter
    scaling: float
    split: int | None = None


class Adapter(Protocol):
    """What is trainable and how it is inserted into a model."""

    name: str

    def apply(self, model: nn.Module) -> nn.Module:
        """Return the model with its trainable parts inserted and everything else frozen."""

    def lora_modules(self, model: nn.Module) -> dict[str, LoraView]:
        """Views of the LoRA-like modules for gradient rules; {} when the adapter is not LoRA-like."""

    def save(self, model: nn.Module, directory: Path) -> None:
        """Write the trained parts (PEFT format where expressible, plus loralab.json)."""

    def load(self, model: nn.Module, directory: Path) -> nn.Module:
        """Insert saved trained parts into a freshly loaded base model."""


AdapterBuilder = Callable[[Any, str], Adapter]  # (method.adapter options, head: seq_cls | causal_lm | masked_lm)
ADAPTERS: Registry[AdapterBuilder] = Registry("adapter kind")


def register_adapter(kind: str, builder: AdapterBuilder | None = None) -> Any:
    """Register the builder of an adapter kind: `register_adapter(kind, builder)`, or `@register_adapter(kind)`."""
    return ADAPTERS.register(kind) if builder is None else ADAPTERS.register(kind)(builder)


def is_head_parameter(name: str) -> bool:
    """True for a task head created on top of the backbone (it must train with any adapter)."""
    return any(part in HEAD_PREFIXES for part in name.split(".")[:2])


def write_side_file(directory: Path, data: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / SIDE_FILE).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path: Path) -> dict:
    """Read a JSON file of an adapter directory; missing or malformed files are AdapterErrors."""
    if not path.is_file():
        raise AdapterError(f"adapter file missing: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"malformed JSON in {path}: {exc}") from None
    if not isinstance(data, dict):
        raise AdapterError(f"malformed adapter file {path}: expected a JSON object")
    return data


def check_safetensors(path: Path) -> None:
    """Open a safetensors file's header to fail early, in one line, on a missing or corrupt file."""
    if not path.is_file():
        raise AdapterError(f"adapter weights missing: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                handle.get_slice(key)
    except Exception as exc:  # safetensors raises several unrelated types for a damaged file
        raise AdapterError(f"corrupt safetensors file {path}: {exc}") from None


def require_directory(directory: Path) -> Path:
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterError(f"adapter directory not found: {directory}")
    return directory
