"""Step time of Shake-to-Align's two vote routes against plain dual-rank LoRA training, side by side in one process.

Three sides on the same model, batches and adapter (dual-rank r 8 / R 32 on every linear layer): no rule,
`shake_align` on the vectorized route (one backward, per-window gradients from hooks), and on the microbatch
route (one backward per window); V = batch / samples_per_vote votes. Blocks of steps alternate between the
sides so drift hits all equally; the table gives median/min/max step time and the ratio of medians to plain.

    python benchmarks/votes.py [--model minilm] [--batch 32] [--spv 8] [--length 128] [--steps 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

import torch
from accelerate import Accelerator

from loralab.adapters import build_adapter
from loralab.config import load_config
from loralab.gradient import build_rule
from loralab.models import load_model
from loralab.training.loop import BatchOrder, TrainState, train
from loralab.training.optim import build_optimizer, build_scheduler
from train_step import StepTimes


def side_overrides(samples_per_vote: int) -> dict[str, list[str]]:
    """The three sides as config overrides on top of the `ours` preset."""
    votes = f"method.gradient.samples_per_vote={samples_per_vote}"
    return {
        "plain dual-rank": ["method.gradient.kind=none"],
        "votes, vectorized": ["method.gradient.route=vectorized", votes],
        "votes, microbatch": ["method.gradient.route=microbatch", votes],
    }


def classification_features(count: int, length: int, vocab: int) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (count, length), generator=generator).tolist()
    labels = torch.randint(0, 2, (count,), generator=generator).tolist()
    return [{"input_ids": row, "attention_mask": [1] * length, "labels": y} for row, y in zip(ids, labels, strict=True)]


def side(config, features: list[dict], pad_id: int):
    """One side: the method's model, adapter and rule on loralab's loop, advanced `steps` at a time."""
    torch.manual_seed(0)
    model, _ = load_model(config.model, "seq_cls", 2)
    adapter = build_adapter(config.method.adapter, "seq_cls")
    model = adapter.apply(model)
    rule = build_rule(config.method.gradient)
    rule.attach(model, adapter.lora_modules(model))
    accelerator = Accelerator(mixed_precision="no")
    optimizer = build_optimizer(model, config.train)
    model, optimizer = accelerator.prepare(model, optimizer)
    scheduler = build_scheduler(optimizer, config.train, 10**6)
    order = BatchOrder(len(features), config.train.batch_size, 0)
    state, events = TrainState(), StepTimes()

    def run(steps: int) -> list[float]:
        nonlocal state
        events.start()
        budget = dataclasses.replace(config.train, max_steps=state.step + steps)
        state = train(
            model, features, rule, budget, accelerator, optimizer, scheduler, state, order, pad_id, events, log_every=1
        )
        return list(events.times)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--spv", type=int, default=8, help="samples per vote")
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="steps per block")
    parser.add_argument("--rounds", type=int, default=3, help="alternating blocks per side")
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    common = [
        f"model.name={args.model}",
        "method.name=ours",
        "method.adapter.dropout=0",
        f"train.batch_size={args.batch}",
        "train.warmup_ratio=0",
    ]
    configs = {name: load_config([], common + extra) for name, extra in side_overrides(args.spv).items()}
    probe, tokenizer = load_model(configs["plain dual-rank"].model, "seq_cls", 2)
    features = classification_features(args.batch * 16, args.length, probe.config.vocab_size)
    runs = {name: side(config, features, tokenizer.pad_token_id) for name, config in configs.items()}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():
        run(args.warmup)
    for _ in range(args.rounds):
        for name, run in runs.items():
            times[name] += run(args.steps)

    adapter = configs["plain dual-rank"].method.adapter
    print(
        f"{args.model}, batch {args.batch} x {args.length} tokens, dual-rank r {adapter.r} / R {adapter.R} on "
        f"{adapter.target_modules}, V = {-(-args.batch // args.spv)} votes, {args.rounds} x {args.steps} steps per "
        f"side after {args.warmup} warm-up, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    reference = statistics.median(times["plain dual-rank"])
    print(f"| {'side':<18} | median ms | min ms | max ms | ratio to plain |")
    print(f"| {'-' * 18} | --------- | ------ | ------ | -------------- |")
    for name, values in times.items():
        median = statistics.median(values)
        print(
            f"| {name:<18} | {median * 1e3:9.1f} | {min(values) * 1e3:6.1f} | {max(values) * 1e3:6.1f} | "
            f"{median / reference:14.3f} |"
        )


if __name__ == "__main__":
    main()
