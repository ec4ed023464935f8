"""Inference latency of a LoRA model unmerged, merged into its base (PEFT `merge_and_unload`) and of the plain base.

Three sides, one forward pass each over the same batch (inference mode, eval mode): the base model (MiniLM by
default, a sequence classifier), the same base with the `lora` preset's adapter on it (PEFT LoRA r 8 on query and
value, B drawn at random so that the merge changes the weights) and that adapter merged into a copy. Passes are
timed by `analysis.merge.alternate_passes` (what `loralab merge --check` uses): warm-up passes, then rounds of
`--repeats` passes per side, the order rotating by one side per round.

    python benchmarks/inference.py [--model minilm] [--batch 16] [--length 128] [--rounds 60] [--repeats 1]
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch import nn

from common import Target, add_output_arguments, comparison, finish, synthetic_features
from loralab.adapters import build_adapter
from loralab.analysis.merge import alternate_passes
from loralab.config import load_config
from loralab.data.collate import collate
from loralab.models import load_model

BASE, UNMERGED, MERGED = "base", "LoRA unmerged", "LoRA merged"
CAUSAL = ("tiny-llama", "tiny-gpt2")  # decoders: a causal-LM head; the others a two-class classifier


def adapted(config, head: str, num_labels: int | None) -> nn.Module:
    """The base with the method's LoRA on it, B ~ N(0, 0.02²) from a fixed seed (PEFT starts B at 0)."""
    model, _ = load_model(config.model, head, num_labels)
    adapter = build_adapter(config.method.adapter, head)
    model = adapter.apply(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for view in adapter.lora_modules(model).values():
            view.B.copy_(0.02 * torch.randn(view.B.shape, generator=generator))
    return model


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm", help="minilm (pretrained, bundled) or a tiny preset")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=60, help="rotating rounds (a multiple of 3)")
    parser.add_argument("--repeats", type=int, default=1, help="passes per side per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed passes per side")
    add_output_arguments(parser)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    config = load_config([], [f"model.name={args.model}", "method.name=lora"])
    head, labels = ("causal_lm", None) if args.model in CAUSAL else ("seq_cls", 2)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base, tokenizer = load_model(config.model, head, labels)
    unmerged = adapted(config, head, labels)
    models = {BASE: base, UNMERGED: unmerged, MERGED: copy.deepcopy(unmerged).merge_and_unload()}
    models = {name: model.to(device).eval() for name, model in models.items()}
    features = synthetic_features(args.batch, args.length, base.config.vocab_size, labels)
    batch = {k: v.to(device) for k, v in collate(features, tokenizer.pad_token_id).items() if k != "labels"}
    with torch.inference_mode():
        difference = (models[MERGED](**batch).logits - models[UNMERGED](**batch).logits).abs().max().item()
    times = alternate_passes(models, batch, device, args.rounds, args.repeats, args.warmup)
    o = config.method.adapter
    setup = (
        f"{args.model} ({head}) on {device.type}, batch {args.batch} x {args.length} tokens, forward passes in "
        f"inference mode; LoRA r {o.r} alpha {o.alpha} on {o.target_modules}, merged logits within "
        f"{difference:.1e} of the unmerged; {args.rounds} rounds x {args.repeats} passes per side after "
        f"{args.warmup} warm-up, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    targets = {MERGED: Target("±", 0.02)}
    finish(args, setup, [comparison("inference latency, merged vs base", "ms", times, BASE, targets)])


if __name__ == "__main__":
    main()
