"""`method.adapter.kind: dual_rank_lora` — one PEFT LoRA of rank R: components 0..r-1 are the core, r..R-1
the extension. Training needs no custom layer; the split is metadata, used by the rule, the views and export. The
model carries it (`record_split`), so code that sees only the model (the HF trainer) finds it too.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file
from torch import nn

from loralab.adapters.base import (
    SIDE_FILE,
    LoraView,
    check_safetensors,
    read_json,
    require_directory,
    write_side_file,
)
from loralab.adapters.lora import peft_lora_views
from loralab.adapters.peft_any import ADAPTER_CONFIG, ADAPTER_WEIGHTS, TASK_TYPES, PeftAdapter, uniform_scaling
from loralab.adapters.targets import resolve_targets
from loralab.config.schema import DualRankOptions
from loralab.errors import AdapterError

VIEWS = ("full", "core")
SPLIT_ATTRIBUTE = "loralab_dual_rank_split"


def record_split(model: nn.Module, split: int) -> nn.Module:
    """Mark a PEFT LoRA model of rank R as dual-rank: its rank components 0..split-1 are the core."""
    setattr(model, SPLIT_ATTRIBUTE, split)
    return model


def model_lora_views(model: nn.Module) -> dict[str, LoraView]:
    """The PEFT LoRA views of a model, with the dual-rank split the model records (None when it records none)."""
    split = getattr(model, SPLIT_ATTRIBUTE, None)
    return {name: dataclasses.replace(view, split=split) for name, view in peft_lora_views(model).items()}


def dual_rank_scaling(options: DualRankOptions) -> float:
    """s = α/r (`core`, the scaffold's convention), α/R (`full`) or α/√R (`rslora`)."""
    denominator = {"core": options.r, "full": options.R, "rslora": math.sqrt(options.R)}[options.scaling]
    return options.alpha / denominator


class DualRankLoraAdapter(PeftAdapter):
    """PEFT LoRA of rank R with lora_alpha = s·R, so PEFT's alpha/R is the dual-rank scaling s."""

    name = "dual_rank_lora"

    def __init__(self, head: str, options: DualRankOptions) -> None:
        super().__init__(head)
        self.options = options

    @property
    def split(self) -> int:
        return self.options.r

    def peft_config(self, model: nn.Module) -> LoraConfig:
        o = self.options
        return LoraConfig(
            task_type=TASK_TYPES[self.head],
            r=o.R,
            lora_alpha=dual_rank_scaling(o) * o.R,
            lora_dropout=o.dropout,
            target_modules=resolve_targets(o.target_modules, model),
        )

    def apply(self, model: nn.Module) -> nn.Module:
        model = super().apply(model)
        init_extension(peft_lora_views(model), self.options.r, self.options.hi_init_std)
        return record_split(model, self.options.r)

    def load(self, model: nn.Module, directory: Path) -> nn.Module:
        return record_split(super().load(model, directory), adapter_split(directory) or self.options.r)

    def lora_modules(self, model: nn.Module) -> dict[str, LoraView]:
        return {name: dataclasses.replace(view, split=self.options.r) for name, view in peft_lora_views(model).items()}

    def side_data(self) -> dict:
        return {"adapter": self.name, "split": self.options.r, "R": self.options.R, "scaling": self.options.scaling}


@torch.no_grad()
def init_extension(views: dict[str, LoraView], split: int, std: float) -> None:
    """Zero-contribution init: B = 0 everywhere (PEFT's default), A_hi ~ N(0, std²); A_r keeps Kaiming-uniform."""
    for view in views.values():
        view.A[split:].normal_(0.0, std)


@contextmanager
def adapter_view(model: nn.Module, view: str, split: int | None) -> Iterator[None]:
    """Evaluate under a view: `full` as trained, `core` with the extension's B columns zeroed, then restored."""
    if view == "full":
        yield
        return
    if split is None:
        raise AdapterError("the core view needs a dual-rank adapter (no split point recorded)")
    with torch.no_grad():
        saved = [(lora.B, lora.B[:, split:].clone()) for lora in peft_lora_views(model).values()]
        for B, _ in saved:
            B[:, split:] = 0
    try:
        yield
    finally:
        with torch.no_grad():
            for B, extension in saved:
                B[:, split:] = extension


def adapter_split(directory: Path) -> int | None:
    """The core/extension split recorded beside a saved adapter, or None for anything but dual-rank LoRA."""
    side = Path(directory) / SIDE_FILE
    return read_json(side).get("split") if side.is_file() else None


def export_view(directory: Path, out: Path, view: str) -> Path:
    """Write `view` of a saved dual-rank adapter as a plain PEFT LoRA: `full` as is, `core` as rank r.

    The core adapter keeps A[:r] and B[:, :r] and sets lora_alpha = s·r, so its outputs equal the core view's.
    """
    directory, out = require_directory(directory), Path(out)
    split = adapter_split(directory)
    if split is None:
        raise AdapterError(f"{directory} is not a dual-rank LoRA adapter (no 'split' in {SIDE_FILE})")
    if out.resolve() == directory.resolve():
        raise AdapterError(f"--out must differ from the adapter directory: {out}")
    out.mkdir(parents=True, exist_ok=True)
    if view == "full":
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            shutil.copyfile(directory / name, out / name)
        write_side_file(out, read_json(directory / SIDE_FILE))
        return out
    config = read_json(directory / ADAPTER_CONFIG)
    scaling = uniform_scaling(config, directory)
    check_safetensors(directory / ADAPTER_WEIGHTS)
    tensors = load_file(str(directory / ADAPTER_WEIGHTS))
    core = {name: core_slice(name, tensor, split) for name, tensor in tensors.items()}
    save_file(core, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config |= {"r": split, "lora_alpha": scaling * split, "use_rslora": False}
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    write_side_file(out, {"adapter": "lora", "exported_from": str(directory), "view": "core"})
    return out


def core_slice(name: str, tensor: torch.Tensor, split: int) -> torch.Tensor:
    """The first `split` rank components of a LoRA tensor; any other tensor (a task head) unchanged."""
    if ".lora_A." in name:
        return tensor[:split].contiguous()
    if ".lora_B." in name:
        return tensor[:, :split].contiguous()
    return tensor
