"""CPU time of starting the command line: `loralab --help` and `loralab config show` beside `python -c pass`.

Each side is one fresh interpreter (`python -m loralab ...`, the console script's code) and each sample its user +
system CPU time (the children's rusage around the call), so a busy machine changes the numbers less than wall
time. Rounds alternate between the sides, the order rotating, as in the other benchmarks. The issue's budgets are
absolute (under 1 s for `--help`, 1.5 s for `config show`); the notes say whether the medians hold them.

    python benchmarks/cli_start.py [--rounds 10] [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys

from common import Run, add_output_arguments, alternate, comparison, finish

PYTHON = "python -c pass"
SIDES = {
    PYTHON: ["-c", "pass"],
    "loralab --help": ["-m", "loralab", "--help"],
    "loralab config show": ["-m", "loralab", "config", "show"],
}
BUDGETS_S = {"loralab --help": 1.0, "loralab config show": 1.5}


def children_cpu() -> float:
    """User + system CPU seconds of the finished child processes so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def side(arguments: list[str], env: dict[str, str]) -> Run:
    """A side that starts `python *arguments` once per step; per step its CPU seconds."""

    def run(steps: int) -> list[float]:
        times = []
        for _ in range(steps):
            before = children_cpu()
            subprocess.run([sys.executable, *arguments], env=env, check=True, stdout=subprocess.DEVNULL)
            times.append(children_cpu() - before)
        return times

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10, help="starts per side (default 10)")
    add_output_arguments(parser)
    args = parser.parse_args()
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    times = alternate({name: side(arguments, env) for name, arguments in SIDES.items()}, 1, args.rounds, 1)
    setup = f"one fresh `{sys.executable}` per start, CPU time (user + system); {args.rounds} rounds"
    notes = [
        f"{name}: median {statistics.median(times[name]):.2f} s CPU, budget {budget:g} s: "
        + ("holds" if statistics.median(times[name]) < budget else "EXCEEDED")
        for name, budget in BUDGETS_S.items()
    ]
    finish(args, setup, [comparison("CLI start", "ms CPU", times, PYTHON)], notes)


if __name__ == "__main__":
    main()
