"""Training throughput, peak memory and MFU of LoRA, GRIT and Shake-to-Align on a ~1B-parameter Llama, on one GPU.

The model is built from a transformers LlamaConfig (hidden 2048, 16 layers, FFN 5632, 32 heads, vocab 32000:
0.95 B parameters), random bf16 weights from a fixed seed, nothing downloaded. Every side trains its own copy
through loralab's loop (`common.loop_side`) on the same synthetic batches with AdamW: LoRA (r 8 on every linear
layer, no gradient rule), GRIT (its preset: LoRA r 16 on every linear layer, K-FAC at the published periods) and
Shake-to-Align (its preset: dual-rank r 8 / R 32 with shake_align); `--qlora` adds LoRA on an NF4 base
(bitsandbytes). Blocks of steps alternate between the sides, so drift hits all equally; then each side's peak
memory is measured alone (`common.side_peak_mb`: on CUDA the peak allocated bytes over those allocated before the
side was built). The table gives per side the median, min and max step time, tokens/s, peak memory and MFU.

MFU is achieved model FLOP/s over the chip's peak bf16 FLOP/s (`--peak-tflops`, default 989: H100/H200 SXM dense).
Model FLOPs per token, with N the base's parameters outside the input embedding (a lookup, no FLOPs):
    full fine-tuning (reference)    6·N + 12·L·d·s
    LoRA on a frozen base           4·N + 6·N_adapter + 12·L·d·s
4·N is the frozen base's forward (2·N) and its input-gradient backward (2·N; no weight gradients); 6·N_adapter the
trained adapter's forward and backward; 12·L·d·s the attention scores and values over L layers of width d at
sequence length s (PaLM's convention, causal masking not discounted). GRIT's and Shake-to-Align's own work
(covariances, preconditioning, votes) and NF4's dequantization are not model FLOPs: they lower MFU, as they should.

    python benchmarks/gpu.py [--methods lora grit ours] [--qlora] [--batch 16] [--length 512] [--steps 10]
                             [--rounds 3] [--warmup 50] [--peak-tflops 989]
    python benchmarks/gpu.py --device cpu --tiny --steps 3    # smoke run: the tiny-llama preset's config on CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
from collections.abc import Callable
from functools import partial

import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig

from common import Run, alternate, comparison, loop_side, side_peak_mb, synthetic_features
from loralab.adapters import build_adapter
from loralab.config import RunConfig, load_config
from loralab.gradient import build_rule
from loralab.models.load import nf4_config, reload_quantized
from loralab.models.presets import tiny_config
from tables import print_markdown

METHODS = {
    "lora": ("LoRA", ["method.name=lora", "method.adapter.target_modules=all-linear"]),
    "grit": ("GRIT", ["method.name=grit"]),
    "ours": ("Shake-to-Align", ["method.name=ours"]),
}
QLORA = "LoRA, NF4 base"
BILLION = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
}
MEMORY_STEPS = 3  # after 1 warm-up step: by then every state exists (AdamW moments, GRIT's covariances, votes)
DTYPE = torch.bfloat16


def model_config(tiny: bool) -> LlamaConfig:
    """The ~1B Llama config, or the tiny-llama preset's for a CPU smoke run."""
    return tiny_config("tiny-llama", None) if tiny else LlamaConfig(**BILLION)


def base_parameters(config: LlamaConfig) -> tuple[int, int]:
    """All parameters of the model and those outside the input embedding, counted on the meta device."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    return total, total - model.get_input_embeddings().weight.numel()


def build_base(config: LlamaConfig, device: str) -> nn.Module:
    """Random bf16 weights from a fixed seed, built on the device itself (no CPU copy of 2 GB)."""
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=DTYPE)


def quantized_base(config: LlamaConfig, run_config: RunConfig) -> nn.Module:
    """The bf16 base in NF4 through loralab's own path (saved, reloaded with bitsandbytes), the bf16 copy freed."""
    model_cfg = dataclasses.replace(run_config.model, dtype="bfloat16", quantization="nf4")
    model, _ = reload_quantized(build_base(config, "cuda"), "causal_lm", model_cfg, nf4_config())
    gc.collect()
    torch.cuda.empty_cache()
    return model


@dataclasses.dataclass
class Side:
    """One row: how its base is built, the run config that gives its adapter and rule, its adapter's size."""

    label: str
    run_config: RunConfig
    make_base: Callable[[], nn.Module]
    adapter_parameters: int = 0

    def build(self, features: list[dict], device: str) -> Run:
        """The base with the adapter and rule, on loralab's loop; records the adapter's trainable parameters."""
        model = self.make_base()
        adapter = build_adapter(self.run_config.method.adapter, "causal_lm")
        model = adapter.apply(model)
        rule = build_rule(self.run_config.method.gradient)
        rule.attach(model, adapter.lora_modules(model))
        self.adapter_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
        pad_id = 0  # no synthetic row is padded
        return loop_side(model, rule, self.run_config.train, features, pad_id, cpu=device == "cpu")


def make_sides(args: argparse.Namespace, config: LlamaConfig) -> list[Side]:
    """The requested methods' sides, and the NF4 one when `--qlora`."""
    common = [f"train.batch_size={args.batch}", "train.warmup_ratio=0"]
    built = []
    for method in args.methods:
        label, overrides = METHODS[method]
        built.append(Side(label, load_config([], overrides + common), partial(build_base, config, args.device)))
    if args.qlora:
        run_config = load_config([], METHODS["lora"][1] + common)
        built.append(Side(QLORA, run_config, partial(quantized_base, config, run_config)))
    return built


def flops_per_token(base_n: int, adapter_n: int, config: LlamaConfig, length: int) -> float:
    """Model FLOPs per trained token on a frozen base: 4·N + 6·N_adapter + 12·L·d·s (see the module docstring)."""
    return 4 * base_n + 6 * adapter_n + 12 * config.num_hidden_layers * config.hidden_size * length


def result_rows(
    sides: list[Side], times: dict[str, list[float]], peaks: dict[str, float], args: argparse.Namespace, base_n: int
) -> list[list[str]]:
    """Per side: median/min/max ms and the ratio of medians to the first side (`common.comparison`), tokens/s at
    the median, peak MiB, model TFLOP/s and MFU."""
    config, tokens = model_config(args.tiny), args.batch * args.length
    step = {row["side"]: row for row in comparison("step time", "ms", times, sides[0].label)["rows"]}
    rows = []
    for side in sides:
        row = step[side.label]
        per_second = tokens / (row["median"] / 1e3)
        flops = flops_per_token(base_n, side.adapter_parameters, config, args.length) * per_second
        rows.append(
            [
                side.label,
                *(f"{row[key]:.1f}" for key in ("median", "min", "max")),
                f"{row['ratio']:.3f}",
                f"{per_second:,.0f}",
                f"{peaks[side.label]:,.0f}",
                f"{flops / 1e12:.3g}",
                f"{100 * flops / (args.peak_tflops * 1e12):.3g} %",
            ]
        )
    return rows


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--qlora", action="store_true", help="add LoRA on an NF4 base (CUDA and bitsandbytes)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--tiny", action="store_true", help="the tiny-llama config instead of ~1B (smoke run)")
    parser.add_argument("--batch", type=int, default=16, help="examples per step (16: 2 votes of Shake-to-Align)")
    parser.add_argument("--length", type=int, help="tokens per example (default 512; 64 with --tiny)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per block")
    parser.add_argument("--rounds", type=int, default=3, help="alternating blocks per side (a multiple of the sides)")
    parser.add_argument(
        "--warmup", type=int, help="untimed steps per side (default 50, GRIT's inverses exist; 5 --tiny)"
    )
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the chip's dense bf16 peak (H100/H200: 989)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    if args.qlora and (args.device != "cuda" or importlib.util.find_spec("bitsandbytes") is None):
        parser.error("--qlora needs --device cuda and bitsandbytes (pip install '.[gpu]')")
    args.length = args.length or (64 if args.tiny else 512)
    args.warmup = args.warmup if args.warmup is not None else (5 if args.tiny else 50)
    return args


def setup_line(args: argparse.Namespace, config: LlamaConfig, total: int, base_n: int) -> str:
    """What ran: the model and its size, the device, the batch, the schedule of steps."""
    chip = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    memory = "peak allocated bytes" if torch.cuda.is_available() else "peak RSS"  # as common.side_peak_mb
    return (
        f"Llama from config: {config.num_hidden_layers} layers, hidden {config.hidden_size}, FFN "
        f"{config.intermediate_size}, {config.num_attention_heads} heads, vocab {config.vocab_size}: {total:,} "
        f"parameters, N = {base_n:,} outside the input embedding; {DTYPE} weights on {chip}, torch "
        f"{torch.__version__}; batch {args.batch} x {args.length} tokens, AdamW, adapters in float32; "
        f"{args.rounds} x {args.steps} timed steps per side after {args.warmup} warm-up; peak memory of each side "
        f"alone over its first {1 + MEMORY_STEPS} steps ({memory}); MFU against {args.peak_tflops:g} TFLOP/s with "
        "model FLOPs per token 4·N + 6·N_adapter + 12·L·d·s (frozen base: forward + input-gradient backward; full "
        "fine-tuning would be 6·N + 12·L·d·s)"
    )


def main() -> None:
    args = parse_args()
    config = model_config(args.tiny)
    total, base_n = base_parameters(config)
    features = synthetic_features(args.batch * 8, args.length, config.vocab_size)
    sides = make_sides(args, config)
    times = alternate(
        {side.label: side.build(features, args.device) for side in sides}, args.warmup, args.rounds, args.steps
    )
    # after the timing, so that no side pays the process's one-time costs (cuBLAS workspace, kernel caches) alone
    peaks = {side.label: side_peak_mb(partial(side.build, features, args.device), 1, MEMORY_STEPS) for side in sides}
    print(setup_line(args, config, total, base_n))
    header = ["side", "median ms", "min ms", "max ms", f"ratio to {sides[0].label}", "tokens/s", "peak MiB"]
    print_markdown([*header, "model TFLOP/s", "MFU"], result_rows(sides, times, peaks, args, base_n))


if __name__ == "__main__":
    main()
