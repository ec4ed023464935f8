"""Parameter efficiency and frozen-base verification: which tensors an adapter adds or trains, and proof that the
base under it is bit-for-bit the base model.

Names are compared in the plain base model's terms: `canonical_names` removes the segments that wrappers insert
(PEFT's `base_model.model`, `base_layer`, `original_module`; a Houlsby bottleneck's `base`), found by module
type rather than by spelling. An adapter tensor is one whose canonical name is not a base parameter (LoRA
factors, DoRA magnitudes, a trained head copy, bottlenecks, prefixes), or one that a loralab-native adapter saved
(full, BitFit: the base's own tensors, trained).

The frozen hash is SHA-256 over one line per tensor, in the order of the sorted canonical names:
`name<TAB>dtype<TAB>shape<TAB>sha256(raw bytes)`. It depends on the values, dtypes and shapes only — not on the
device, the wrappers, or the order of modules — so the base inside an adapted model hashes like a fresh base.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import ModulesToSaveWrapper
from torch import nn

from loralab.adapters.houlsby import Bottleneck

Exclude = Callable[[str], bool]


def wrapped_attribute(module: nn.Module) -> str | None:
    """The child through which a wrapper holds the original module (or model), None for anything else."""
    if isinstance(module, PeftModel):
        return "base_model"
    if isinstance(module, BaseTuner):
        return "model"
    if isinstance(module, BaseTunerLayer):
        return "base_layer"
    if isinstance(module, ModulesToSaveWrapper):
        return "original_module"
    if isinstance(module, Bottleneck):
        return "base"
    return None


def canonical_names(model: nn.Module) -> dict[str, str]:
    """{parameter name: its name in the plain base model}, the wrappers' own path segments removed."""
    skipped = set()
    for path, module in model.named_modules():
        attribute = wrapped_attribute(module)
        if attribute is not None:
            skipped.add(f"{path}.{attribute}" if path else attribute)
    names = {}
    for name, _ in model.named_parameters():
        path, kept = "", []
        for segment in name.split("."):
            path = f"{path}.{segment}" if path else segment
            if path not in skipped:
                kept.append(segment)
        names[name] = ".".join(kept)
    return names


def tensor_digest(tensor: torch.Tensor) -> str:
    """`dtype<TAB>shape<TAB>sha256` of a tensor's raw bytes (any dtype, any device)."""
    data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
    return f"{str(tensor.dtype).removeprefix('torch.')}\t{tuple(tensor.shape)}\t{hashlib.sha256(data).hexdigest()}"


def tensor_digests(model: nn.Module, exclude: Exclude | None = None) -> dict[str, str]:
    """{canonical name: digest} of every parameter whose own name `exclude` does not select."""
    canonical = canonical_names(model)
    return {
        canonical[name]: tensor_digest(parameter)
        for name, parameter in model.named_parameters()
        if exclude is None or not exclude(name)
    }


def combined_hash(digests: dict[str, str]) -> str:
    """SHA-256 over the sorted `name<TAB>digest` lines."""
    lines = "".join(f"{name}\t{digests[name]}\n" for name in sorted(digests))
    return hashlib.sha256(lines.encode()).hexdigest()


def frozen_hash(model: nn.Module, exclude: Exclude | None = None) -> str:
    """SHA-256 of the model's frozen parameters: by default those without requires_grad; `exclude(name)` (the
    model's own parameter names) chooses other ones to leave out."""
    if exclude is None:
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        exclude = trainable.__contains__
    return combined_hash(tensor_digests(model, exclude))


def adapter_parameter_names(model: nn.Module, base_names: Iterable[str], saved: Iterable[str] = ()) -> set[str]:
    """Names (the adapted model's) of the adapter's tensors: not base parameters, or saved by a native adapter."""
    base_names, saved = set(base_names), set(saved)
    return {name for name, canonical in canonical_names(model).items() if canonical not in base_names or name in saved}


def module_type(canonical: str, base_modules: set[str]) -> str:
    """The last name of the deepest base module on a parameter's path: `query` for its LoRA factors and its
    bias, `classifier` for a trained head copy; the first segment for a module outside the base."""
    segments = canonical.split(".")[:-1]
    owner = ""
    for index in range(1, len(segments) + 1):
        path = ".".join(segments[:index])
        if path not in base_modules:
            break
        owner = segments[index - 1]
    return owner or (segments[0] if segments else canonical)


def parameter_efficiency(model: nn.Module, adapter_names: set[str], base_modules: set[str]) -> dict:
    """Adapter vs total parameters of the adapted model, %, and the adapter's count per module type."""
    canonical = canonical_names(model)
    sizes = {name: p.numel() for name, p in model.named_parameters()}
    by_type: dict[str, int] = {}
    for name in sorted(adapter_names):
        kind = module_type(canonical[name], base_modules)
        by_type[kind] = by_type.get(kind, 0) + sizes[name]
    trainable, total = sum(sizes[n] for n in adapter_names), sum(sizes.values())
    return {
        "trainable": trainable,
        "total": total,
        "trainable_percent": 100 * trainable / total if total else 0.0,
        "adapter_tensors": len(adapter_names),
        "by_module_type": dict(sorted(by_type.items(), key=lambda item: -item[1])),
    }


def verify_frozen_base(
    fresh: nn.Module, adapted: nn.Module, adapter_names: set[str], new: Iterable[str] = (), listed: int = 20
) -> dict:
    """Hash the base parameters of a freshly loaded base and those inside the adapted model and compare them.

    The frozen set is every parameter of the fresh base except those its checkpoint lacked (`new`, randomly
    initialised on each load) and those the adapter trains. In the adapted model (loaded as for training), a
    frozen parameter with requires_grad is reported too.
    """
    canonical = canonical_names(adapted)
    trained = {canonical[name] for name in adapter_names}
    frozen = {name for name, _ in fresh.named_parameters()} - set(new) - trained
    fresh_digests = tensor_digests(fresh, lambda name: name not in frozen)
    inside = tensor_digests(adapted, lambda name: name in adapter_names or canonical[name] not in frozen)
    changed = sorted(name for name in frozen & inside.keys() if inside[name] != fresh_digests[name])
    missing = sorted(frozen - inside.keys())
    grads = sorted(canonical[n] for n, p in adapted.named_parameters() if p.requires_grad and n not in adapter_names)
    fresh_hash, inside_hash = combined_hash(fresh_digests), combined_hash(inside)
    return {
        "frozen_base_ok": (fresh_hash == inside_hash) if frozen else None,
        "sha256_fresh_base": fresh_hash,
        "sha256_adapted_base": inside_hash,
        "frozen_tensors": len(frozen),
        "frozen_parameters": sum(p.numel() for n, p in fresh.named_parameters() if n in frozen),
        "changed": changed[:listed],
        "changed_count": len(changed),
        "missing": missing[:listed],
        "excluded_new": sorted(set(new)),
        "no_base_requires_grad": not grads,
        "base_requires_grad": grads[:listed],
    }
