"""GRIT's step time against plain LoRA on the same model and batches, and where GRIT's extra time goes.

Three sides on loralab's own loop, each from the same seed with the GRIT preset's adapter (PEFT LoRA r 16,
alpha 32, dropout 0.05 on every linear layer) and AdamW: no rule, GRIT at the default frequencies with its
default adaptive schedule (periods move with the loss), and GRIT with fixed periods (`adaptive: false`). GRIT's
work is periodic (Σ_a, Σ_g every 15th backward, inverses and reprojection every 50 steps), so the table compares
mean step times over a multiple of 150 timed steps per side (rounds × steps), which holds whole periods of the
fixed schedule. Blocks alternate between the sides so drift hits all equally: shorter blocks and more rounds
follow a drifting machine more closely.

Then each part of GRIT is timed on its own, on the same batch with the adaptive side's model and rule as
training left them: the covariance hooks (a forward+backward under `stats.recording` minus a plain one), the
regularizer's own forward and backward (a difference of two whole backwards would drown it in noise), the
preconditioning (`before_step`), the inversion and the reprojection; per call and amortized over the default
periods.

    python benchmarks/grit.py [--model minilm] [--batch 16] [--length 128] [--steps 150] [--rounds 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from common import (
    Run,
    Target,
    add_output_arguments,
    alternate,
    comparison,
    finish,
    loop_side,
    print_markdown,
    synthetic_features,
)
from loralab.adapters import build_adapter
from loralab.config import RunConfig, load_config
from loralab.data.collate import collate
from loralab.gradient import build_rule
from loralab.gradient.grit import Grit
from loralab.models import load_model
from loralab.training.loop import model_loss

LORA, ADAPTIVE, FIXED = "LoRA", "GRIT adaptive", "GRIT fixed"
SIDES = {LORA: ["method.gradient.kind=none"], ADAPTIVE: [], FIXED: ["method.gradient.adaptive=false"]}
HEADS = {"minilm": "seq_cls", "tiny-llama": "causal_lm"}


def num_labels(head: str) -> int | None:
    """Two classes for the classifier; none for the causal LM, whose labels are the ids."""
    return 2 if head == "seq_cls" else None


def note_steps(rule: Grit, method: str, steps: list[int]) -> None:
    """Make `rule.<method>(..., step)` note the step it runs at: the adaptive schedule moves with the loss."""
    original = getattr(rule, method)

    def noted(*args: Any) -> Any:
        steps.append(args[-1])
        return original(*args)

    setattr(rule, method, noted)


class Side:
    """One side: the model, its adapter and rule on loralab's loop, from the same seed as the others."""

    def __init__(self, config: RunConfig, head: str, features: list[dict], pad_id: int, device: str) -> None:
        torch.manual_seed(0)
        model, _ = load_model(config.model, head, num_labels(head))
        adapter = build_adapter(config.method.adapter, head)
        self.model = adapter.apply(model).to(device)  # on its device before the rule keeps Σ beside A
        self.rule = build_rule(config.method.gradient)
        self.rule.attach(self.model, adapter.lora_modules(self.model))
        self.calls: dict[str, list[int]] = {"invert": [], "reproject": []}
        if isinstance(self.rule, Grit):
            for method, steps in self.calls.items():
                note_steps(self.rule, method, steps)
        self.run: Run = loop_side(self.model, self.rule, config.train, features, pad_id, cpu=device == "cpu")

    def schedule(self, warmup: int) -> str:
        """The inversions and reprojections that fell in the timed steps (after the warm-up)."""
        timed = {method: [s for s in steps if s > warmup] for method, steps in self.calls.items()}
        return f"inverted at steps {timed['invert']}, reprojected at steps {timed['reproject']}"


def timed(call: Callable[[], object], device: torch.device) -> float:
    """Seconds `call` takes, the GPU's queue drained on both sides."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def medians(calls: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds of each call over `repeats` interleaved rounds, after one untimed round."""
    for call in calls.values():
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            times[name].append(timed(call, device))
    return {name: statistics.median(values) for name, values in times.items()}


def part_costs(model: nn.Module, rule: Grit, batch: dict, repeats: int) -> dict[str, tuple[float, float]]:
    """Seconds per call and calls per step (at the default periods) of each part of GRIT's extra work."""
    o, step, device = rule.options, rule.steps_done, batch["input_ids"].device

    def backward(record: bool = False) -> None:
        model.zero_grad(set_to_none=True)  # first, so that `before_step` finds fresh gradients
        with rule.stats.recording(batch["attention_mask"]) if record else nullcontext():
            model_loss(model, batch).backward()

    def regularize() -> None:
        extra = rule.regularizer()
        if extra is not None:
            extra.backward()

    hooks = medians(
        {"record": lambda: backward(record=True), "plain": backward, "precondition": lambda: rule.before_step(step)},
        repeats,
        device,
    )
    # a recording or reprojection makes the regularizer rebuild its weights once: time it apart from both
    regularizer = medians({"regularizer": regularize}, repeats, device)["regularizer"]
    periodic = medians(
        {"invert": lambda: rule.invert(o.kfac_damping, step), "reproject": lambda: rule.reproject(step)},
        repeats,
        device,
    )
    return {
        "covariance hooks": (hooks["record"] - hooks["plain"], 1 / o.cov_update_freq),
        "regularizer": (regularizer, 1.0),
        "precondition (before_step)": (hooks["precondition"], 1.0),
        "inversion": (periodic["invert"], 1 / o.kfac_update_freq),
        "reprojection": (periodic["reproject"], 1 / o.reprojection_freq),
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm", choices=sorted(HEADS), help="minilm (pretrained, bundled)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=150, help="steps per block")
    parser.add_argument("--rounds", type=int, default=3, help="blocks per side (rounds × steps: a multiple of 150)")
    parser.add_argument("--warmup", type=int, default=50, help="untimed steps per side (50: inverses exist)")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per part of GRIT")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    add_output_arguments(parser)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    head = HEADS[args.model]
    common = [f"model.name={args.model}", "method.name=grit", f"train.batch_size={args.batch}", "train.warmup_ratio=0"]
    configs = {name: load_config([], common + extra) for name, extra in SIDES.items()}
    probe, tokenizer = load_model(configs[LORA].model, head, num_labels(head))
    features = synthetic_features(args.batch * 16, args.length, probe.config.vocab_size, num_labels(head))
    sides = {
        name: Side(config, head, features, tokenizer.pad_token_id, args.device) for name, config in configs.items()
    }
    times = alternate({name: side.run for name, side in sides.items()}, args.warmup, args.rounds, args.steps)

    adapter, options = configs[LORA].method.adapter, configs[FIXED].method.gradient
    setup = (
        f"{args.model} ({head}) on {args.device}, batch {args.batch} x {args.length} tokens, LoRA r {adapter.r} "
        f"alpha {adapter.alpha} on {adapter.target_modules}, AdamW; {args.rounds} x {args.steps} steps per side "
        f"after {args.warmup} warm-up, torch {torch.__version__}, {torch.get_num_threads()} threads. GRIT at the "
        f"default frequencies (Σ every {options.cov_update_freq} backwards, inverses every {options.kfac_update_freq}"
        f" and reprojection every {options.reprojection_freq} steps); '{ADAPTIVE}' keeps the default adaptive "
        f"schedule, '{FIXED}' sets adaptive: false. Mean over every timed step, periodic work included."
    )
    targets = {ADAPTIVE: Target("<=", 1.15), FIXED: Target("<=", 1.15)}
    step = comparison("GRIT vs a LoRA step, whole periods", "ms", times, LORA, targets, statistic="mean")
    finish(args, setup, [step], [f"{name}: {sides[name].schedule(args.warmup)}" for name in (ADAPTIVE, FIXED)])
    base = statistics.fmean(times[LORA])

    grit = sides[ADAPTIVE]
    batch = {k: v.to(args.device) for k, v in collate(features[: args.batch], tokenizer.pad_token_id).items()}
    parts = part_costs(grit.model, grit.rule, batch, args.repeats)
    print(f"\nGRIT's parts on their own, median of {args.repeats} calls each, amortized at the default periods:")
    rows = [
        [name, f"{cost * 1e3:.3f}", f"{rate:.3f}", f"{cost * rate * 1e3:.3f}", f"{cost * rate / base:.3f}"]
        for name, (cost, rate) in parts.items()
    ]
    total = sum(cost * rate for cost, rate in parts.values())
    rows.append(["sum", "", "", f"{total * 1e3:.3f}", f"{total / base:.3f}"])
    print_markdown(["part", "ms per call", "calls per step", "ms per step", f"per step / {LORA} step"], rows)
    extra = {name: (statistics.fmean(times[name]) - base) * 1e3 for name in (ADAPTIVE, FIXED)}
    print("measured in the loop, mean minus LoRA's mean: " + ", ".join(f"{n} {v:.3f} ms" for n, v in extra.items()))


if __name__ == "__main__":
    main()
