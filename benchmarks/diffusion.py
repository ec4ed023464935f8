"""LoRA-Diffusion and its five baselines on one masked diffusion LM: training step time per method, side by side
in one process, then the sampler's generated tokens per second at T = 16 and 64 steps.

Every method trains on the same diffusion LM (MiniLM by default), the same batches (the offline
`synthetic/sentiment` task as diffusion sequences: prompt + a response slot of `--response` tokens) and AdamW,
on loralab's own loop; blocks of steps alternate between the methods with a rotating order. The table gives the
median/min/max step time, the ratio of medians to weight LoRA, and the trainable share. The sampler table times
`diffusion.sample` (greedy, one block) over one batch of prompts with each method's adapter on.

    python benchmarks/diffusion.py [--model minilm] [--batch 16] [--response 32] [--steps 10] [--rounds 6]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from common import alternate, loop_side, print_markdown, print_table
from loralab.config import RunConfig, load_config
from loralab.data import get_task, load_task
from loralab.diffusion import SamplerSettings, build_diffusion_adapter, load_diffusion_model, sample
from loralab.diffusion.data import encode_diffusion, encode_prompt, prompt_and_response
from loralab.gradient.base import NoRule

METHODS = ["weight_lora", "lora_diffusion", "adapters", "prefix", "bitfit", "full_ft"]
REFERENCE = "weight_lora"


def method_config(args: argparse.Namespace, method: str) -> RunConfig:
    return load_config(
        [],
        [
            f"model.name={args.model}",
            "model.kind=masked_diffusion",
            f"method.name={method}",
            f"task.train_samples={args.batch * 8}",
            f"diffusion.response_length={args.response}",
            f"train.batch_size={args.batch}",
            "train.lr=1e-4",
            "train.warmup_ratio=0",
        ],
    )


def build(config: RunConfig):
    """The method's diffusion LM with its adapter, from the same seed for every method."""
    torch.manual_seed(0)
    model, tokenizer = load_diffusion_model(config.model, config.diffusion)
    return build_diffusion_adapter(config.method.adapter).apply(model), tokenizer


def sampler_speed(model, prompts: list[list[int]], response: int, steps: int, repeats: int) -> float:
    """Generated response tokens per second (every slot position counts) of the median of `repeats` calls."""
    model.eval()
    settings = SamplerSettings(response_length=response, steps=steps)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        sample(model, prompts, settings)
        times.append(time.perf_counter() - started)
    model.train()
    return len(prompts) * response / statistics.median(times)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm", help="minilm (pretrained, bundled) or tiny-bert")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--response", type=int, default=32, help="response slot length")
    parser.add_argument("--steps", type=int, default=10, help="training steps per block")
    parser.add_argument("--rounds", type=int, default=6, help="alternating blocks per method")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="sampler calls per method and T")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    spec = get_task("synthetic/sentiment")
    runs, models, shares = {}, {}, {}
    for method in METHODS:
        config = method_config(args, method)
        model, tokenizer = build(config)
        examples = load_task(config.task).train
        features = encode_diffusion(examples, spec, tokenizer, config.task.max_length, args.response)
        runs[method] = loop_side(model, NoRule(), config.train, features, tokenizer.pad_token_id)
        models[method] = model
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        shares[method] = 100 * trainable / sum(p.numel() for p in model.parameters())
    budget = args.response + 2
    prompts = [encode_prompt(tokenizer, prompt_and_response(spec, e)[0], 128 - budget) for e in examples[: args.batch]]

    print(f"training step, {args.model}, batch {args.batch} × (prompt + {args.response}-token slot)")
    print_table(alternate(runs, args.warmup, args.rounds, args.steps), REFERENCE)
    print()
    header = ["method", "trainable %", "tokens/s at T=16", "tokens/s at T=64"]
    rows = [
        [
            method,
            f"{shares[method]:.3f}",
            *(f"{sampler_speed(models[method], prompts, args.response, t, args.repeats):.1f}" for t in (16, 64)),
        ]
        for method in METHODS
    ]
    print(f"sampler, {len(prompts)} prompts × {args.response} tokens, greedy, one block")
    print_markdown(header, rows)


if __name__ == "__main__":
    main()
