"""The GradientRule protocol: what happens between backward and the optimizer step.

The training loop calls, per optimizer step: `begin_step` with the batch size, `compute_gradients` for each
micro-batch in order (the regularizer is added to the loss there), then `before_step` (edit `.grad` in place),
then clipping (before `before_step` instead when `clip_first`), the optimizer step, the scheduler, and
`after_step`; the run writes `diagnostics()` rows to `<name>.csv` and, at the end, what `outputs()` hands it.
`bind_optimizer` hands over the optimizer once it exists; `state_dict`/`load_state_dict` make resume exact.
Metric values may be 0-dim tensors: they stay on the device until a step that logs reads them (`host_metrics`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from loralab.adapters.base import LoraView
from loralab.config.registry import Registry

LossFn = Callable[[nn.Module, dict], Tensor]
Backward = Callable[[Tensor], None]
Metrics = dict[str, float | Tensor]


def host_metrics(metrics: Mapping[str, float | Tensor]) -> dict[str, float]:
    """Metrics as floats, every tensor value read in one device→host transfer (call it only when logging)."""
    tensors = {key: value for key, value in metrics.items() if isinstance(value, Tensor)}
    if not tensors:
        return dict(metrics)
    values = torch.stack([value.detach().double() for value in tensors.values()]).tolist()
    return {**metrics, **dict(zip(tensors, values, strict=True))}


@dataclass
class RuleOutputs:
    """A rule's end-of-training outputs, handed to the recipe (the one writer of the run directory): JSON files for
    the run directory, tensors saved as safetensors files beside the adapter, and whether to also write the adapter
    compressed to its per-module ranks (`adapter_compressed/`)."""

    json_files: dict[str, Any] = field(default_factory=dict)
    adapter_tensors: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    compressed_adapter: bool = False


class GradientRule(Protocol):
    name: str
    clip_first: bool  # clip before `before_step` (a published quirk some rules reproduce); normally False
    reads_in_before_step: bool  # before_step reads device values (one transfer per step): the guard's rides on it

    def attach(self, model: nn.Module, lora_modules: dict[str, LoraView]) -> None:
        """Bind the rule to the model and its LoRA views (hooks go in here)."""

    def bind_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer whose state the rule may edit (it exists only after `attach`)."""

    def begin_step(self, examples: int) -> None:
        """A new optimizer step of `examples` examples starts; its micro-batches follow in order."""

    def locate(self, row: int) -> None:
        """The next micro-batch starts at `row` of the optimizer batch (processes of a data-parallel run each
        take a part of every micro-batch, so the rows a process sees are not consecutive)."""

    def compute_gradients(self, model: nn.Module, batch: dict, loss_fn: LossFn, backward: Backward) -> Tensor:
        """Forward and backward one micro-batch; return the detached task loss."""

    def regularizer(self) -> Tensor | None:
        """A term added to the loss of every micro-batch, or None."""

    def before_step(self, step: int) -> Metrics:
        """Edit `.grad` in place before clipping; return metrics to log."""

    def before_step_reading(self, step: int, guard: Callable[[], Tensor]) -> tuple[Metrics, list[float]]:
        """`before_step` for a rule whose edit depends on device values it reads (`reads_in_before_step`): the
        loop's non-finite guard (`guard()`: loss and gradient norm, a device tensor, taken once `.grad` holds the
        batch gradient and before the rule edits it) is read in the same transfer; the metrics and its values."""

    def after_step(self, step: int, loss: float) -> Metrics:
        """Periodic work after the optimizer step (statistics, reprojection); return metrics to log."""

    def diagnostics(self) -> list[dict]:
        """Per-module rows gathered since the last call (for `<name>.csv`); [] when there are none."""

    def outputs(self) -> RuleOutputs:
        """What the rule leaves at the end of training, for the recipe to write into the run directory."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class RuleDefaults:
    """The protocol's do-nothing defaults: one forward and backward per micro-batch, no edits, no state."""

    name = "none"
    clip_first = False
    reads_in_before_step = False

    def attach(self, model: nn.Module, lora_modules: dict[str, LoraView]) -> None:
        return None

    def bind_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        return None

    def begin_step(self, examples: int) -> None:
        return None

    def locate(self, row: int) -> None:
        return None

    def compute_gradients(self, model: nn.Module, batch: dict, loss_fn: LossFn, backward: Backward) -> Tensor:
        loss = loss_fn(model, batch)
        extra = self.regularizer()
        backward(loss if extra is None else loss + extra)
        return loss.detach()

    def regularizer(self) -> Tensor | None:
        return None

    def before_step(self, step: int) -> Metrics:
        return {}

    def before_step_reading(self, step: int, guard: Callable[[], Tensor]) -> tuple[Metrics, list[float]]:
        values = guard().tolist()
        return self.before_step(step), values

    def after_step(self, step: int, loss: float) -> Metrics:
        return {}

    def diagnostics(self) -> list[dict]:
        return []

    def outputs(self) -> RuleOutputs:
        return RuleOutputs()

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


class NoRule(RuleDefaults):
    """`method.gradient.kind: none` — plain backward, clip, step."""


RuleBuilder = Callable[[Any], GradientRule]  # method.gradient options → the rule
RULES: Registry[RuleBuilder] = Registry("gradient kind")


def register_rule(kind: str, builder: RuleBuilder | None = None) -> Any:
    """Register the builder of a gradient rule: `register_rule(kind, builder)`, or `@register_rule(kind)`."""
    return RULES.register(kind) if builder is None else RULES.register(kind)(builder)
