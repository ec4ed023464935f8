"""Post-hoc adapter editing: `spectral` rescales LoRA singular values by calibration-loss sensitivity.

The names below load on first use, so that `EditRule` (and the CLI's flags built from it) needs no torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

HOMES = {
    "EditRule": "loralab.edit.options",
    "edit_sigma": "loralab.edit.rules",
    "SpectralEdit": "loralab.edit.spectral",
    "spectral_edit": "loralab.edit.spectral",
}
__all__ = ["EditRule", "SpectralEdit", "edit_sigma", "spectral_edit"]


def __getattr__(name: str) -> Any:
    """Import a public name from its module on first access (PEP 562)."""
    if name not in HOMES:
        raise AttributeError(f"module 'loralab.edit' has no attribute {name!r}")
    return getattr(import_module(HOMES[name]), name)
