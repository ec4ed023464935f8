"""LoRA against full fine-tuning on loralab's own loop: step time side by side in one process, then peak memory.

Both sides train the same model (MiniLM by default, a sequence classifier) on the same batches with AdamW: the
`lora` preset (PEFT LoRA r 8, alpha 16 on query and value; dropout 0 here) and the `full` preset (every parameter
trains). Blocks of steps alternate between the sides so drift hits both equally; then each side's peak memory,
each alone in a fresh process (see `common.side_peak_mb`).

    python benchmarks/finetune.py [--model minilm] [--batch 16] [--length 128] [--steps 10] [--rounds 4] [--json PATH]
"""

from __future__ import annotations

import argparse
from functools import partial

import torch

from common import (
    MEMORY_NOTE,
    Run,
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
from loralab.gradient import NoRule
from loralab.models import load_model

LORA, FULL = "LoRA", "full fine-tuning"
SIDES = {LORA: ["method.name=lora", "method.adapter.dropout=0"], FULL: ["method.name=full"]}


def side(config: RunConfig, features: list[dict], pad_id: int) -> Run:
    """The method's adapter on the classifier, trained by loralab's loop, from the same seed as the other side."""
    torch.manual_seed(0)
    model, _ = load_model(config.model, "seq_cls", 2)
    model = build_adapter(config.method.adapter, "seq_cls").apply(model)
    return loop_side(model, NoRule(), config.train, features, pad_id)


def trainable(config: RunConfig) -> str:
    """Trainable parameters of the method's model, e.g. '0.3 % (73,728)'."""
    model, _ = load_model(config.model, "seq_cls", 2)
    model = build_adapter(config.method.adapter, "seq_cls").apply(model)
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"{100 * count / sum(p.numel() for p in model.parameters()):.2f} % ({count:,})"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm", help="minilm (pretrained, bundled) or a tiny preset")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="steps per block")
    parser.add_argument("--rounds", type=int, default=4, help="alternating blocks per side (a multiple of 2)")
    parser.add_argument("--warmup", type=int, default=2)
    add_output_arguments(parser)
    add_memory_arguments(parser)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    common = [f"model.name={args.model}", f"train.batch_size={args.batch}", "train.warmup_ratio=0"]
    configs = {name: load_config([], common + extra) for name, extra in SIDES.items()}
    probe, tokenizer = load_model(configs[LORA].model, "seq_cls", 2)
    features = synthetic_features(args.batch * 16, args.length, probe.config.vocab_size, num_labels=2)
    builders = {name: partial(side, config, features, tokenizer.pad_token_id) for name, config in configs.items()}
    measured = steps_and_memory(args, builders, __file__)
    if measured is None:
        return
    times, memory = measured
    adapter = configs[LORA].method.adapter
    setup = (
        f"{args.model} (classifier), batch {args.batch} x {args.length} tokens, AdamW; LoRA r {adapter.r} alpha "
        f"{adapter.alpha} on {adapter.target_modules} trains {trainable(configs[LORA])}, full fine-tuning "
        f"{trainable(configs[FULL])}; {args.rounds} x {args.steps} steps per side after {args.warmup} warm-up, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    comparisons = [
        comparison("LoRA vs full fine-tuning, training step", "ms", times, LORA),
        comparison(f"LoRA vs full fine-tuning, peak memory ({args.memory_steps} steps)", "MiB", memory, LORA, scale=1),
    ]
    finish(args, setup, comparisons, [MEMORY_NOTE])


if __name__ == "__main__":
    main()
