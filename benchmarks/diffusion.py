"""LoRA-Diffusion and its five baselines on one masked diffusion LM: training step time per method, side by side
in one process, then the sampler's generated tokens per second at T = 16 and 64 steps.

Every method trains on the same diffusion LM (MiniLM by default), the same batches (the offline
`synthetic/sentiment` task as diffusion sequences: prompt + a response slot of `--response` tokens) and AdamW,
on loralab's own loop; blocks of steps alternate between the methods with a rotating order. The table gives the
median/min/max step time and the ratio of medians to the first method (weight LoRA by default); the setup
line gives each method's trainable share. The sampler table times
`diffusion.sample` (greedy, one block) over one batch of prompts with each method's adapter on: the median,
min and max over `--repeats` calls of generated tokens per second.

    python benchmarks/diffusion.py [--model minilm] [--batch 16] [--response 32] [--steps 10] [--rounds 6]
                                   [--methods weight_lora lora_diffusion ...] [--json PATH]
"""

from __future__ import annotations

import argparse
import time

import torch

from common import add_output_arguments, alternate, comparison, finish, loop_side
from loralab.config import RunConfig, load_config
from loralab.data import get_task, load_task
from loralab.diffusion import SamplerSettings, build_diffusion_adapter, load_diffusion_model, sample
from loralab.diffusion.data import encode_diffusion, encode_prompt, prompt_and_response
from loralab.gradient.base import NoRule

METHODS = ["weight_lora", "lora_diffusion", "adapters", "prefix", "bitfit", "full_ft"]


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


def sampler_speeds(model, prompts: list[list[int]], response: int, steps: int, repeats: int) -> list[float]:
    """Generated response tokens per second (every slot position counts) of each of `repeats` calls."""
    model.eval()
    settings = SamplerSettings(response_length=response, steps=steps)
    speeds = []
    for _ in range(repeats):
        started = time.perf_counter()
        sample(model, prompts, settings)
        speeds.append(len(prompts) * response / (time.perf_counter() - started))
    model.train()
    return speeds


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm", help="minilm (pretrained, bundled) or tiny-bert")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--response", type=int, default=32, help="response slot length")
    parser.add_argument("--steps", type=int, default=10, help="training steps per block")
    parser.add_argument("--rounds", type=int, default=6, help="alternating blocks per method")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="sampler calls per method and T")
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS, help="first: the reference")
    add_output_arguments(parser)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    spec = get_task("synthetic/sentiment")
    runs, models, shares = {}, {}, {}
    for method in args.methods:
        config = method_config(args, method)
        model, tokenizer = build(config)
        examples = load_task(config.task).train
        features = encode_diffusion(examples, spec, tokenizer, config.task.max_length, args.response)
        runs[method] = loop_side(model, NoRule(), config.train, features, tokenizer.pad_token_id)
        models[method] = model
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        shares[method] = f"{method} {100 * trainable / sum(p.numel() for p in model.parameters()):.3g} %"
    budget = args.response + 2
    prompts = [encode_prompt(tokenizer, prompt_and_response(spec, e)[0], 128 - budget) for e in examples[: args.batch]]
    reference = args.methods[0]
    steps = alternate(runs, args.warmup, args.rounds, args.steps)
    comparisons = [comparison("diffusion training step", "ms", steps, reference)]
    for t in (16, 64):
        speeds = {
            method: sampler_speeds(model, prompts, args.response, t, args.repeats) for method, model in models.items()
        }
        comparisons.append(comparison(f"diffusion sampler at T={t}", "tok/s", speeds, reference, scale=1))
    setup = (
        f"{args.model} diffusion LM, training batch {args.batch} × (prompt + {args.response}-token slot), "
        f"{args.rounds} x {args.steps} steps per method after {args.warmup} warm-up; sampler: {len(prompts)} prompts "
        f"× {args.response} tokens, greedy, one block, {args.repeats} calls per method and T; trainable: "
        f"{', '.join(shares.values())}; torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    finish(args, setup, comparisons)


if __name__ == "__main__":
    main()
