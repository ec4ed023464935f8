"""loralab's training step vs a minimal hand-written PEFT loop, side by side in one process.

Same tiny Llama, batch, LoRA config, AdamW and schedule. Both sides collate their batch from the same
tokenised features each step. Blocks of steps alternate between the two sides so drift hits both equally;
the table reports the median, min and max step time of each and the ratio of medians.

    python benchmarks/train_step.py [--steps 30] [--rounds 3] [--batch 16] [--length 128]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch
from accelerate import Accelerator
from peft import LoraConfig, get_peft_model
from transformers import get_scheduler

from loralab.adapters import build_adapter
from loralab.config import load_config
from loralab.data.collate import collate
from loralab.gradient import NoRule
from loralab.models import load_model
from loralab.training.loop import BatchOrder, TrainState, train
from loralab.training.optim import build_optimizer, build_scheduler


def synthetic_features(count: int, length: int, vocab: int) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (count, length), generator=generator).tolist()
    return [{"input_ids": row, "attention_mask": [1] * length, "labels": row} for row in ids]


class StepTimes:
    """LoopEvents that record the wall time between consecutive steps: everything the loop does counts."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.last = time.perf_counter()

    def start(self) -> None:
        self.times, self.last = [], time.perf_counter()

    def log(self, step: int, split: str, metrics: dict[str, float]) -> None:
        return None

    def after_step(self, state, epoch_ended: bool, last: bool) -> None:
        now = time.perf_counter()
        self.times.append(now - self.last)
        self.last = now


def loralab_side(config, features, pad_id):
    """loralab's own loop (`training.loop.train`) with the `none` rule, advanced `steps` at a time."""
    model, _ = load_model(config.model, "causal_lm")
    adapter = build_adapter(config.method.adapter, "causal_lm")
    model = adapter.apply(model)
    rule = NoRule()
    accelerator = Accelerator(mixed_precision="no")
    optimizer = build_optimizer(model, config.train)
    model, optimizer = accelerator.prepare(model, optimizer)
    scheduler = build_scheduler(optimizer, config.train, 10**6)
    order = BatchOrder(len(features), config.train.batch_size, 0)
    state = TrainState()
    events = StepTimes()

    def run(steps: int) -> list[float]:
        nonlocal state
        events.start()
        budget = dataclasses.replace(config.train, max_steps=state.step + steps)
        state = train(
            model, features, rule, budget, accelerator, optimizer, scheduler, state, order, pad_id, events, log_every=1
        )
        return list(events.times)

    return run


def hand_written_side(config, features, pad_id):
    """The loop a researcher writes by hand: PEFT model, AdamW, forward, backward, clip, step."""
    model, _ = load_model(config.model, "causal_lm")
    o = config.method.adapter
    model = get_peft_model(
        model,
        LoraConfig(
            task_type="CAUSAL_LM",
            r=o.r,
            lora_alpha=o.alpha,
            lora_dropout=o.dropout,
            target_modules=["q_proj", "v_proj"],
        ),
    )
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.train.lr)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=10**6)
    order = BatchOrder(len(features), config.train.batch_size, 0)
    position = 0
    model.train()

    def run(steps: int) -> list[float]:
        nonlocal position
        times = []
        for _ in range(steps):
            started = time.perf_counter()
            indices = order.batch(position // order.steps_per_epoch, position % order.steps_per_epoch)
            batch = collate([features[i] for i in indices], pad_id)
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, config.train.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss.item()
            times.append(time.perf_counter() - started)
            position += 1
        return times

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="steps per block")
    parser.add_argument("--rounds", type=int, default=3, help="alternating blocks per side")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    args = parser.parse_args()
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
    sides = {
        "hand-written PEFT loop": hand_written_side(config, features, tokenizer.pad_token_id),
        "loralab loop": loralab_side(config, features, tokenizer.pad_token_id),
    }
    times: dict[str, list[float]] = {name: [] for name in sides}
    for run in sides.values():
        run(args.warmup)
    for _ in range(args.rounds):
        for name, run in sides.items():
            times[name] += run(args.steps)

    reference = statistics.median(times["hand-written PEFT loop"])
    print(
        f"tiny-llama, batch {args.batch} x {args.length} tokens, LoRA r {config.method.adapter.r} on q,v, "
        f"AdamW, {args.rounds} x {args.steps} steps per side after {args.warmup} warm-up, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(f"| {'side':<24} | median ms | min ms | max ms | ratio to hand-written |")
    print(f"| {'-' * 24} | --------- | ------ | ------ | --------------------- |")
    for name, values in times.items():
        median = statistics.median(values)
        print(
            f"| {name:<24} | {median * 1e3:9.2f} | {min(values) * 1e3:6.2f} | {max(values) * 1e3:6.2f} | "
            f"{median / reference:21.3f} |"
        )


if __name__ == "__main__":
    main()
