"""`method.adapter.kind: houlsby` — bottleneck adapters after each block's attention and FFN output projection.

Houlsby placement: y ↦ y + W_up·GELU(W_down·y) on the output of the attention output projection and of the
FFN output projection, before the residual add and LayerNorm. W_down is small random normal, W_up and both
biases are zero, so the adapted model is the base model at initialisation. The projection module is wrapped
(`Bottleneck.base` is the original), so parameter names of the wrapped projections gain a `.base`.

PEFT has no Houlsby adapter, so this is not PEFT-expressible: the bottleneck tensors and the trained task head
are saved as `houlsby.safetensors`, keyed by the model's parameter names, beside `loralab.json`. The helpers at
the bottom (family lookup, freezing, reading and copying saved tensors) serve the prefix adapter too.
"""

from __future__ import annotations

import re
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
from loralab.errors import AdapterError, ConfigError

WEIGHTS = "houlsby.safetensors"

# Full-name patterns of the wrapped projections per family: attention output projection, FFN output projection.
# BERT/RoBERTa: `layer.N.attention.output.dense` and `layer.N.output.dense` (never the pooler, `classifier.dense`,
# `cls.predictions.transform.dense` or `lm_head.dense`); GPT-2 projections are Conv1D.
PROJECTIONS = {
    "bert": r"(.*\.)?layer\.\d+\.(attention\.)?output\.dense",
    "roberta": r"(.*\.)?layer\.\d+\.(attention\.)?output\.dense",
    "llama": r"(.*\.)?layers\.\d+\.(self_attn\.o_proj|mlp\.down_proj)",
    "gpt2": r"(.*\.)?h\.\d+\.(attn|mlp)\.c_proj",
}


class Bottleneck(nn.Module):
    """A projection followed by its Houlsby bottleneck: y + up(GELU(down(y))), y = base(x)."""

    def __init__(self, base: nn.Module, width: int, bottleneck: int, init_std: float) -> None:
        super().__init__()
        self.base = base
        weight = next(base.parameters())
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        self.down = nn.Linear(width, bottleneck, device=weight.device, dtype=dtype)
        self.up = nn.Linear(bottleneck, width, device=weight.device, dtype=dtype)
        with torch.no_grad():
            self.down.weight.normal_(0.0, init_std)
            for tensor in (self.down.bias, self.up.weight, self.up.bias):
                tensor.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        delta = self.up(nn.functional.gelu(self.down(y.to(self.down.weight.dtype))))
        return y + delta.to(y.dtype)


def output_width(module: nn.Module) -> int:
    """Output features of a Linear (`out_features`) or a GPT-2 Conv1D (`nf`)."""
    width = getattr(module, "out_features", None) or getattr(module, "nf", None)
    if not isinstance(width, int):
        raise ConfigError(f"cannot wrap {type(module).__name__}: it is neither a Linear nor a Conv1D")
    return width


class HoulsbyAdapter:
    """Houlsby bottlenecks of width `bottleneck` on every attention and FFN output projection; head trains."""

    name = "houlsby"

    def __init__(self, bottleneck: int = 64, init_std: float = 1e-3) -> None:
        self.bottleneck = bottleneck
        self.init_std = init_std

    def targets(self, model: nn.Module) -> list[str]:
        """Names of the projections that carry (or will carry) a bottleneck, in module order."""
        pattern = re.compile(PROJECTIONS[family_of(model, PROJECTIONS, "houlsby adapters")])
        return [name for name, _ in model.named_modules() if pattern.fullmatch(name)]

    def apply(self, model: nn.Module) -> nn.Module:
        for name in self.targets(model):
            module = model.get_submodule(name)
            if isinstance(module, Bottleneck):  # applied before: keep it (load applies, then copies)
                continue
            parent, _, leaf = name.rpartition(".")
            wrapped = Bottleneck(module, output_width(module), self.bottleneck, self.init_std)
            setattr(model.get_submodule(parent), leaf, wrapped)
        trainable = bottleneck_parameters(model)
        train_only(model, lambda name: name in trainable or is_head_parameter(name))
        return model

    def lora_modules(self, model: nn.Module) -> dict[str, LoraView]:
        return {}

    def save(self, model: nn.Module, directory: Path) -> None:
        side = {"adapter": self.name, "bottleneck": self.bottleneck, "modules": self.targets(model)}
        write_saved(directory, WEIGHTS, trained_tensors(model, bottleneck_parameters(model)), side)

    def load(self, model: nn.Module, directory: Path) -> nn.Module:
        side, saved = read_saved(directory, self.name, WEIGHTS)
        path = Path(directory) / WEIGHTS
        bottleneck = positive_int(side, "bottleneck", directory)
        if side.get("modules") != self.targets(model):
            raise AdapterError(f"{path}: saved for other modules than this base model's output projections")
        self.bottleneck = bottleneck
        self.apply(model)
        copy_saved(model, saved, path, expected=bottleneck_parameters(model))
        return model


def bottleneck_parameters(model: nn.Module) -> set[str]:
    """Full names of the bottleneck parameters (`<projection>.down.*`, `<projection>.up.*`) in the model."""
    return {
        f"{name}.{leaf}"
        for name, module in model.named_modules()
        if isinstance(module, Bottleneck)
        for leaf, _ in (*module.down.named_parameters(prefix="down"), *module.up.named_parameters(prefix="up"))
    }


# ---- helpers shared with the prefix adapter -------------------------------------------------------------


def family_of(model: nn.Module, table: dict, what: str) -> str:
    """The model's family (`config.model_type`) when `table` supports it, else a one-line ConfigError."""
    family = getattr(getattr(model, "config", None), "model_type", None)
    if family not in table:
        raise ConfigError(f"{what} do not support model type '{family}'; supported: {', '.join(sorted(table))}")
    return family


def train_only(model: nn.Module, trainable) -> None:
    """Freeze every parameter except those whose name `trainable` accepts."""
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(bool(trainable(name)))


def read_saved(directory: Path, kind: str, weights: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """The side file and the tensors of a saved `kind` adapter; one-line AdapterErrors for anything amiss."""
    directory = require_directory(directory)
    side = read_json(directory / SIDE_FILE)
    if side.get("adapter") != kind:
        raise AdapterError(f"{directory} holds a '{side.get('adapter')}' adapter, not '{kind}'")
    check_safetensors(directory / weights)
    return side, load_file(str(directory / weights))


def trained_tensors(model: nn.Module, names: set[str]) -> dict[str, torch.Tensor]:
    """CPU copies of the named parameters and of the task head's, keyed by parameter name."""
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if n in names or is_head_parameter(n)}


def write_saved(directory: Path, weights: str, tensors: dict[str, torch.Tensor], side: dict) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / weights))
    write_side_file(directory, side)


def positive_int(side: dict, key: str, directory: Path) -> int:
    """A side-file entry that must be a positive integer."""
    value = side.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise AdapterError(f"{Path(directory) / SIDE_FILE}: '{key}' must be a positive integer, got {value!r}")
    return value


def copy_saved(model: nn.Module, saved: dict[str, torch.Tensor], path: Path, expected: set[str]) -> None:
    """Copy saved tensors into the model's parameters of the same names (same shapes; `expected` and the head's
    parameters must all be saved)."""
    parameters = dict(model.named_parameters())
    missing = sorted((expected | {n for n in parameters if is_head_parameter(n)}) - saved.keys())
    if missing:
        raise AdapterError(f"{path}: tensor '{missing[0]}' is missing ({len(missing)} missing in all)")
    for key, tensor in saved.items():
        if key not in parameters or parameters[key].shape != tensor.shape:
            raise AdapterError(f"{path}: tensor '{key}' does not fit this base model")
    with torch.no_grad():
        for key, tensor in saved.items():
            parameters[key].copy_(tensor)
