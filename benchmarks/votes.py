"""Step time of Shake-to-Align's two vote routes against plain dual-rank LoRA training, side by side in one process.

Three sides on the same model, batches and adapter (the `ours` preset: dual-rank r 8 / R 32 on every linear
layer), each on loralab's own loop: no rule (`method.gradient.kind=none`), `shake_align` on the vectorized route
(one backward, per-vote gradients from hooks) and on the microbatch route (one backward per vote); V = batch /
samples_per_vote votes. Every side starts from the same seed. Blocks of steps alternate between the sides so
drift hits all equally; the table gives median/min/max step time and the ratio of medians to plain dual-rank.

    python benchmarks/votes.py [--model minilm] [--batch 32] [--spv 8] [--length 128] [--steps 20] [--rounds 3]
                               [--json PATH]
"""

from __future__ import annotations

import argparse

import torch

from common import Run, Target, add_output_arguments, alternate, comparison, finish, loop_side, synthetic_features
from loralab.adapters import build_adapter
from loralab.config import RunConfig, load_config
from loralab.gradient import build_rule
from loralab.models import load_model

PLAIN, VECTORIZED, MICROBATCH = "plain dual-rank", "votes, vectorized", "votes, microbatch"


def side_overrides(samples_per_vote: int) -> dict[str, list[str]]:
    """The three sides as config overrides on top of the `ours` preset."""
    votes = f"method.gradient.samples_per_vote={samples_per_vote}"
    return {
        PLAIN: ["method.gradient.kind=none"],
        VECTORIZED: ["method.gradient.route=vectorized", votes],
        MICROBATCH: ["method.gradient.route=microbatch", votes],
    }


def side(config: RunConfig, features: list[dict], pad_id: int) -> Run:
    """One side: the method's model, adapter and rule on loralab's loop, from the same seed as the others."""
    torch.manual_seed(0)
    model, _ = load_model(config.model, "seq_cls", 2)
    adapter = build_adapter(config.method.adapter, "seq_cls")
    model = adapter.apply(model)
    rule = build_rule(config.method.gradient)
    rule.attach(model, adapter.lora_modules(model))
    return loop_side(model, rule, config.train, features, pad_id)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm", help="minilm (pretrained, bundled) or tiny-roberta")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--spv", type=int, default=8, help="samples per vote")
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="steps per block")
    parser.add_argument("--rounds", type=int, default=3, help="alternating blocks per side")
    parser.add_argument("--warmup", type=int, default=3)
    add_output_arguments(parser)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    common = [
        f"model.name={args.model}",
        "task.name=synthetic/sentiment",
        "method.name=ours",
        "method.adapter.dropout=0",
        f"train.batch_size={args.batch}",
        "train.warmup_ratio=0",
    ]
    configs = {name: load_config([], common + extra) for name, extra in side_overrides(args.spv).items()}
    probe, tokenizer = load_model(configs[PLAIN].model, "seq_cls", 2)
    features = synthetic_features(args.batch * 16, args.length, probe.config.vocab_size, num_labels=2)
    runs = {name: side(config, features, tokenizer.pad_token_id) for name, config in configs.items()}
    times = alternate(runs, args.warmup, args.rounds, args.steps)

    adapter = configs[PLAIN].method.adapter
    setup = (
        f"{args.model}, batch {args.batch} x {args.length} tokens, dual-rank r {adapter.r} / R {adapter.R} on "
        f"{adapter.target_modules}, V = {-(-args.batch // args.spv)} votes of {args.spv}, {args.rounds} x "
        f"{args.steps} steps per side after {args.warmup} warm-up, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    targets = {VECTORIZED: Target("<=", 1.15)}
    finish(args, setup, [comparison("Shake-to-Align vs a plain dual-rank LoRA step", "ms", times, PLAIN, targets)])


if __name__ == "__main__":
    main()
