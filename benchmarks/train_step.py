"""loralab's training step vs a minimal hand-written PEFT loop and `transformers.Trainer` + PEFT, side by side.

Same tiny Llama, batch, LoRA config, AdamW (torch's, no weight decay), linear schedule without warmup over 10⁶
steps, and gradient clipping at 1.0. Every side collates its batch from the same tokenised features with
loralab's `collate`. Blocks of steps alternate between the sides in one process so drift hits all equally; the
tables report the median, min and max step time of each and the ratio of medians. Each step is timed from the
end of the previous one, so everything a side does between steps counts.

The Trainer side runs `Trainer.train()` in a thread that a `TrainerCallback` pauses after each block; its step
time is the wall time between consecutive `on_step_end` calls. Its arguments are `TRAINER_ARGUMENTS` (no
logging, saving, evaluation, tqdm, reporting or dataloader workers; `optim="adamw_torch"`, the optimizer the
other sides use, rather than the fused default), everything else at the transformers defaults.

Then each side's peak memory, each alone in a fresh process (see `common.side_peak_mb`).

`--compile` adds loralab's loop with `train.compile=true` (torch.compile of the model; it compiles during the
warm-up steps) and a table of its step time beside the eager loop's.

    python benchmarks/train_step.py [--steps 30] [--rounds 3] [--batch 16] [--length 128] [--compile] [--json PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import threading
import time
from collections.abc import Callable
from functools import partial

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import (
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
    get_scheduler,
)

from common import (
    MEMORY_NOTE,
    Run,
    Target,
    add_memory_arguments,
    add_output_arguments,
    comparison,
    finish,
    loop_side,
    steps_and_memory,
    synthetic_features,
)
from loralab.adapters import build_adapter
from loralab.config import RunConfig, load_config
from loralab.data.collate import collate
from loralab.gradient import NoRule
from loralab.models import load_model
from loralab.training.loop import BatchOrder

HAND, TRAINER, LORALAB = "hand-written PEFT loop", "HF Trainer + PEFT", "loralab loop"
COMPILED = "loralab loop, compiled"
SCHEDULE_STEPS = 10**6
TRAINER_ARGUMENTS = {
    "report_to": [],
    "save_strategy": "no",
    "eval_strategy": "no",
    "logging_strategy": "no",
    "dataloader_num_workers": 0,
    "disable_tqdm": True,
    "remove_unused_columns": False,
    "optim": "adamw_torch",
}


def device() -> torch.device:
    """Where the hand-written and Trainer sides train (loralab's loop picks the same through accelerate)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def peft_model(config: RunConfig) -> nn.Module:
    """The tiny Llama with PEFT LoRA on q and v, as a researcher would write it."""
    model, _ = load_model(config.model, "causal_lm")
    o = config.method.adapter
    lora = LoraConfig(
        task_type="CAUSAL_LM", r=o.r, lora_alpha=o.alpha, lora_dropout=o.dropout, target_modules=["q_proj", "v_proj"]
    )
    return get_peft_model(model, lora).to(device())


def loralab_side(config: RunConfig, features: list[dict], pad_id: int) -> Run:
    """loralab's own loop (`training.loop.optimizer_steps`) with the `none` rule, advanced `steps` at a time."""
    model, _ = load_model(config.model, "causal_lm")
    model = build_adapter(config.method.adapter, "causal_lm").apply(model)
    return loop_side(model, NoRule(), config.train, features, pad_id)


def compiled_side(config: RunConfig, features: list[dict], pad_id: int) -> Run:
    """loralab's loop with `train.compile=true`: the same side, its forwards through torch.compile."""
    return loralab_side(
        dataclasses.replace(config, train=dataclasses.replace(config.train, compile=True)), features, pad_id
    )


def hand_written_side(config: RunConfig, features: list[dict], pad_id: int) -> Run:
    """The loop a researcher writes by hand: PEFT model, AdamW, forward, backward, clip, step."""
    model = peft_model(config)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.train.lr, weight_decay=config.train.weight_decay)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=SCHEDULE_STEPS)
    order = BatchOrder(len(features), config.train.batch_size, 0)
    position, last = 0, time.perf_counter()
    model.train()

    def run(steps: int) -> list[float]:
        nonlocal position, last
        times, last = [], time.perf_counter()
        for _ in range(steps):
            indices = order.batch(position // order.steps_per_epoch, position % order.steps_per_epoch)
            batch = {k: v.to(device()) for k, v in collate([features[i] for i in indices], pad_id).items()}
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, config.train.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss.item()
            now = time.perf_counter()
            times.append(now - last)
            last, position = now, position + 1
        return times

    return run


class Blocks(TrainerCallback):
    """Pauses a Trainer running in another thread after each block of steps; records the wall time between
    consecutive `on_step_end` calls (the first of a block from the moment the block was asked for)."""

    def __init__(self, train: Callable[[], object]) -> None:
        self.train, self.thread = train, threading.Thread(target=self.trainer_thread, daemon=True)
        self.go, self.done = threading.Event(), threading.Event()
        self.times: list[float] = []
        self.steps, self.last, self.error = 0, 0.0, None

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        """Note the step's time; after a block's last step, hand over to `run` and wait for the next block."""
        now = time.perf_counter()
        self.times.append(now - self.last)
        self.last = now
        if len(self.times) == self.steps:
            self.done.set()
            self.go.wait()
            self.go.clear()

    def trainer_thread(self) -> None:
        """Train until the process ends; an error ends the block in progress and is raised by `run`."""
        try:
            self.train()
        except BaseException as error:  # handed to the main thread
            self.error = error
        finally:
            self.done.set()

    def run(self, steps: int) -> list[float]:
        """Let the Trainer take `steps` more steps; their times."""
        self.times, self.steps, self.last = [], steps, time.perf_counter()
        if self.thread.is_alive():
            self.go.set()
        else:
            self.thread.start()
        self.done.wait()
        self.done.clear()
        if self.error is not None:
            raise RuntimeError("the Trainer side failed") from self.error
        return list(self.times)


def trainer_arguments(kind: type[TrainingArguments], config: RunConfig, **extra) -> TrainingArguments:
    """The Trainer sides' arguments: the loop's batch, AdamW, schedule and clipping; no logging or saving."""
    cfg = config.train
    return kind(
        output_dir=tempfile.mkdtemp(prefix="trainer-side-"),
        per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.lr,
        weight_decay=cfg.weight_decay,
        lr_scheduler_type="linear",
        warmup_steps=0,
        max_steps=SCHEDULE_STEPS,
        max_grad_norm=cfg.max_grad_norm,
        seed=0,
        use_cpu=device().type == "cpu",
        **TRAINER_ARGUMENTS,
        **extra,
    )


def trainer_side(config: RunConfig, features: list[dict], pad_id: int) -> Run:
    """`transformers.Trainer` on the same PEFT model, batch, AdamW, schedule and clipping."""
    trainer = Trainer(
        model=peft_model(config),
        args=trainer_arguments(TrainingArguments, config),
        train_dataset=features,
        data_collator=partial(collate, pad_token_id=pad_id),
    )
    blocks = Blocks(trainer.train)
    trainer.add_callback(blocks)
    return blocks.run


SIDES = {HAND: hand_written_side, TRAINER: trainer_side, LORALAB: loralab_side}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="steps per block")
    parser.add_argument("--rounds", type=int, default=3, help="alternating blocks per side (a multiple of 3)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--compile", action="store_true", help="add loralab's loop with train.compile=true")
    add_output_arguments(parser)
    add_memory_arguments(parser)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    config = load_config(
        [],
        [
            "model.name=tiny-llama",
            f"train.batch_size={args.batch}",
            "method.adapter.dropout=0",
            "method.adapter.target_modules=[q_proj, v_proj]",
            "train.warmup_ratio=0",
        ],
    )
    probe, tokenizer = load_model(config.model, "causal_lm")
    features = synthetic_features(args.batch * 64, args.length, probe.config.vocab_size)
    sides = SIDES | ({COMPILED: compiled_side} if args.compile else {})
    builders = {name: partial(side, config, features, tokenizer.pad_token_id) for name, side in sides.items()}
    measured = steps_and_memory(args, builders, __file__)
    if measured is None:
        return
    times, memory = measured
    setup = (
        f"tiny-llama on {device().type}, batch {args.batch} x {args.length} tokens, LoRA r {config.method.adapter.r} "
        f"on q,v, AdamW, {args.rounds} x {args.steps} steps per side after {args.warmup} warm-up, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads"
    )
    comparisons = [
        comparison("training step vs the hand-written loop", "ms", times, HAND, {LORALAB: Target("<=", 1.05)}),
        comparison("training step vs HF Trainer", "ms", times, TRAINER, {LORALAB: Target("<=", 1.0)}),
        comparison(f"training peak memory ({args.memory_steps} steps)", "MiB", memory, HAND, scale=1),
    ]
    if args.compile:
        eager_and_compiled = {side: times[side] for side in (LORALAB, COMPILED)}
        comparisons.append(comparison("compiled vs eager loralab step", "ms", eager_and_compiled, LORALAB))
    finish(args, setup, comparisons, [MEMORY_NOTE])


if __name__ == "__main__":
    main()
