"""loralab's training step vs a minimal hand-written PEFT loop, side by side in one process.

Same tiny Llama, batch, LoRA config, AdamW and schedule. Both sides collate their batch from the same
tokenised features each step. Blocks of steps alternate between the two sides so drift hits both equally;
the table reports the median, min and max step time of each and the ratio of medians.

    python benchmarks/train_step.py [--steps 30] [--rounds 3] [--batch 16] [--length 128]
"""

from __future__ import annotations

import argparse
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import get_scheduler

from common import Run, alternate, loop_side, print_table, synthetic_features
from loralab.adapters import build_adapter
from loralab.config import load_config
from loralab.data.collate import collate
from loralab.gradient import NoRule
from loralab.models import load_model
from loralab.training.loop import BatchOrder


def loralab_side(config, features, pad_id) -> Run:
    """loralab's own loop (`training.loop.train`) with the `none` rule, advanced `steps` at a time."""
    model, _ = load_model(config.model, "causal_lm")
    model = build_adapter(config.method.adapter, "causal_lm").apply(model)
    return loop_side(model, NoRule(), config.train, features, pad_id)


def hand_written_side(config, features, pad_id) -> Run:
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
    times = alternate(sides, args.warmup, args.rounds, args.steps)
    print(
        f"tiny-llama, batch {args.batch} x {args.length} tokens, LoRA r {config.method.adapter.r} on q,v, "
        f"AdamW, {args.rounds} x {args.steps} steps per side after {args.warmup} warm-up, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print_table(times, "hand-written PEFT loop")


if __name__ == "__main__":
    main()
