"""Atomic checkpoints (temp dir + rename) holding everything an exact resume needs."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from loralab.training.seeding import rng_state, set_rng_state

PREFIX = "step-"


def save_checkpoint(
    directory: Path, step: int, model: nn.Module, optimizer, scheduler, rule, state: dict, keep_last: int
) -> Path:
    """Write checkpoints/step-<n>/ atomically, then drop all but the newest `keep_last`."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"{PREFIX}{step}"
    temporary = directory / f".tmp-{PREFIX}{step}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    trainable = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
    save_file(trainable, str(temporary / "trainable.safetensors"))
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rule": rule.state_dict(),
            "rng": rng_state(),
        },
        temporary / "training_state.pt",
    )
    (temporary / "trainer_state.json").write_text(json.dumps(state, indent=2))
    sync_directory(temporary)
    if final.exists():
        shutil.rmtree(final)
    os.replace(temporary, final)
    for old in list_checkpoints(directory)[:-keep_last]:
        shutil.rmtree(old)
    return final


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temp dirs of an interrupted write are ignored)."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def load_checkpoint(path: Path, model: nn.Module, optimizer, scheduler, rule) -> dict:
    """Restore weights, optimizer, scheduler, rule and RNG state; return the trainer state."""
    saved = load_file(str(path / "trainable.safetensors"))
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in saved.items():
            parameters[name].copy_(tensor)
    blob = torch.load(path / "training_state.pt", weights_only=True)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    rule.load_state_dict(blob["rule"])
    set_rng_state(blob["rng"])
    return json.loads((path / "trainer_state.json").read_text())


def sync_directory(directory: Path) -> None:
    """fsync every file so a rename never publishes a half-written checkpoint."""
    for file in directory.iterdir():
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
