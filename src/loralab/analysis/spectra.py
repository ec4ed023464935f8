"""Per-module statistics of a LoRA adapter from its factors, never forming ΔW = s·B A.

For each LoRA module: ‖A‖_F, ‖B‖_F, the singular values σ of ΔW (s times those of B A, from the thin SVD of
`lowrank.thin_svd`), ‖ΔW‖_F = √Σσ², the entropy effective rank exp(−Σ p log p) with p = σ / Σσ (Roy & Vetterli),
the energy rank at τ (the fewest components holding a share τ of Σσ², `lowrank.energy_rank`), and the rank
utilisation = entropy effective rank / r. A module whose update is zero has ranks 0.

DoRA adapters: the statistics are those of the low-rank direction update s·B A (the magnitude vector rescales
columns on top of it).
"""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from loralab.adapters.compress import peft_module_name
from loralab.adapters.lora import peft_lora_views
from loralab.lowrank import energy_rank, thin_svd

LAYER = re.compile(r"\.(\d+)\.")


def entropy_effective_rank(sigma: Tensor) -> float:
    """exp of the Shannon entropy of σ / Σσ; 0 for an all-zero spectrum."""
    values = sigma.double().clamp(min=0)
    total = values.sum()
    if total <= 0:
        return 0.0
    p = values[values > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def module_statistics(A: Tensor, B: Tensor, scaling: float, tau: float) -> dict:
    """The statistics of one LoRA module with factors A (r×d_in), B (d_out×r) and its scaling."""
    A, B = A.detach(), B.detach()
    _, S, _ = thin_svd(B, A)
    sigma = (abs(scaling) * S).double()
    rank = A.shape[0]
    effective = entropy_effective_rank(sigma)
    energy = energy_rank(sigma.square(), tau, 1, rank) if sigma.sum() > 0 else 0
    return {
        "r": rank,
        "scaling": scaling,
        "norm_A": float(torch.linalg.matrix_norm(A.double())),
        "norm_B": float(torch.linalg.matrix_norm(B.double())),
        "norm_delta": float(sigma.square().sum().sqrt()),
        "singular_values": [float(s) for s in sigma],
        "effective_rank": effective,
        "energy_rank": energy,
        "rank_utilisation": effective / rank,
    }


def short_name(name: str) -> str:
    """`L<layer>.<last name>` for a module inside numbered blocks, else the module's last two names."""
    layer = LAYER.search(f".{name}.")
    return f"L{layer.group(1)}.{name.rsplit('.', 1)[-1]}" if layer else ".".join(name.split(".")[-2:])


def lora_statistics(model: nn.Module, tau: float = 0.9, adapter_name: str = "default") -> list[dict]:
    """The statistics of every PEFT LoRA module of a loaded adapter, in module order ([] for other adapters)."""
    modules = []
    for name, view in peft_lora_views(model, adapter_name).items():
        backbone = peft_module_name(name)
        stats = module_statistics(view.A, view.B, view.scaling, tau)
        modules.append(
            {"module": backbone, "label": short_name(backbone), "type": backbone.rsplit(".", 1)[-1], **stats}
        )
    return modules


def summarise(modules: list[dict]) -> dict:
    """Means over modules of the ranks and utilisation, and the total ‖ΔW‖_F² (as its square root)."""
    if not modules:
        return {"modules": 0}
    count = len(modules)
    return {
        "modules": count,
        "mean_effective_rank": sum(m["effective_rank"] for m in modules) / count,
        "mean_energy_rank": sum(m["energy_rank"] for m in modules) / count,
        "mean_rank_utilisation": sum(m["rank_utilisation"] for m in modules) / count,
        "norm_delta_total": sum(m["norm_delta"] ** 2 for m in modules) ** 0.5,
    }
