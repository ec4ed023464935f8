"""Run every benchmark, each in its own process, and print one table of what they measured against the targets.

Each script measures its sides side by side in its one process (blocks alternating, the order rotating) and
writes its comparisons with `--json`; this collects them into one markdown table: per side the median, mean, min
and max (ms, MiB or tok/s), the count, the ratio to the comparison's reference and, where there is one, the
target and whether it holds. `--quick` takes fewer steps and smaller shapes where a target stays meaningful
(about 10 minutes on 2 CPU cores); without it the scripts run at the shapes the README's figures came from.

    python benchmarks/run_all.py [--quick] [--out FILE] [--only train_step grit ...] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from common import COLUMNS, comparison_rows
from tables import markdown_table

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Benchmark:
    """A script and its arguments for a full run and for `--quick`."""

    script: str
    full: tuple[str, ...]
    quick: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.script.removesuffix(".py")


SUITE = (
    Benchmark("cli_start.py", ("--rounds", "20"), ("--rounds", "10")),
    Benchmark("train_step.py", ("--rounds", "6"), ("--steps", "10", "--rounds", "6", "--memory-steps", "3")),
    Benchmark(
        "finetune.py",
        (),
        ("--batch", "8", "--length", "64", "--steps", "3", "--rounds", "4", "--memory-steps", "2"),
    ),
    Benchmark("inference.py", ("--rounds", "120"), ("--batch", "8", "--length", "64", "--rounds", "90")),
    Benchmark(
        "votes.py",
        ("--rounds", "6", "--steps", "4", "--warmup", "2"),
        ("--batch", "16", "--spv", "4", "--rounds", "6", "--steps", "2", "--warmup", "2"),
    ),
    Benchmark(
        "grit.py",
        ("--model", "tiny-llama", "--steps", "50", "--rounds", "18"),
        ("--model", "tiny-llama", "--steps", "50", "--rounds", "9"),
    ),
    Benchmark("packing.py", (), ("--quick",)),
    Benchmark("lowrank.py", ("--rounds", "10"), ("--shape", "1024", "2752", "64", "--rounds", "10", "--modules", "16")),
    Benchmark(
        "diffusion.py",
        ("--rounds", "2", "--steps", "5", "--warmup", "1", "--repeats", "3"),
        ("--methods", "weight_lora", "lora_diffusion", "--batch", "4", "--rounds", "2", "--steps", "5"),
    ),
)


def machine() -> str:
    """One line: processor, cores, memory, accelerator, torch and its threads, Python."""
    cpu = platform.processor() or platform.machine()
    info = Path("/proc/cpuinfo")
    if info.is_file():
        names = [
            line.split(":", 1)[1].strip() for line in info.read_text().splitlines() if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB, {gpu}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; Python {platform.python_version()}"
    )


def run(benchmark: Benchmark, quick: bool, directory: Path, env: dict[str, str]) -> dict | None:
    """Run one script in its own process, its output passing through; its JSON, or None if it failed."""
    out = directory / f"{benchmark.name}.json"
    arguments = benchmark.quick if quick else benchmark.full
    command = [sys.executable, str(HERE / benchmark.script), *arguments, "--json", str(out)]
    print(f"\n== {' '.join(['python', f'benchmarks/{benchmark.script}', *arguments])}", flush=True)
    started = time.perf_counter()
    finished = subprocess.run(command, env=env, check=False)
    print(
        f"== {benchmark.script}: {time.perf_counter() - started:.0f} s, exit status {finished.returncode}", flush=True
    )
    return json.loads(out.read_text()) if finished.returncode == 0 else None


def report(command: str, results: dict[str, dict | None], seconds: float) -> str:
    """The suite's markdown: machine, command, the one table, which targets hold, and each script's setup."""
    rows, checked, held = [], 0, 0
    for result in results.values():
        for item in [] if result is None else result["comparisons"]:
            for row, cells in zip(item["rows"], comparison_rows(item), strict=True):
                rows.append([item["name"], item["metric"], *cells])
                checked, held = checked + (row["pass"] is not None), held + bool(row["pass"])
    failed = [name for name, result in results.items() if result is None]
    lines = [
        f"machine: {machine()}",
        f"command: {command} ({seconds / 60:.1f} minutes)",
        "",
        markdown_table(["comparison", "unit", *COLUMNS], rows, text_columns=3),
        "",
        f"targets: {held} of {checked} hold" + (f"; failed to run: {', '.join(failed)}" if failed else ""),
        "",
        *(f"- {name}: {result['setup']}" for name, result in results.items() if result is not None),
    ]
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and smaller shapes (~10 min, 2 cores)")
    parser.add_argument("--out", type=Path, help="also write the report (markdown) to this file")
    parser.add_argument("--only", nargs="+", choices=[b.name for b in SUITE], help="run only these scripts")
    parser.add_argument("--threads", type=int, help="torch threads in every script (OMP_NUM_THREADS)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.threads is not None:
        env |= {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
        torch.set_num_threads(args.threads)
    suite = [b for b in SUITE if args.only is None or b.name in args.only]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as directory:
        results = {b.name: run(b, args.quick, Path(directory), env) for b in suite}
    text = report(" ".join(["python", "benchmarks/run_all.py", *sys.argv[1:]]), results, time.perf_counter() - started)
    print("\n" + text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    sys.exit(1 if None in results.values() else 0)


if __name__ == "__main__":
    main()
