"""Compressed export of a GRIT-trained LoRA: each module's rank becomes its reprojection rank k_m.

Training keeps every module at rank r with A, B confined to k-dimensional subspaces; the saved adapter carries
the bases (`grit_projectors.safetensors`). Export projects A, B onto them once more, takes the thin SVD of
B A from QR factors (lowrank.py) and keeps k_m components, written as a plain PEFT LoRA with `rank_pattern`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from loralab.adapters.base import check_safetensors, read_json, require_directory, write_side_file
from loralab.adapters.peft_any import ADAPTER_CONFIG, ADAPTER_WEIGHTS, uniform_scaling
from loralab.errors import AdapterError
from loralab.lowrank import truncated_factors

PROJECTORS = "grit_projectors.safetensors"
PEFT_PREFIX = "base_model.model."


def peft_module_name(name: str) -> str:
    """A LoRA module's name inside the base model (what PEFT's target and rank patterns match)."""
    return name.removeprefix(PEFT_PREFIX)


def projector_tensors(bases: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Each module's r×k bases V_a, V_g as the tensors of PROJECTORS, saved beside the adapter."""
    tensors = {}
    for module, (basis_a, basis_g) in bases.items():
        tensors[f"{module}.basis_a"] = basis_a.detach().float().cpu().contiguous()
        tensors[f"{module}.basis_g"] = basis_g.detach().float().cpu().contiguous()
    return tensors


def compress_adapter(directory: Path, out: Path) -> dict[str, int]:
    """Write `directory`'s GRIT adapter at per-module rank k_m into `out`; returns {module: k_m}."""
    directory, out = require_directory(directory), Path(out)
    if not (directory / PROJECTORS).is_file():
        raise AdapterError(
            f"{directory} has no {PROJECTORS}: --compress needs an adapter trained with method.gradient.kind=grit"
        )
    if out.resolve() == directory.resolve():
        raise AdapterError(f"--out must differ from the adapter directory: {out}")
    config = read_json(directory / ADAPTER_CONFIG)
    scaling = uniform_scaling(config, directory)
    for name in (ADAPTER_WEIGHTS, PROJECTORS):
        check_safetensors(directory / name)
    tensors, projectors = load_file(str(directory / ADAPTER_WEIGHTS)), load_file(str(directory / PROJECTORS))
    ranks: dict[str, int] = {}
    for key in [k for k in tensors if k.endswith(".lora_A.weight")]:
        prefix = key.removesuffix(".lora_A.weight")
        module = peft_module_name(prefix)
        dtype, A, B = tensors[key].dtype, tensors[key].float(), tensors[f"{prefix}.lora_B.weight"].float()
        k = A.shape[0]
        if f"{module}.basis_a" in projectors:
            basis_a, basis_g = projectors[f"{module}.basis_a"], projectors[f"{module}.basis_g"]
            A, B, k = basis_a @ (basis_a.T @ A), (B @ basis_g) @ basis_g.T, basis_a.shape[1]
        B_k, A_k = truncated_factors(B, A, k)
        tensors[key] = A_k.to(dtype).contiguous()
        tensors[f"{prefix}.lora_B.weight"] = B_k.to(dtype).contiguous()
        ranks[module] = k
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config |= {
        "rank_pattern": ranks,
        "alpha_pattern": {module: scaling * k for module, k in ranks.items()},
        "use_rslora": False,
    }
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    write_side_file(out, {"adapter": "lora", "compressed_from": str(directory), "ranks": ranks})
    return ranks
