"""Trajectory LoRA (LoRA-Diffusion): step-adaptive, prompt-conditioned low-rank perturbations of hidden states.

A sample's phase follows its t: early (t > 2/3), mid (1/3 < t ≤ 2/3), late (t ≤ 1/3). Phase p has a bank of k
modules g_i(h, c) = W_up,i [(1 + γ_i(c)) ⊙ W_down,i h] + β_i(c) of rank r_p, and the hidden states h at each
site (the last hidden state, or every encoder layer's output) get δ = σ_p Σ_i g_i(h, c). c is the mean of the
frozen backbone's hidden states at that site over the prompt tokens (optionally standardised per feature),
projected to `cond_dim` by a trainable linear map. W_up, γ and β start at zero, so the adapter is a no-op at
init. Not expressible as a PEFT adapter: it is saved as `trajectory_lora.safetensors` + `trajectory_lora.json`.
Where this differs from the LoRA-Diffusion paper and its published code: docs/methods/lora_diffusion.md §4, §6.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.nn import functional as F

from loralab.adapters.base import LoraView, check_safetensors, read_json, require_directory, write_side_file
from loralab.config.schema import TrajectoryLoraOptions
from loralab.diffusion.model import Conditioning, MaskedDiffusionLM
from loralab.errors import AdapterError

WEIGHTS, CONFIG = "trajectory_lora.safetensors", "trajectory_lora.json"
PHASE_BOUNDS = (2 / 3, 1 / 3)  # early above the first, late at or below the second


def phase_of(t: Tensor) -> Tensor:
    """0 (early), 1 (mid) or 2 (late) for each t."""
    return (t <= PHASE_BOUNDS[0]).long() + (t <= PHASE_BOUNDS[1]).long()


class FilmLowRank(nn.Module):
    """g(h, c) = W_up [(1 + γ(c)) ⊙ W_down h] + β(c)."""

    def __init__(self, hidden: int, rank: int, cond_dim: int) -> None:
        super().__init__()
        self.down = nn.Linear(hidden, rank, bias=False)  # Kaiming-uniform, nn.Linear's default
        self.up = nn.Linear(rank, hidden, bias=False)
        self.gamma = nn.Linear(cond_dim, rank)
        self.beta = nn.Linear(cond_dim, hidden)
        for zero in (self.up.weight, self.gamma.weight, self.gamma.bias, self.beta.weight, self.beta.bias):
            nn.init.zeros_(zero)

    def forward(self, h: Tensor, c: Tensor) -> Tensor:
        return self.up(self.down(h) * (1 + self.gamma(c))[:, None, :]) + self.beta(c)[:, None, :]


class PhaseBank(nn.Module):
    """The k modules of one phase at one site, and their scale σ_p."""

    def __init__(self, hidden: int, rank: int, scale: float, count: int, cond_dim: int) -> None:
        super().__init__()
        self.scale = scale
        self.members = nn.ModuleList(FilmLowRank(hidden, rank, cond_dim) for _ in range(count))

    def forward(self, h: Tensor, c: Tensor) -> Tensor:
        return self.scale * sum(member(h, c) for member in self.members)

    def orthogonality(self) -> Tensor:
        """Σ_{i<j} ‖W_down,i W_down,jᵀ‖²_F over the bank's members."""
        downs = [m.down.weight for m in self.members]
        pairs = [(i, j) for i in range(len(downs)) for j in range(i + 1, len(downs))]
        return sum((((downs[i] @ downs[j].T) ** 2).sum() for i, j in pairs), downs[0].new_zeros(()))


class CodeStandardizer(nn.BatchNorm1d):
    """Per-feature standardisation of the pooled prompt code (`cond_norm: standardize`): batch statistics in
    training, running ones in sampling and for a batch of one. It removes the part all prompts share."""

    def __init__(self, hidden: int) -> None:
        super().__init__(hidden, affine=False)

    def forward(self, pooled: Tensor) -> Tensor:
        if self.training and len(pooled) > 1:
            return super().forward(pooled)
        return F.batch_norm(pooled, self.running_mean, self.running_var, training=False, eps=self.eps)


class TrajectoryLora(nn.Module):
    """The banks of every site, the condition projection, and the regularisers."""

    def __init__(self, options: TrajectoryLoraOptions, hidden: int, sites: int) -> None:
        super().__init__()
        self.options = options
        self.enabled = True
        standardize = options.cond_norm == "standardize"
        self.normalize = nn.ModuleList(CodeStandardizer(hidden) if standardize else nn.Identity() for _ in range(sites))
        self.condition = nn.Linear(hidden, options.cond_dim)
        self.sites = nn.ModuleList(
            nn.ModuleList(
                PhaseBank(hidden, rank, scale, options.modules_per_phase, options.cond_dim)
                for rank, scale in zip(options.ranks, options.scales, strict=True)
            )
            for _ in range(sites)
        )

    def perturb(self, site: int, h: Tensor, conditioning: Conditioning) -> Tensor:
        """h + δ at one site, each sample through the bank of its phase."""
        prompt = conditioning.prompt_mask.to(h.dtype)[..., None]
        pooled = (h * prompt).sum(dim=1) / prompt.sum(dim=1).clamp_min(1)
        c = self.condition(self.normalize[site](pooled))
        phases = phase_of(conditioning.t)
        delta = torch.zeros_like(h)
        for phase, bank in enumerate(self.sites[site]):
            rows = (phases == phase).nonzero().squeeze(1)
            if len(rows):
                delta = delta.index_put((rows,), bank(h[rows], c[rows]))
        return h + delta

    def regularization_loss(self) -> Tensor:
        """λ_rank Σ (‖W_down‖² + ‖W_up‖²) + λ_orth Σ_banks Σ_{i<j} ‖W_down,i W_down,jᵀ‖²."""
        banks = [bank for site in self.sites for bank in site]
        rank = sum((m.down.weight**2).sum() + (m.up.weight**2).sum() for bank in banks for m in bank.members)
        orth = sum(bank.orthogonality() for bank in banks)
        return self.options.lambda_rank * rank + self.options.lambda_orth * orth


def encoder_layers(backbone: nn.Module) -> nn.ModuleList:
    """The backbone's list of transformer layers (the longest ModuleList of `num_hidden_layers` entries)."""
    count = backbone.config.num_hidden_layers
    for module in backbone.base_model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    raise AdapterError(f"cannot find the {count} encoder layers of {type(backbone).__name__}")


def replace_hidden(output, hidden: Tensor):
    """The module output with its hidden states (a tensor, a tuple's first item, or last_hidden_state) replaced."""
    if isinstance(output, Tensor):
        return hidden
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    output.last_hidden_state = hidden
    return output


def hidden_of(output) -> Tensor:
    if isinstance(output, Tensor):
        return output
    return output[0] if isinstance(output, tuple) else output.last_hidden_state


class TrajectoryLoraAdapter:
    """`method.adapter.kind: trajectory_lora` on a MaskedDiffusionLM, active in training and in sampling."""

    name = "trajectory_lora"

    def __init__(self, options: TrajectoryLoraOptions) -> None:
        self.options = options

    def apply(self, model: MaskedDiffusionLM) -> MaskedDiffusionLM:
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        model.train_own_parts()
        hosts = (
            list(encoder_layers(model.backbone))
            if self.options.apply_to == "every_layer"
            else [model.backbone.base_model]
        )
        backbone_dtype = next(model.backbone.parameters()).dtype
        model.trajectory = TrajectoryLora(self.options, model.config.hidden_size, len(hosts)).to(backbone_dtype)
        for site, host in enumerate(hosts):
            host.register_forward_hook(self.site_hook(model, site))
        return model

    @staticmethod
    def site_hook(model: MaskedDiffusionLM, site: int):
        def hook(module: nn.Module, inputs, output):
            trajectory, conditioning = model.trajectory, model.conditioning
            if conditioning is None or not trajectory.enabled:
                return output
            return replace_hidden(output, trajectory.perturb(site, hidden_of(output), conditioning))

        return hook

    def lora_modules(self, model: nn.Module) -> dict[str, LoraView]:
        return {}

    def save(self, model: MaskedDiffusionLM, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in model.trajectory.state_dict().items()}
        save_file(tensors, str(directory / WEIGHTS))
        sites = len(model.trajectory.sites)
        (directory / CONFIG).write_text(json.dumps({**asdict(self.options), "sites": sites}, indent=2) + "\n")
        model.save_own_parts(directory)
        write_side_file(directory, {"adapter": self.name, "model_kind": "masked_diffusion"})

    def load(self, model: MaskedDiffusionLM, directory: Path) -> MaskedDiffusionLM:
        directory = require_directory(directory)
        saved_options = read_json(directory / CONFIG)
        saved_options.pop("sites", None)
        try:
            self.options = TrajectoryLoraOptions(**saved_options)
        except TypeError as exc:
            raise AdapterError(f"malformed {directory / CONFIG}: {exc}") from None
        check_safetensors(directory / WEIGHTS)
        model = self.apply(model)
        try:
            model.trajectory.load_state_dict(load_file(str(directory / WEIGHTS)))
        except RuntimeError as exc:
            raise AdapterError(f"{directory / WEIGHTS} does not fit this model: {str(exc).splitlines()[0]}") from None
        model.load_own_parts(directory)
        return model


@contextmanager
def trajectory_disabled(model: MaskedDiffusionLM) -> Iterator[None]:
    """Switch the trajectory adapter off (the base diffusion LM alone) inside the block."""
    model.trajectory.enabled = False
    try:
        yield
    finally:
        model.trajectory.enabled = True
