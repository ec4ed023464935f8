"""Post-hoc adapter editing: `spectral` rescales LoRA singular values by calibration-loss sensitivity."""

from loralab.edit.rules import EditRule, edit_sigma
from loralab.edit.spectral import SpectralEdit, spectral_edit

__all__ = ["EditRule", "SpectralEdit", "edit_sigma", "spectral_edit"]
