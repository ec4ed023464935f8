"""Any backbone adapter (PEFT LoRA, Houlsby, prefix, BitFit, full) on a masked diffusion LM.

The inner adapter adapts the masked-LM backbone exactly as it would a plain encoder, so a LoRA adapter stays a
standard PEFT adapter of `AutoModelForMaskedLM`; the diffusion LM's own parts (time embedding, a head the
checkpoint lacked) train beside it and are saved next to its files.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from loralab.adapters.base import Adapter, LoraView
from loralab.diffusion.model import MaskedDiffusionLM


class BackboneAdapter:
    """Wraps an Adapter so that it applies to `model.backbone` of a MaskedDiffusionLM."""

    def __init__(self, inner: Adapter) -> None:
        self.inner = inner
        self.name = inner.name

    def apply(self, model: MaskedDiffusionLM) -> MaskedDiffusionLM:
        model.backbone = self.inner.apply(model.backbone)
        model.train_own_parts()
        return model

    def lora_modules(self, model: MaskedDiffusionLM) -> dict[str, LoraView]:
        return self.inner.lora_modules(model.backbone)

    def save(self, model: MaskedDiffusionLM, directory: Path) -> None:
        self.inner.save(model.backbone, directory)
        model.save_own_parts(Path(directory))

    def load(self, model: MaskedDiffusionLM, directory: Path) -> nn.Module:
        model.backbone = self.inner.load(model.backbone, directory)
        model.load_own_parts(Path(directory))
        return model
