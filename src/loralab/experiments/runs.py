"""Run directories: naming, the overwrite policy, and status.json.

`<io.root>/<task>/<model>/<method>/<config-hash8>/seed<k>/`. Nothing of an existing run is ever deleted:
`force` renames the old directory to `<dir>.old-<timestamp>`.
"""

from __future__ import annotations

import json
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

from loralab.config.load import config_hash
from loralab.config.schema import RunConfig
from loralab.errors import RunError

Action = Literal["new", "resume", "skip"]
STATUS = "status.json"
VERSIONED = ("loralab", "torch", "transformers", "peft", "accelerate", "datasets")


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
    state = read_status(directory).get("state")
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
    return RunPlan(directory, "resume")


def ask_policy(directory: Path) -> str:
    answer = input(f"{directory} exists: [r]esume, [f]orce (move aside), [a]bort? ").strip().lower()
    return {"r": "resume", "f": "force"}.get(answer[:1], "error")


def read_status(directory: Path) -> dict[str, Any]:
    path = directory / STATUS
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}


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
