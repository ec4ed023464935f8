"""How far the calibration dtype and the calibration tokens move the spectral-edit sensitivities g = ∂L/∂σ.

A tiny Llama (random weights, a tokenizer that adds BOS) carries a LoRA with random A, B on o_proj and down_proj
(r 8, α 16). g is calibrated through loralab's own path (PEFT load, thin SVDs, hooks) on `--samples` examples of
`synthetic/arithmetic`, in batches of 2, with the base model in float64 (the reference), float32, bfloat16 and
float16, and in float64 with the published tool's tokenization (no BOS). Per side: the largest |g − g_ref| over
a module relative to that module's max|g_ref| (worst module, and the mean over modules), and how many modules'
abs_select core set (the round(0.2 r) directions of largest |g|) differs from the reference's.

    python benchmarks/spectral_dtype.py [--samples 32] [--device cpu|cuda] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from loralab.adapters.peft_any import load_peft_adapter
from loralab.config.load import load_task_config
from loralab.config.schema import ModelConfig
from loralab.data import load_task
from loralab.edit.rules import selection_counts
from loralab.edit.spectral import calibrate, read_adapter, select_modules, spectral_bases
from loralab.models import load_model

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def make_adapter(directory: Path) -> Path:
    """A tiny-llama LoRA with random A and B (σ spread like a trained adapter's) saved as a PEFT adapter."""
    model, _ = load_model(ModelConfig("tiny-llama", "causal_lm", "float32", "none", False, False, None), "causal_lm")
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["o_proj", "down_proj"], init_lora_weights=False)
    torch.manual_seed(0)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    peft_model.save_pretrained(str(directory))
    return directory


def sensitivities(directory: Path, dtype: str, tokenization: str, samples: int, device: str) -> dict[str, torch.Tensor]:
    """g per module, calibrated with the base model (and PEFT's adapter) in `dtype`."""
    loaded = "float32" if dtype == "float64" else dtype
    model, tokenizer = load_model(
        ModelConfig("tiny-llama", "causal_lm", loaded, "none", False, False, None), "causal_lm"
    )
    model = load_peft_adapter(model.to(device), directory)
    if dtype == "float64":
        model = model.double()
    model.eval()
    _, tensors, _ = read_adapter(directory)
    bases = spectral_bases(model, select_modules(list(tensors), ("o_proj", "down_proj"), None, None), tensors, device)
    task = load_task(
        load_task_config(name="synthetic/arithmetic", max_length=512, train_samples=samples, eval_samples=1)
    )
    calibrate(model, tokenizer, task, bases, 2, 512, samples, tokenization)
    return {name: basis.g.cpu() for name, basis in bases.items()}


def core(g: torch.Tensor) -> set[int]:
    k_core, _ = selection_counts(g.numel(), 0.2, 0.2)
    return set(torch.argsort(g.abs(), descending=True, stable=True)[:k_core].tolist())


def compare(side: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict[str, float]:
    errors = [float((side[n] - g).abs().max() / g.abs().max()) for n, g in reference.items()]
    changed = sum(core(side[n]) != core(g) for n, g in reference.items())
    return {"worst": max(errors), "mean": statistics.fmean(errors), "core_changed": changed, "modules": len(errors)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        directory = make_adapter(Path(scratch) / "adapter")
        reference = sensitivities(directory, "float64", "loralab", args.samples, args.device)
        sides = {f"{dtype}, loralab tokens": (dtype, "loralab") for dtype in ("float32", "bfloat16", "float16")}
        sides["float64, published tokens (no BOS)"] = ("float64", "published")
        rows = {label: compare(sensitivities(directory, *side, args.samples, args.device), reference)
                for label, side in sides.items()}  # fmt: skip
    print(f"| side (against float64, loralab tokens; {args.samples} samples, {args.device}) | worst module max|Δg| / "
          "max|g| | mean over modules | modules whose core set changes |")  # fmt: skip
    print("| --- | --- | --- | --- |")
    for label, row in rows.items():
        print(f"| {label} | {row['worst']:.2e} | {row['mean']:.2e} | {row['core_changed']} of {row['modules']} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
