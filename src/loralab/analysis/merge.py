"""`loralab merge`: fold a PEFT adapter into its base (PEFT `merge_and_unload`), save it as a plain model, and
optionally check it.

The check runs one probe batch through the adapter model (unmerged), the merged model in memory and the merged
model reloaded from disk (the transformers Auto class), and reports max |Δ| of the logits against the adapter
model's; then it times forward passes over the probe batch of the adapter model, the reloaded merged model and
a plain base model: warm-up passes, then rounds in which each side runs `repeats` passes in turn, the order
rotating by one side per round so that drift and a side's place in the round fall on all sides alike.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PromptLearningConfig
from torch import nn

from loralab.adapters.base import read_json
from loralab.adapters.peft_any import ADAPTER_CONFIG, peft_config_class
from loralab.analysis.source import NATIVE_WEIGHTS, AdapterSource, locate, resolve_source, with_dtype
from loralab.diffusion.model import PARTS_FILE
from loralab.errors import AdapterError, ConfigError, first_line
from loralab.evaluation.standalone import default_device
from loralab.models import load_model
from loralab.tables import render

RESULT = "merge_check.json"
SIDES = ("adapter", "merged", "base")


@dataclass
class MergeOutcome:
    out: Path
    check: dict | None = None

    @property
    def ok(self) -> bool:
        return self.check is None or self.check["ok"]


def mergeable_source(path: Path, base: str | None = None, task: str | None = None) -> AdapterSource:
    """`resolve_source`, after refusing in one line the adapters PEFT cannot fold into the base weights."""
    _, adapter, kind = locate(path)
    if kind in NATIVE_WEIGHTS:
        raise AdapterError(
            f"{adapter} is a '{kind}' adapter, not a PEFT adapter: only PEFT adapters merge (full and BitFit "
            "save whole tensors already; houlsby and prefix add modules with no weight to fold into)"
        )
    peft_type = str(read_json(adapter / ADAPTER_CONFIG).get("peft_type", "LORA"))
    if issubclass(peft_config_class(peft_type), PromptLearningConfig):
        raise AdapterError(f"{adapter} is a {peft_type} adapter: prompt learning adds tokens, it cannot merge")
    source = resolve_source(path, base, task)
    if source.diffusion and (adapter / PARTS_FILE).is_file():
        raise AdapterError(
            f"{adapter} carries the diffusion LM's own parts ({PARTS_FILE}), which a merged masked-LM backbone "
            "cannot hold; merge serves adapters of plain transformers models"
        )
    return source


def merge_and_unload(model: nn.Module, directory: Path) -> nn.Module:
    try:
        return model.merge_and_unload()
    except (ValueError, NotImplementedError, AttributeError, RuntimeError) as exc:
        raise AdapterError(f"PEFT cannot merge {directory}: {first_line(exc)}") from None


def logits(model: nn.Module, batch: dict) -> torch.Tensor:
    model.eval()
    with torch.inference_mode():
        return model(**batch).logits.float()


def timed_pass(model: nn.Module, batch: dict, device: torch.device) -> float:
    """Seconds of one forward pass (synchronised on CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    with torch.inference_mode():
        model(**batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def alternate_passes(
    models: dict[str, nn.Module], batch: dict, device: torch.device, rounds: int, repeats: int, warmup: int
) -> dict[str, list[float]]:
    """Forward-pass times per side: `warmup` untimed passes each, then `rounds` rotating rounds of `repeats`."""
    for model in models.values():
        model.eval()
        for _ in range(warmup):
            timed_pass(model, batch, device)
    names = list(models)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(rounds):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            times[name] += [timed_pass(models[name], batch, device) for _ in range(repeats)]
    return times


def latency_summary(times: dict[str, list[float]], reference: str = "base") -> dict[str, dict]:
    base = statistics.median(times[reference])
    return {
        name: {
            "median_ms": 1e3 * statistics.median(values),
            "min_ms": 1e3 * min(values),
            "max_ms": 1e3 * max(values),
            "ratio_to_base": statistics.median(values) / base,
            "passes": len(values),
        }
        for name, values in times.items()
    }


def latency_table(summary: dict[str, dict]) -> str:
    """The latency summary as a Markdown table (side, median/min/max ms, ratio of medians to the base)."""
    header = ["side", "median ms", "min ms", "max ms", "ratio to base"]
    rows = [
        [name, *(f"{side[key]:.3f}" for key in ("median_ms", "min_ms", "max_ms")), f"{side['ratio_to_base']:.3f}"]
        for name, side in summary.items()
    ]
    return render(header, rows, "md")


def merge_adapter(
    source: AdapterSource,
    out: Path,
    dtype: str = "float32",
    check: bool = False,
    probe: int = 8,
    tol: float = 1e-5,
    rounds: int = 6,
    repeats: int = 5,
    warmup: int = 3,
) -> MergeOutcome:
    """Merge the adapter into its base in `dtype`, save the model and tokenizer to `out`, check if asked.

    `source` comes from `mergeable_source`; PEFT's own refusal to merge is an AdapterError too.
    """
    out = Path(out)
    if out.resolve() in (source.adapter.resolve(), source.adapter.parent.resolve()):
        raise ConfigError(f"--out must be a new directory, not the adapter's or its run's: {out}")
    if min(probe, rounds, repeats) < 1 or warmup < 0 or tol < 0:
        raise ConfigError("--probe-batch, rounds and repeats must be >= 1, warmup and --tol >= 0")
    source = with_dtype(source, dtype)
    device = default_device()
    adapted, tokenizer = source.load_adapted(device=device)
    adapted.eval()
    merged = merge_and_unload(copy.deepcopy(adapted) if check else adapted, source.adapter)
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    if not check:
        return MergeOutcome(out)

    batch, origin = source.probe_batch(tokenizer, probe)
    batch = {key: value.to(device) for key, value in batch.items()}
    reference = logits(adapted, batch)
    in_memory = (logits(merged, batch) - reference).abs().max().item()
    del merged
    reloaded, _ = load_model(dataclasses.replace(source.model, name=str(out)), source.head, source.num_labels)
    reloaded = reloaded.to(device)
    reload_diff = (logits(reloaded, batch) - reference).abs().max().item()
    base, _, _ = source.load_base()
    models = dict(zip(SIDES, (adapted, reloaded, base.to(device)), strict=True))
    summary = latency_summary(alternate_passes(models, batch, device, rounds, repeats, warmup))
    result = {
        "adapter": str(source.adapter),
        "base": source.model.name,
        "merged": str(out),
        "dtype": dtype,
        "device": str(device),
        "probe": {"source": origin, "texts": probe, "shape": list(batch["input_ids"].shape)},
        "max_abs_diff": in_memory,
        "reload_max_abs_diff": reload_diff,
        "tol": tol,
        "ok": max(in_memory, reload_diff) <= tol,
        "latency": summary,
        "timing": {"rounds": rounds, "repeats": repeats, "warmup": warmup},
    }
    (out / RESULT).write_text(json.dumps(result, indent=2) + "\n")
    return MergeOutcome(out, result)
