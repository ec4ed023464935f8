"""Masked diffusion LMs: schedules, the model and its loss, the sampler, trajectory LoRA, evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loralab.adapters import Adapter, build_adapter, load_adapter
from loralab.adapters.base import SIDE_FILE, read_json, require_directory
from loralab.config.schema import TrajectoryLoraOptions
from loralab.diffusion.backbone_adapter import BackboneAdapter
from loralab.diffusion.model import MaskedDiffusionLM, load_diffusion_model
from loralab.diffusion.sampler import SamplerSettings, sample
from loralab.diffusion.schedule import Schedule
from loralab.diffusion.trajectory_lora import TrajectoryLoraAdapter


def build_diffusion_adapter(options: Any) -> Adapter:
    """The adapter for `method.adapter` on a masked diffusion LM: trajectory LoRA, or any backbone adapter."""
    if options.kind == "trajectory_lora":
        return TrajectoryLoraAdapter(options)
    return BackboneAdapter(build_adapter(options, "masked_lm"))


def load_diffusion_adapter(model: MaskedDiffusionLM, directory: str | Path) -> MaskedDiffusionLM:
    """Any adapter loralab writes for a masked diffusion LM (trajectory LoRA, or a backbone adapter + own parts)."""
    directory = require_directory(Path(directory))
    side = read_json(directory / SIDE_FILE) if (directory / SIDE_FILE).is_file() else {}
    if side.get("adapter") == TrajectoryLoraAdapter.name:
        return TrajectoryLoraAdapter(TrajectoryLoraOptions()).load(model, directory)
    model.backbone = load_adapter(model.backbone, directory)
    model.load_own_parts(directory)
    return model


__all__ = [
    "BackboneAdapter",
    "MaskedDiffusionLM",
    "SamplerSettings",
    "Schedule",
    "TrajectoryLoraAdapter",
    "build_diffusion_adapter",
    "load_diffusion_adapter",
    "load_diffusion_model",
    "sample",
]
