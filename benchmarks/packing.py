"""Real (non-padding) training tokens per second on an Alpaca-shaped length mix: loralab padded, packed and
length-grouped, against `transformers.Trainer` + PEFT (padded) and TRL's `SFTTrainer` with packing.

The data: seeded SFT-shaped examples, log-normal lengths with median max_length/4 (σ 0.7, within [16, max_length]),
random ids, the first 40 % of each a prompt without loss. The model: the tiny Llama with LoRA r 8 on q and v
(loralab's own adapter on the loralab sides, PEFT's on the others), AdamW, a linear schedule over 10⁶ steps,
clipping at 1.0, `--batch` examples (padded, grouped) or packed rows of at most `--max-length` tokens per step.

- loralab padded: `training.loop.optimizer_steps` on the examples in seeded random batches, right-padded (`BatchOrder`);
- loralab grouped: the same with `LengthGroupedOrder` (batches of similar length, HF's LengthGroupedSampler);
- loralab packed: the same loop on `data.packing.pack` rows (best fit decreasing; block-diagonal attention from
  `position_ids`);
- loralab packed, rows of max_length/2 (outside the targets): the examples that fit, packed into rows half as long,
  2 × `--batch` rows per step (the same tokens): attention costs per token in proportion to a row's width;
- HF Trainer + PEFT padded: `Trainer.train()` with loralab's `collate`, on the same batches as loralab padded;
- TRL packed: `SFTTrainer` (packing=True: best-fit-decreasing rows, padding-free batches) at TRL's defaults
  otherwise; a note says why when TRL does not import.

Every side counts the real tokens of the batches it trains on (loralab: the loop's own count; the trainers: their
collator's input), and each sample is one block's wall time over its real tokens: µs per real token. Blocks
alternate between the sides in one process (the order rotating), as in the other benchmarks; the Trainer sides
run in a thread paused between blocks (`train_step.Blocks`).

    python benchmarks/packing.py [--quick] [--steps 20] [--rounds 6] [--batch 8] [--max-length 512] [--json PATH]
"""

from __future__ import annotations

import argparse
import time
from collections import deque
from collections.abc import Callable
from functools import partial

import numpy as np
import torch
from accelerate import Accelerator
from transformers import Trainer, TrainingArguments

from common import Run, Target, add_output_arguments, alternate, comparison, finish
from loralab.adapters import build_adapter
from loralab.config import RunConfig, load_config
from loralab.data.collate import IGNORE_INDEX, collate
from loralab.data.packing import pack
from loralab.gradient import NoRule
from loralab.models import load_model
from loralab.training.loop import BatchOrder, LengthGroupedOrder, TrainState, optimizer_steps, prepare_for_loop
from loralab.training.optim import build_optimizer, build_scheduler
from train_step import SCHEDULE_STEPS, Blocks, device, peft_model, trainer_arguments

PADDED, PACKED, GROUPED = "loralab padded", "loralab packed", "loralab grouped"
TRAINER, TRL = "HF Trainer + PEFT padded", "TRL SFTTrainer packed"
PROMPT_SHARE, SIGMA, SHORTEST = 0.4, 0.7, 16


def alpaca_features(count: int, max_length: int, vocab: int, seed: int = 0) -> list[dict]:
    """Seeded SFT-shaped examples: log-normal lengths (median max_length/4), ids ≥ 5, a prompt without loss."""
    generator = np.random.default_rng(seed)
    lengths = np.clip(generator.lognormal(np.log(max_length / 4), SIGMA, count), SHORTEST, max_length).astype(int)
    features = []
    for length in lengths.tolist():
        ids = generator.integers(5, vocab, length).tolist()
        prompt = int(PROMPT_SHARE * length)
        labels = [IGNORE_INDEX] * prompt + ids[prompt:]
        features.append({"input_ids": ids, "attention_mask": [1] * length, "labels": labels})
    return features


def loop_config(batch: int) -> RunConfig:
    """The tiny Llama with LoRA r 8 on q and v, `batch` examples or rows per step."""
    overrides = ["model.name=tiny-llama", f"train.batch_size={batch}", "method.adapter.dropout=0"]
    return load_config([], [*overrides, "method.adapter.target_modules=[q_proj, v_proj]", "train.warmup_ratio=0"])


def fill(rows: list[dict], max_length: int) -> float:
    """Real tokens over the tokens of full rows."""
    return sum(len(row["input_ids"]) for row in rows) / (len(rows) * max_length)


def loralab_side(config: RunConfig, features: list[dict], order: BatchOrder | LengthGroupedOrder, pad_id: int) -> Run:
    """loralab's loop (`training.loop.optimizer_steps`, no gradient rule) on `features` in `order`; per block,
    seconds per real token as the loop counts them."""
    model, _ = load_model(config.model, "causal_lm")
    model = build_adapter(config.method.adapter, "causal_lm").apply(model)
    accelerator = Accelerator(mixed_precision="no")
    optimizer = build_optimizer(model, config.train)
    model, optimizer = prepare_for_loop(accelerator, model, optimizer)
    scheduler = build_scheduler(optimizer, config.train, SCHEDULE_STEPS)
    state, rule = TrainState(), NoRule()

    def run(steps: int) -> list[float]:
        started, tokens = time.perf_counter(), state.tokens
        for step in optimizer_steps(
            model, features, rule, config.train, accelerator, optimizer, scheduler, state, order, pad_id,
            state.step + steps,
        ):  # fmt: skip
            if state.step % steps == 0:  # the block's last step logs, as the loop's `log_every=steps` did
                step.train_metrics(scheduler.get_last_lr()[0], state.epoch)
        return [(time.perf_counter() - started) / (state.tokens - tokens)]

    return run


class CountingCollator:
    """Wraps a collator and notes each batch's real tokens in order (a queue: a data loader may fetch ahead)."""

    def __init__(self, collator: Callable) -> None:
        self.collator, self.tokens = collator, deque()

    def __call__(self, features: list[dict]) -> dict:
        self.tokens.append(sum(len(f["input_ids"]) for f in features))
        return self.collator(features)


def trainer_run(trainer: Trainer) -> Run:
    """Blocks of a Trainer's steps (in its thread); per block, seconds per real token of the batches it took."""
    counting = CountingCollator(trainer.data_collator)
    trainer.data_collator = counting
    blocks = Blocks(trainer.train)
    trainer.add_callback(blocks)

    def run(steps: int) -> list[float]:
        times = blocks.run(steps)
        return [sum(times) / sum(counting.tokens.popleft() for _ in times)]

    return run


def trainer_side(config: RunConfig, features: list[dict], order: BatchOrder, pad_id: int) -> Run:
    """`transformers.Trainer` on the PEFT model, right-padded batches from loralab's `collate`, taken in `order`'s
    first epoch (a sequential sampler over the examples so ordered): the batches loralab padded takes."""
    ordered = [features[i] for position in range(order.steps_per_epoch) for i in order.batch(0, position)]
    arguments = trainer_arguments(TrainingArguments, config, train_sampling_strategy="sequential")
    collator = partial(collate, pad_token_id=pad_id)
    return trainer_run(Trainer(peft_model(config), arguments, data_collator=collator, train_dataset=ordered))


def trl_side(config: RunConfig, features: list[dict], tokenizer, max_length: int) -> Run:
    """TRL's `SFTTrainer` with packing (its default strategy) on the same ids and labels, PEFT model."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    dataset = Dataset.from_list([{"input_ids": f["input_ids"], "labels": f["labels"]} for f in features])
    arguments = trainer_arguments(SFTConfig, config, packing=True, max_length=max_length)
    trainer = SFTTrainer(peft_model(config), arguments, train_dataset=dataset, processing_class=tokenizer)
    return trainer_run(trainer)


def trl_problem() -> str | None:
    """Why the TRL side cannot run here, or None."""
    try:
        from trl import SFTConfig, SFTTrainer  # noqa: F401
    except Exception as error:  # not installed, or not importable beside this transformers
        return f"TRL not installed/compatible: {type(error).__name__}: {error}"
    return None


def real_share(order: BatchOrder | LengthGroupedOrder, features: list[dict]) -> float:
    """Real tokens over the tokens a right-padded epoch computes (rows × longest row per batch)."""
    real = computed = 0
    for position in range(order.steps_per_epoch):
        lengths = [len(features[i]["input_ids"]) for i in order.batch(0, position)]
        real, computed = real + sum(lengths), computed + len(lengths) * max(lengths)
    return real / computed


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="steps per block")
    parser.add_argument("--rounds", type=int, default=6, help="alternating blocks per side (a multiple of 6)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8, help="examples (padded, grouped) or packed rows per step")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--examples", type=int, default=4096)
    parser.add_argument("--quick", action="store_true", help="5 steps per block")
    add_output_arguments(parser)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    steps = 5 if args.quick else args.steps
    config, half = loop_config(args.batch), args.max_length // 2
    probe, tokenizer = load_model(config.model, "causal_lm")
    pad = tokenizer.pad_token_id
    features = alpaca_features(args.examples, args.max_length, probe.config.vocab_size)
    rows = pack(features, args.max_length)
    short = pack([f for f in features if len(f["input_ids"]) <= half], half)
    packed_half = f"loralab packed, rows of {half}"
    data = {PADDED: features, PACKED: rows, GROUPED: features, packed_half: short}
    orders = {
        PADDED: BatchOrder(len(features), args.batch, 0),
        PACKED: BatchOrder(len(rows), args.batch, 0),
        GROUPED: LengthGroupedOrder([len(f["input_ids"]) for f in features], args.batch, 0),
        packed_half: BatchOrder(len(short), 2 * args.batch, 0),
    }
    sides = {name: partial(loralab_side, config, data[name], orders[name], pad) for name in (PADDED, PACKED, GROUPED)}
    sides[packed_half] = partial(loralab_side, loop_config(2 * args.batch), short, orders[packed_half], pad)
    sides[TRAINER] = partial(trainer_side, config, features, orders[PADDED], pad)
    problem = trl_problem()
    if problem is None:
        sides[TRL] = partial(trl_side, config, features, tokenizer, args.max_length)
    times = alternate({name: build() for name, build in sides.items()}, args.warmup, args.rounds, steps)

    lengths = np.array([len(f["input_ids"]) for f in features])
    setup = (
        f"tiny-llama on {device().type}, LoRA r {config.method.adapter.r} on q,v, AdamW; {args.examples} examples, "
        f"lengths log-normal median {int(np.median(lengths))} mean {lengths.mean():.0f} max {lengths.max()} "
        f"(max_length {args.max_length}); batch {args.batch} examples or packed rows ({len(rows)} rows, "
        f"{len(features) / len(rows):.1f} examples each, fill {fill(rows, args.max_length):.3f}); {args.rounds} x "
        f"{steps} steps per side after {args.warmup} warm-up; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    targets = {PACKED: Target("<=", 0.5), GROUPED: Target("<=", 0.75)}  # packed: at least 2x padded tokens/s
    comparisons = [comparison("time per real token vs loralab padded", "µs/tok", times, PADDED, targets, scale=1e6)]
    if TRL in times:
        versus = {TRL: times[TRL], PACKED: times[PACKED]}
        comparisons.append(
            comparison("packed: loralab vs TRL", "µs/tok", versus, TRL, {PACKED: Target("<=", 1.05)}, scale=1e6)
        )
    shares = {name: real_share(order, data[name]) for name, order in orders.items()}
    notes = [
        f"{packed_half}: the {sum(len(row['lengths']) for row in short)} examples of at most {half} tokens in "
        f"{len(short)} rows (fill {fill(short, half):.3f}), {2 * args.batch} rows per step; not a target "
        f"(longer examples do not fit), it shows what the row budget costs: attention is quadratic in a row's width",
        "real tokens per computed token over an epoch: "
        + ", ".join(f"{name} {share:.2f}" for name, share in shares.items())
        + "; TRL packed: 1 (padding-free: a batch is one flattened row, attending under a block mask as wide as the "
        "whole batch with sdpa; its varlen path is flash-attention's)",
        *([problem] if problem else []),
    ]
    finish(args, setup, comparisons, notes)


if __name__ == "__main__":
    main()
