"""Adapters that train a subset of the model's own parameters: full fine-tuning and BitFit.

Neither is expressible as a PEFT adapter, so the trained tensors are saved as `weights.safetensors`,
keyed by the model's parameter names, beside `loralab.json`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from loralab.adapters.base import (
    SIDE_FILE,
    LoraView,
    check_safetensors,
    is_head_parameter,
    read_json,
    require_directory,
    write_side_file,
)
from loralab.errors import AdapterError

WEIGHTS = "weights.safetensors"


class SubsetAdapter:
    """Trains the parameters `is_trainable` selects; everything else is frozen."""

    name = "subset"

    def is_trainable(self, name: str, parameter: nn.Parameter) -> bool:
        raise NotImplementedError

    def apply(self, model: nn.Module) -> nn.Module:
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(self.is_trainable(name, parameter))
        return model

    def lora_modules(self, model: nn.Module) -> dict[str, LoraView]:
        return {}

    def save(self, model: nn.Module, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
        save_file(tensors, str(directory / WEIGHTS))
        write_side_file(directory, {"adapter": self.name, "tensors": len(tensors)})

    def load(self, model: nn.Module, directory: Path) -> nn.Module:
        directory = require_directory(directory)
        side = read_json(directory / SIDE_FILE)
        if side.get("adapter") != self.name:
            raise AdapterError(f"{directory} holds a '{side.get('adapter')}' adapter, not '{self.name}'")
        check_safetensors(directory / WEIGHTS)
        saved = load_file(str(directory / WEIGHTS))
        parameters = dict(model.named_parameters())
        for key, tensor in saved.items():
            if key not in parameters or parameters[key].shape != tensor.shape:
                raise AdapterError(f"{directory / WEIGHTS}: tensor '{key}' does not fit this base model")
        with torch.no_grad():
            for key, tensor in saved.items():
                parameters[key].copy_(tensor)
        return self.apply(model)


class FullAdapter(SubsetAdapter):
    """`method.adapter.kind: full` — every parameter trains."""

    name = "full"

    def is_trainable(self, name: str, parameter: nn.Parameter) -> bool:
        return True


class BitfitAdapter(SubsetAdapter):
    """`method.adapter.kind: bitfit` — bias terms (LayerNorm weights optionally) and the task head train."""

    name = "bitfit"

    def __init__(self, train_layernorm: bool = False) -> None:
        self.train_layernorm = train_layernorm

    def is_trainable(self, name: str, parameter: nn.Parameter) -> bool:
        leaf = name.rsplit(".", 1)[-1]
        is_norm = any(key in name.lower() for key in ("layernorm", "layer_norm", "norm.", "ln_"))
        return leaf == "bias" or is_head_parameter(name) or (self.train_layernorm and is_norm)
