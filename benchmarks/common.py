"""What the benchmark scripts share: synthetic features, a side on loralab's loop, alternating blocks, the table."""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable

import torch
from accelerate import Accelerator
from torch import nn

from loralab.config.schema import TrainConfig
from loralab.gradient.base import GradientRule
from loralab.training.loop import BatchOrder, TrainState, train
from loralab.training.optim import build_optimizer, build_scheduler

Run = Callable[[int], list[float]]


def synthetic_features(count: int, length: int, vocab: int, num_labels: int | None = None) -> list[dict]:
    """Seeded random token rows (ids ≥ 5, clear of special tokens) with full attention.

    Labels are the ids themselves (causal LM) or, given `num_labels`, one seeded class per row.
    """
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (count, length), generator=generator).tolist()
    labels = ids if num_labels is None else torch.randint(0, num_labels, (count,), generator=generator).tolist()
    return [{"input_ids": row, "attention_mask": [1] * length, "labels": y} for row, y in zip(ids, labels, strict=True)]


class StepTimes:
    """LoopEvents that record the wall time between consecutive steps: everything the loop does counts."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.last = time.perf_counter()

    def start(self) -> None:
        self.times, self.last = [], time.perf_counter()

    def log(self, step: int, split: str, metrics: dict[str, float]) -> None:
        return None

    def after_step(self, state: TrainState, epoch_ended: bool, last: bool) -> None:
        now = time.perf_counter()
        self.times.append(now - self.last)
        self.last = now


def loop_side(
    model: nn.Module, rule: GradientRule, cfg: TrainConfig, features: list[dict], pad_id: int, cpu: bool = False
) -> Run:
    """loralab's own loop (`training.loop.train`) on `model` with `rule`, advanced `steps` at a time (on the
    CPU even where there is a GPU when `cpu`)."""
    accelerator = Accelerator(mixed_precision="no", cpu=cpu)
    optimizer = build_optimizer(model, cfg)
    model, optimizer = accelerator.prepare(model, optimizer)
    rule.bind_optimizer(optimizer)
    scheduler = build_scheduler(optimizer, cfg, 10**6)
    order = BatchOrder(len(features), cfg.batch_size, 0)
    state, events = TrainState(), StepTimes()

    def run(steps: int) -> list[float]:
        nonlocal state
        events.start()
        budget = dataclasses.replace(cfg, max_steps=state.step + steps)
        state = train(
            model, features, rule, budget, accelerator, optimizer, scheduler, state, order, pad_id, events, log_every=1
        )
        return list(events.times)

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


def table_row(name: str, values: list[float], base: float) -> list[str]:
    median = statistics.median(values)
    return [name, *(f"{v * 1e3:.2f}" for v in (median, min(values), max(values))), f"{median / base:.3f}"]


def print_table(times: dict[str, list[float]], reference: str) -> None:
    """Markdown table of median, min and max step time per side and the ratio of medians to `reference`."""
    base = statistics.median(times[reference])
    header = ["side", "median ms", "min ms", "max ms", f"ratio to {reference}"]
    print_markdown(header, [table_row(name, values, base) for name, values in times.items()])


def print_markdown(header: list[str], rows: list[list[str]]) -> None:
    """A markdown table: the first column left-aligned, the others right-aligned."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
    print("| " + " | ".join("-" * w for w in widths) + " |")
    for row in rows:
        cells = [row[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True))]
        print("| " + " | ".join(cells) + " |")
