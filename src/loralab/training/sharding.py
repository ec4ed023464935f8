"""FSDP under an accelerate FSDP launch: FSDP2 shards the frozen base, block by block, across the processes; the
adapter's trainable parameters stay whole on every process, so the loop, the gradient rules and saving are those
of plain data parallelism (docs/parallel.md)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from loralab import collectives
from loralab.adapters.params import combined_hash, tensor_digest
from loralab.errors import ConfigError

WRAP_POLICIES = ("TRANSFORMER_BASED_WRAP", "NO_WRAP")


@dataclass(frozen=True)
class ShardingPlan:
    """What to shard: each block of these classes (none named: the model's `_no_split_modules`) and then the root,
    or with `per_block` off (NO_WRAP) the root alone."""

    block_classes: tuple[str, ...]
    per_block: bool
    reshard_after_forward: bool


def flag(environ: Mapping[str, str], name: str) -> bool:
    return environ.get(name, "").lower() == "true"


def read_plan(environ: Mapping[str, str] = os.environ) -> ShardingPlan | None:
    """The plan an accelerate FSDP launch's environment asks for (None outside one); unsupported settings raise."""
    if flag(environ, "ACCELERATE_USE_DEEPSPEED"):
        raise ConfigError(
            "DeepSpeed is not supported: launch with an FSDP or DDP accelerate config, torchrun or loralab launch local"
        )
    if not flag(environ, "ACCELERATE_USE_FSDP"):
        return None
    refused = {
        "FSDP_VERSION=1": environ.get("FSDP_VERSION", "1") == "1",
        "fsdp_offload_params": flag(environ, "FSDP_OFFLOAD_PARAMS"),
        "fsdp_activation_checkpointing (use model.gradient_checkpointing)": flag(
            environ, "FSDP_ACTIVATION_CHECKPOINTING"
        ),
    }
    policy = environ.get("FSDP_AUTO_WRAP_POLICY", "NO_WRAP")
    refused[f"fsdp_auto_wrap_policy={policy}"] = policy not in WRAP_POLICIES
    unsupported = [name for name, present in refused.items() if present]
    if unsupported:
        raise ConfigError(
            f"FSDP setting not supported: {unsupported[0]}; loralab shards the frozen base with FSDP2 "
            "(fsdp_version: 2, TRANSFORMER_BASED_WRAP or NO_WRAP, no offload; docs/parallel.md)"
        )
    classes = environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "")
    return ShardingPlan(
        block_classes=tuple(name.strip() for name in classes.split(",") if name.strip()),
        per_block=policy == "TRANSFORMER_BASED_WRAP",
        reshard_after_forward=environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() != "false",
    )


def refuse_unshardable(method: Any) -> None:
    """Refuse what FSDP cannot run: an adapter that trains every parameter (nothing frozen to shard) and
    Shake-to-Align's microbatch route (its forward passes per process differ; each one needs every process)."""
    if method.adapter.kind == "full":
        raise ConfigError(
            "FSDP shards the frozen base, and method.adapter.kind=full trains every parameter: launch full "
            "fine-tuning with DDP (a DDP accelerate config, torchrun or loralab launch local)"
        )
    if getattr(method.gradient, "route", None) == "microbatch":
        raise ConfigError(
            "FSDP needs the same forward passes in every process, which method.gradient.route=microbatch does not "
            "run; use method.gradient.route=vectorized"
        )


def blocks(model: nn.Module, plan: ShardingPlan) -> list[nn.Module]:
    """The transformer blocks to shard one by one: modules of the named classes, else of `_no_split_modules`."""
    if not plan.per_block:
        return []
    names = set(plan.block_classes) or {
        name for module in model.modules() for name in getattr(module, "_no_split_modules", None) or ()
    }
    found = [module for module in model.modules() if type(module).__name__ in names][::-1]  # inner ones first
    if not found:
        raise ConfigError(
            f"FSDP: the model has no block of class {', '.join(sorted(names)) or '(none named)'}; set "
            "fsdp_transformer_layer_cls_to_wrap in the accelerate config to the model's block class"
        )
    return found


def shard_frozen_base(model: nn.Module, plan: ShardingPlan) -> None:
    """Shard every frozen parameter (each block, then the root) over all processes; trainable ones stay whole.

    Call after the model is on its device. Generation then keeps the processes stepping together, as
    transformers does for the models it shards itself.
    """
    trainable = {p for p in model.parameters() if p.requires_grad}
    for block in blocks(model, plan):
        fully_shard(block, reshard_after_forward=plan.reshard_after_forward, ignored_params=trainable)
    fully_shard(model, reshard_after_forward=plan.reshard_after_forward, ignored_params=trainable)
    for module in model.modules():
        module._is_fsdp_managed_module = True


def shard_hash(model: nn.Module) -> str:
    """SHA-256 of this process's shards of the frozen parameters (whole tensors for those not sharded)."""
    return combined_hash(
        {
            name: tensor_digest(p.to_local() if isinstance(p, DTensor) else p)
            for name, p in model.named_parameters()
            if not p.requires_grad
        }
    )


def prepare_sharded(
    accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer, plan: ShardingPlan
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The FSDP counterpart of `prepare_for_loop`: accelerate's device placement and autocast but no wrapper of its
    own (its FSDP would shard the adapter too); the main process's trainable values, as DDP's broadcast gave; then
    the frozen base sharded."""
    model = accelerator.prepare_model(model, device_placement=True, evaluation_mode=True)
    with torch.no_grad():
        collectives.broadcast_([p.data for p in model.parameters() if p.requires_grad])
    shard_frozen_base(model, plan)
    return model, accelerator.prepare_optimizer(optimizer) if accelerator.scaler is not None else optimizer
