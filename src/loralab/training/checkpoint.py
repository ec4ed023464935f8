"""Atomic checkpoints (temp dir + rename) holding everything an exact resume needs, each proven by a manifest.

manifest.json (every file's size and sha256) is written last inside the temp dir, so the rename publishes the
files and their manifest together. Resume verifies a checkpoint and reads all of it before anything reaches the
model, and falls back to the newest one that verifies. A checkpoint without a manifest (written before checkpoints
carried one, or a copy that lost it) is unverifiable and skipped like a damaged one: loading alone would accept a
file whose bytes were altered but still parse.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from loralab.errors import RunError, first_line
from loralab.seeding import rng_state, set_rng_state
from loralab.training.loop import TrainState

PREFIX = "step-"
MANIFEST = "manifest.json"
TRAINABLE, TRAINING, TRAINER = "trainable.safetensors", "training_state.pt", "trainer_state.json"
BLOB_KEYS = ("optimizer", "scheduler", "rule", "rng")
# what a damaged file makes the readers raise: safetensors, torch.load (zip, pickle), json, the file system
READ_ERRORS = (OSError, ValueError, RuntimeError, EOFError, TypeError, pickle.UnpicklingError, SafetensorError)

log = logging.getLogger("loralab")


class CheckpointError(RunError):
    """A checkpoint that fails its manifest or cannot be read: resume skips it."""


@dataclass
class Checkpoint:
    """A verified checkpoint read into memory; nothing of it has reached a model yet."""

    path: Path
    trainable: dict[str, torch.Tensor]
    blob: dict[str, Any]
    state: TrainState


def save_checkpoint(
    directory: Path, step: int, model: nn.Module, optimizer, scheduler, rule, state: dict, keep_last: int
) -> Path:
    """Write checkpoints/step-<n>/ atomically, manifest last, then drop all but the newest `keep_last`."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"{PREFIX}{step}"
    temporary = directory / f".tmp-{PREFIX}{step}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    trainable = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
    save_file(trainable, str(temporary / TRAINABLE))
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rule": rule.state_dict(),
            "rng": rng_state(),
        },
        temporary / TRAINING,
    )
    (temporary / TRAINER).write_text(json.dumps(state, indent=2))
    write_manifest(temporary)
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


def resume_checkpoint(run_dir: Path, model: nn.Module, optimizer, scheduler, rule) -> TrainState:
    """Restore the newest checkpoint of `run_dir` that verifies; a fresh state when it has none at all.

    The checkpoints skipped on the way are named in the one line that says where the run resumes; when there are
    checkpoints and none verifies, the run is refused (resuming from step 0 would silently discard them).
    """
    skipped = []
    for path in reversed(list_checkpoints(run_dir / "checkpoints")):
        try:
            checkpoint = read_checkpoint(path)
        except CheckpointError as exc:
            skipped.append(f"{path.name}: {exc}")
            continue
        apply_checkpoint(checkpoint, model, optimizer, scheduler, rule)
        if skipped:
            log.warning("resuming %s from %s, skipped %s", run_dir, path.name, "; ".join(skipped))
        else:
            log.info("resuming %s from %s", run_dir, path.name)
        return checkpoint.state
    if skipped:
        raise RunError(
            f"cannot resume {run_dir}: no checkpoint verifies ({'; '.join(skipped)}); "
            "start it over with io.overwrite=force (the old directory is kept aside)"
        )
    return TrainState()


def read_checkpoint(path: Path) -> Checkpoint:
    """Verify a checkpoint against its manifest and read every file; any damage is a CheckpointError."""
    verify_checkpoint(path)
    trainable = read_file(path / TRAINABLE, lambda file: load_file(str(file)))
    blob = read_file(path / TRAINING, lambda file: torch.load(file, weights_only=True))
    if not isinstance(blob, dict) or any(key not in blob for key in BLOB_KEYS):
        raise CheckpointError(f"{TRAINING} lacks the optimizer, scheduler, rule or RNG state")
    state = read_file(path / TRAINER, lambda file: TrainState(**json.loads(file.read_text())))
    return Checkpoint(path, trainable, blob, state)


def read_file(file: Path, reader: Callable[[Path], Any]) -> Any:
    """One checkpoint file through its reader, a failure becoming a CheckpointError that names the file."""
    try:
        return reader(file)
    except READ_ERRORS as exc:
        raise CheckpointError(f"{file.name} unreadable ({type(exc).__name__}: {first_line(exc)})") from None


def apply_checkpoint(checkpoint: Checkpoint, model: nn.Module, optimizer, scheduler, rule) -> None:
    """Copy a read checkpoint into the weights, optimizer, scheduler, rule and RNGs; refuse one that does not fit."""
    parameters = dict(model.named_parameters())
    try:
        with torch.no_grad():
            for name, tensor in checkpoint.trainable.items():
                parameters[name].copy_(tensor)
        optimizer.load_state_dict(checkpoint.blob["optimizer"])
        scheduler.load_state_dict(checkpoint.blob["scheduler"])
        rule.load_state_dict(checkpoint.blob["rule"])
        set_rng_state(checkpoint.blob["rng"])
    except (KeyError, IndexError, *READ_ERRORS) as exc:
        raise RunError(
            f"checkpoint {checkpoint.path} does not fit this run's model ({type(exc).__name__}: {first_line(exc)}); "
            "start it over with io.overwrite=force"
        ) from None


def write_manifest(directory: Path) -> None:
    """manifest.json: the size and sha256 of every file of a checkpoint, written after all of them."""
    files = {f.name: {"bytes": f.stat().st_size, "sha256": sha256(f)} for f in sorted(directory.iterdir())}
    (directory / MANIFEST).write_text(json.dumps(files, indent=2))


def verify_checkpoint(path: Path) -> None:
    """Raise CheckpointError unless the manifest lists the files a resume needs and each one is there, whole."""
    manifest = read_manifest(path)
    for name in (TRAINABLE, TRAINING, TRAINER):
        if name not in manifest:
            raise CheckpointError(f"{MANIFEST} does not list {name}")
    for name, entry in manifest.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{name} is missing")
        size = file.stat().st_size
        if size != entry["bytes"]:
            raise CheckpointError(f"{name} has {size} bytes, the manifest {entry['bytes']}")
        if sha256(file) != entry["sha256"]:
            raise CheckpointError(f"{name} does not match its sha256 in the manifest")


def read_manifest(path: Path) -> dict[str, dict[str, Any]]:
    """A checkpoint's manifest: plain file names to {bytes, sha256}; missing or malformed is a CheckpointError."""
    file = path / MANIFEST
    if not file.is_file():
        raise CheckpointError(f"no {MANIFEST}, so it cannot be verified")
    manifest = read_file(file, lambda f: json.loads(f.read_text()))
    if not isinstance(manifest, dict) or not all(manifest_entry(name, e) for name, e in manifest.items()):
        raise CheckpointError(f"{MANIFEST} malformed")
    return manifest


def manifest_entry(name: str, entry: Any) -> bool:
    """Whether a manifest entry names a file of the checkpoint itself with an integer size and a hex digest."""
    return (
        Path(name).name == name
        and isinstance(entry, dict)
        and isinstance(entry.get("bytes"), int)
        and isinstance(entry.get("sha256"), str)
    )


def sha256(file: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (a full fine-tune's checkpoint may not fit in memory twice)."""
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sync_directory(directory: Path) -> None:
    """fsync every file so a rename never publishes a half-written checkpoint."""
    for file in directory.iterdir():
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
