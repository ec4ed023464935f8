"""Run directories: naming, the overwrite policy, and status.json.

`<io.root>/<task>/<model>/<method>/<config-hash8>/seed<k>/`. Nothing of an existing run is ever deleted:
`force` renames the old directory to `<dir>.old-<timestamp>`. A resume is held to the config.yaml the run started with.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import yaml

from loralab.config.load import config_hash, dotted_items, dump_yaml, hashed_sections, read_yaml_file
from loralab.config.schema import RunConfig
from loralab.errors import ConfigError, RunError, first_line

Action = Literal["new", "resume", "skip"]
STATUS = "status.json"
CONFIG = "config.yaml"
SHOWN_KEYS = 6  # differing config keys a refusal names before it counts the rest
VERSIONED = ("loralab", "torch", "transformers", "peft", "accelerate", "datasets")

log = logging.getLogger("loralab")


def slug(text: str) -> str:
    """A path-safe name: '/' and other separators become '-'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text.strip("/")).strip("-") or "unnamed"


def run_dir_for(config: RunConfig) -> Path:
    """Where a config's run lives; the hash covers everything but seed, io and log."""
    return (
        Path(config.io.root)
        / slug(config.task.name)
        / slug(Path(config.model.name).name if os.sep in config.model.name else config.model.name)
        / slug(config.method.name)
        / config_hash(config)
        / f"seed{config.seed}"
    )


@dataclass
class RunPlan:
    """What `io.overwrite` decided; nothing on disk changes until `open()`."""

    directory: Path
    action: Action
    move_aside: bool = False

    def open(self) -> Path:
        """Create the run directory, first renaming an old run to `<dir>.old-<timestamp>` under `force`."""
        if self.move_aside and self.directory.exists():
            self.directory.rename(
                self.directory.with_name(f"{self.directory.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
            )
        self.directory.mkdir(parents=True, exist_ok=True)
        return self.directory


def plan_run(config: RunConfig, interactive: bool | None = None) -> RunPlan:
    """Apply `io.overwrite` to the run directory: start, resume, skip, move aside, or refuse (no side effects)."""
    directory = run_dir_for(config)
    if not directory.exists():
        return RunPlan(directory, "new")
    status, damage = load_status(directory)
    state = status.get("state")
    policy = config.io.overwrite
    if policy == "ask":
        tty = sys.stdin.isatty() if interactive is None else interactive
        policy = ask_policy(directory) if tty else "error"
    if policy == "error":
        raise RunError(
            f"run directory already exists: {directory} (state: {state or 'unknown'}); "
            "set io.overwrite=resume, skip or force"
        )
    if policy == "force":
        return RunPlan(directory, "new", move_aside=True)
    if state == "completed":
        return RunPlan(directory, "skip")
    check_stored_config(directory, config)
    if damage:
        log.warning("%s of %s is damaged (%s); resuming it as an unfinished run", STATUS, directory, damage)
    return RunPlan(directory, "resume")


def check_stored_config(directory: Path, config: RunConfig) -> None:
    """Refuse to resume a run whose config.yaml differs from `config` in a key the run hash covers.

    Only what config_hash covers is compared: seed, io, log, hpo (and diffusion outside masked-diffusion runs) may
    change between a start and its resume (io.overwrite=resume itself does). Since the hash names the directory,
    any other difference means config.yaml was edited, and resuming would neither honour nor keep the edit.
    """
    path = directory / CONFIG
    if not path.exists():
        return  # stopped before config.yaml was written: no checkpoint can exist either
    try:
        stored = read_yaml_file(path)
    except ConfigError as exc:
        raise RunError(f"cannot resume {directory}: {exc}; restore it or start over with io.overwrite=force") from None
    if not stored:
        raise RunError(f"cannot resume {directory}: {path} is empty; restore it or start over with io.overwrite=force")
    # both as YAML holds them (lists, not tuples)
    ours, theirs = (hashed_items(tree, config.model.kind) for tree in (yaml.safe_load(dump_yaml(config)), stored))
    differing = sorted(
        key for key in ours.keys() | theirs.keys() if key not in ours or key not in theirs or ours[key] != theirs[key]
    )
    if differing:
        more = f" and {len(differing) - SHOWN_KEYS} more" if len(differing) > SHOWN_KEYS else ""
        raise RunError(
            f"cannot resume {directory}: its {CONFIG} differs from this command's config in "
            f"{', '.join(differing[:SHOWN_KEYS])}{more}; restore it, or start over with io.overwrite=force"
        )


def hashed_items(tree: dict[str, Any], model_kind: str) -> dict[str, Any]:
    """The dotted keys of a config that config_hash covers (the same sections it leaves out)."""
    return dotted_items(hashed_sections(tree, model_kind))


def ask_policy(directory: Path) -> str:
    answer = input(f"{directory} exists: [r]esume, [f]orce (move aside), [a]bort? ").strip().lower()
    return {"r": "resume", "f": "force"}.get(answer[:1], "error")


def read_status(directory: Path) -> dict[str, Any]:
    """status.json as a dict; a missing or damaged one reads as {} (the next write_status replaces it whole)."""
    return load_status(directory)[0]


def load_status(directory: Path) -> tuple[dict[str, Any], str | None]:
    """status.json as a dict, and what is wrong with it: not UTF-8, truncated, NUL-filled, not an object."""
    path = directory / STATUS
    if not path.is_file():
        return {}, None
    try:
        status = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return {}, first_line(exc)
    if not isinstance(status, dict):
        return {}, f"a JSON {type(status).__name__}, not an object"
    return status, None


def write_status(directory: Path, **fields: Any) -> dict[str, Any]:
    """Update status.json atomically with `fields` and return the merged status."""
    status = {**read_status(directory), **fields}
    temporary = directory / f".{STATUS}.tmp"
    temporary.write_text(json.dumps(status, indent=2, sort_keys=True, default=str) + "\n")
    temporary.replace(directory / STATUS)
    return status


def environment() -> dict[str, Any]:
    """Library versions, git commit, host and Python of this process, for status.json."""
    versions = {}
    for package in VERSIONED:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {"versions": versions, "git_commit": git_commit(), "host": platform.node(), "python": sys.version.split()[0]}


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None
