"""`loralab launch local --procs N -- <loralab command>`: the data-parallel path on one machine, through torchrun.

Each of the N processes runs the same loralab command; on a machine without GPUs they form a gloo group on CPU,
so the multi-process code path (gradient averaging, global votes and statistics, main-process writes) runs and
is tested anywhere. The CPU threads are shared out between the processes unless OMP_NUM_THREADS is set.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence

from loralab.errors import ConfigError


def torchrun_command(procs: int, command: Sequence[str]) -> list[str]:
    """The torchrun invocation that runs `loralab <command>` in `procs` processes on this machine."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={procs}",
        "-m",
        "loralab",
        *command,
    ]


def launch_local(procs: int, command: Sequence[str]) -> int:
    """Run the command in `procs` processes and return torchrun's exit code (non-zero if any process failed)."""
    if procs < 1:
        raise ConfigError(f"--procs must be ≥ 1, got {procs}")
    if not command:
        raise ConfigError("launch local: give the loralab command after --, e.g. -- train --config my.yaml")
    environment = dict(os.environ)
    environment.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // procs)))
    return subprocess.run(torchrun_command(procs, command), env=environment).returncode
