"""What the benchmark scripts share: synthetic features, a side on loralab's loop, alternating blocks, comparisons
(their tables and `--json` files for `run_all.py`) and peak memory measured in a fresh process per side."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import gc
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

from loralab.config.schema import TrainConfig
from loralab.gradient.base import GradientRule
from loralab.training.loop import BatchOrder, TrainState, optimizer_steps, prepare_for_loop
from loralab.training.optim import build_optimizer, build_scheduler
from tables import print_markdown

Run = Callable[[int], list[float]]


def synthetic_features(count: int, length: int, vocab: int, num_labels: int | None = None) -> list[dict]:
    """Seeded random token rows (ids ≥ 5, clear of special tokens) with full attention.

    Labels are the ids themselves (causal LM) or, given `num_labels`, one seeded class per row.
    """
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (count, length), generator=generator).tolist()
    labels = ids if num_labels is None else torch.randint(0, num_labels, (count,), generator=generator).tolist()
    return [{"input_ids": row, "attention_mask": [1] * length, "labels": y} for row, y in zip(ids, labels, strict=True)]


def loop_side(
    model: nn.Module, rule: GradientRule, cfg: TrainConfig, features: list[dict], pad_id: int, cpu: bool = False
) -> Run:
    """loralab's own loop (`training.loop.optimizer_steps`, each step's train metrics read as the recipe logs them)
    on `model` with `rule`, advanced `steps` at a time (on the CPU even where there is a GPU when `cpu`); the wall
    time between consecutive steps: everything the loop does counts."""
    accelerator = Accelerator(mixed_precision="no", cpu=cpu)
    optimizer = build_optimizer(model, cfg)
    model, optimizer = prepare_for_loop(accelerator, model, optimizer)
    rule.bind_optimizer(optimizer)
    scheduler = build_scheduler(optimizer, cfg, 10**6)
    order = BatchOrder(len(features), cfg.batch_size, 0)
    state = TrainState()

    def run(steps: int) -> list[float]:
        times, last = [], time.perf_counter()
        for step in optimizer_steps(
            model, features, rule, cfg, accelerator, optimizer, scheduler, state, order, pad_id, state.step + steps
        ):
            step.train_metrics(scheduler.get_last_lr()[0], state.epoch)
            now = time.perf_counter()
            times.append(now - last)
            last = now
        return times

    return run


def alternate(runs: dict[str, Run], warmup: int, rounds: int, steps: int) -> dict[str, list[float]]:
    """Warm every side up, then `rounds` blocks of `steps` steps per side in turn, so drift hits all equally.

    Each round starts one side later than the one before: a side's place in the round (measured to cost up to
    15 % here) then falls on every side equally when `rounds` is a multiple of the number of sides.
    """
    for run in runs.values():
        run(warmup)
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for round_ in range(rounds):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            times[name] += runs[name](steps)
    return times


@dataclass(frozen=True)
class Target:
    """What a side's ratio to its comparison's reference must be: at most `bound`, at least, or within ±`bound` of 1."""

    op: str  # "<=", ">=" or "±"
    bound: float

    def holds(self, ratio: float) -> bool:
        """Whether a measured ratio meets the target."""
        if self.op == "<=":
            return ratio <= self.bound
        if self.op == ">=":
            return ratio >= self.bound
        return abs(ratio - 1) <= self.bound

    def __str__(self) -> str:
        return {"<=": f"≤ {self.bound:g}", ">=": f"≥ {self.bound:g}", "±": f"1 ± {self.bound:g}"}[self.op]


STATISTICS: dict[str, Callable[[list[float]], float]] = {"median": statistics.median, "mean": statistics.fmean}
COLUMNS = ["side", "median", "mean", "min", "max", "n", "ratio", "target", "pass"]


def comparison(
    name: str,
    metric: str,
    samples: dict[str, list[float]],
    reference: str,
    targets: dict[str, Target] | None = None,
    statistic: str = "median",
    scale: float = 1e3,
) -> dict:
    """One comparison as `run_all.py` reads it: per side the median, mean, min and max of its samples times `scale`
    (seconds to ms by default), their count, the ratio of its `statistic` to the reference side's, its target."""
    of = STATISTICS[statistic]
    base = of(samples[reference])
    rows = []
    for side, values in samples.items():
        ratio, target = of(values) / base, (targets or {}).get(side)
        rows.append(
            {
                "side": side,
                "median": scale * statistics.median(values),
                "mean": scale * statistics.fmean(values),
                "min": scale * min(values),
                "max": scale * max(values),
                "n": len(values),
                "ratio": ratio,
                "target": None if target is None else dataclasses.asdict(target),
                "pass": None if target is None else target.holds(ratio),
            }
        )
    return {"name": name, "metric": metric, "reference": reference, "statistic": statistic, "rows": rows}


def comparison_rows(item: dict) -> list[list[str]]:
    """A comparison's table rows, one per side, under `COLUMNS`."""
    rows = []
    for row in item["rows"]:
        target = "" if row["target"] is None else str(Target(**row["target"]))
        verdict = "" if row["pass"] is None else ("pass" if row["pass"] else "FAIL")
        values = (f"{row[key]:.{3 if row[key] < 100 else 1}f}" for key in ("median", "mean", "min", "max"))
        rows.append([row["side"], *values, str(row["n"]), f"{row['ratio']:.3f}", target, verdict])
    return rows


def print_comparison(item: dict) -> None:
    """A comparison as a markdown table headed by its name."""
    print(f"\n{item['name']} ({item['metric']}; ratio of {item['statistic']}s to {item['reference']})")
    print_markdown(COLUMNS, comparison_rows(item))


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """`--json PATH`: where the script writes its comparisons for `run_all.py`."""
    parser.add_argument("--json", type=Path, help="write the setup and comparisons to this JSON file")


def finish(args: argparse.Namespace, setup: str, comparisons: list[dict], notes: list[str] = ()) -> None:
    """Print the setup line and every comparison; write them to `args.json` when given."""
    print(setup)
    for item in comparisons:
        print_comparison(item)
    for note in notes:
        print(note)
    if args.json is not None:
        payload = {"setup": setup, "comparisons": comparisons, "notes": list(notes)}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")


# ---- peak memory, one fresh process per side ------------------------------------------------------------------


def add_memory_arguments(parser: argparse.ArgumentParser) -> None:
    """`--memory-side NAME` (internal: build and train only that side, write its peak memory to `--json`)."""
    parser.add_argument("--memory-side", help=argparse.SUPPRESS)
    parser.add_argument("--memory-steps", type=int, default=5, help="steps each side's memory process trains")


def resident_mb(field: str) -> float:
    """This process's current (VmRSS) or peak (VmHWM) resident memory in MiB, from /proc (Linux)."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", status).group(1)) / 1024


def settle() -> None:
    """Free what is garbage and hand glibc's free heap back to the OS, so RSS counts only live memory."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def side_peak_mb(build: Callable[[], Run], warmup: int, steps: int) -> float:
    """Peak memory a side adds to the process (its model, optimizer state, gradients, activations) while it trains.

    On CUDA: peak allocated tensor bytes over those allocated before the side was built. On CPU: peak resident
    memory (VmHWM, reset once the side is built, so loading transients do not count) over the RSS before it was
    built; torch's CPU allocator returns freed tensors to malloc, so this counts what the side holds at its peak.
    """
    cuda = torch.cuda.is_available()
    settle()
    before = torch.cuda.memory_allocated() if cuda else resident_mb("VmRSS")
    run = build()
    settle()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    run(warmup)
    run(steps)
    if cuda:
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    return resident_mb("VmHWM") - before


def write_side_memory(args: argparse.Namespace, build: Callable[[], Run], warmup: int) -> None:
    """The `--memory-side` process: train only that side and write its peak memory to `args.json`."""
    peak = side_peak_mb(build, warmup, args.memory_steps)
    args.json.write_text(json.dumps({"side": args.memory_side, "peak_mb": peak}) + "\n")


def memory_by_side(script: str, sides: list[str]) -> dict[str, list[float]]:
    """Each side's peak memory (MiB), measured in a fresh process of `script` (this run's arguments) per side."""
    peaks = {}
    with tempfile.TemporaryDirectory() as directory:
        out = Path(directory) / "memory.json"
        for side in sides:
            command = [sys.executable, script, *sys.argv[1:], "--memory-side", side, "--json", str(out)]  # last wins
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            peaks[side] = [json.loads(out.read_text())["peak_mb"]]
    return peaks


def steps_and_memory(
    args: argparse.Namespace, builders: dict[str, Callable[[], Run]], script: str
) -> tuple[dict[str, list[float]], dict[str, list[float]]] | None:
    """Every side's step times side by side in this process, then each side's peak memory in a fresh process of
    `script`; in such a `--memory-side` process, that side's peak memory written to `--json` and None."""
    if args.memory_side:
        write_side_memory(args, builders[args.memory_side], args.warmup)
        return None
    times = alternate({name: build() for name, build in builders.items()}, args.warmup, args.rounds, args.steps)
    return times, memory_by_side(script, list(builders))


MEMORY_NOTE = (
    "peak memory: each side alone in a fresh process after the same set-up; CUDA: peak allocated tensor bytes, "
    "CPU: peak RSS (VmHWM, reset after the side is built) over the RSS before it was built"
)
