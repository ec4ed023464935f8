"""AdamW over the trainable parameters and the warmup learning-rate schedules."""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import get_scheduler

from loralab.config.schema import TrainConfig

NO_DECAY = ("bias", "layernorm", "layer_norm", "norm.weight", "ln_")


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; biases and norm weights get no weight decay (the transformers Trainer convention)."""
    decay, no_decay = [], []
    for name, parameter in trainable_parameters(model):
        (no_decay if any(k in name.lower() for k in NO_DECAY) else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    """Linear, cosine or constant schedule with `warmup_ratio` of the steps as linear warmup."""
    name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[cfg.scheduler]
    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
