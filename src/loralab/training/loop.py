"""The training loop, readable top to bottom.

One optimizer step = one batch of `train.batch_size` examples in `train.grad_accum` micro-batches:
    rule.begin_step → rule.compute_gradients (per micro-batch; regularizer in the loss) → rule.before_step
    → clip (before rule.before_step when rule.clip_first) → non-finite guard → optimizer.step → scheduler.step
    → rule.after_step
then logging, evaluation and checkpoints through the `LoopEvents` the caller provides.
"""

from __future__ import annotations

import math
import resource
import time
from dataclasses import asdict, dataclass
from typing import Protocol

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn

from loralab.config.schema import TrainConfig
from loralab.data.collate import collate
from loralab.errors import LoraLabError
from loralab.gradient.base import GradientRule


@dataclass
class TrainState:
    """Where training is; saved in every checkpoint so a resume continues at the same batch."""

    step: int = 0
    epoch: int = 0
    position: int = 0  # optimizer batches already taken from this epoch
    bad_steps: int = 0
    tokens: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


class BatchOrder:
    """Seeded example order per epoch: batch b of epoch e is a fixed slice of a fixed permutation."""

    def __init__(self, num_examples: int, batch_size: int, seed: int) -> None:
        self.num_examples, self.batch_size, self.seed = num_examples, batch_size, seed
        self.steps_per_epoch = math.ceil(num_examples / batch_size)
        self._epoch, self._permutation = -1, np.arange(0)

    def batch(self, epoch: int, position: int) -> list[int]:
        if epoch != self._epoch:
            self._epoch, self._permutation = (
                epoch,
                np.random.default_rng([self.seed, epoch]).permutation(self.num_examples),
            )
        return self._permutation[position * self.batch_size : (position + 1) * self.batch_size].tolist()


def total_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    return cfg.max_steps if cfg.max_steps is not None else max(1, math.ceil(cfg.epochs * steps_per_epoch))


class LoopEvents(Protocol):
    """What the caller does around the loop: log, evaluate, checkpoint."""

    def log(self, step: int, split: str, metrics: dict[str, float]) -> None: ...

    def after_step(self, state: TrainState, epoch_ended: bool, last: bool) -> None: ...


def model_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """The task loss transformers computes from `labels` (cross-entropy, or MSE for regression)."""
    return model(**batch).loss


def train(
    model: nn.Module,
    features: list[dict],
    rule: GradientRule,
    cfg: TrainConfig,
    accelerator: Accelerator,
    optimizer: torch.optim.Optimizer,
    scheduler,
    state: TrainState,
    order: BatchOrder,
    pad_token_id: int,
    events: LoopEvents,
    log_every: int,
) -> TrainState:
    """Run optimizer steps from `state` until the step budget is spent; returns the final state."""
    steps = total_steps(cfg, order.steps_per_epoch)
    micro_size = cfg.batch_size // cfg.grad_accum
    parameters = [p for p in model.parameters() if p.requires_grad]
    model.train()
    while state.step < steps:
        started = time.perf_counter()
        indices = order.batch(state.epoch, state.position)
        state.position += 1
        epoch_ended = state.position >= order.steps_per_epoch
        if epoch_ended:
            state.epoch, state.position = state.epoch + 1, 0

        # forward + backward per micro-batch, each weighted by its share of the batch
        loss_sum, tokens = 0.0, 0
        rule.begin_step(len(indices))
        for start in range(0, len(indices), micro_size):
            micro = [features[i] for i in indices[start : start + micro_size]]
            batch = {k: v.to(accelerator.device) for k, v in collate(micro, pad_token_id).items()}
            weight = len(micro) / len(indices)
            loss = rule.compute_gradients(
                model, batch, model_loss, lambda value, w=weight: accelerator.backward(value * w)
            )
            loss_sum += float(loss) * weight
            tokens += int(batch["attention_mask"].sum())

        # the gradient rule edits .grad, then clip, step, schedule (clip first for rules that ask for it)
        if accelerator.scaler is not None:
            accelerator.unscale_gradients()
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm is not None else math.inf
        rule_metrics = {} if rule.clip_first else rule.before_step(state.step)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(parameters, max_norm))
        if rule.clip_first:
            rule_metrics = rule.before_step(state.step)
        if not (math.isfinite(loss_sum) and math.isfinite(grad_norm)):
            optimizer.zero_grad(set_to_none=True)
            state.bad_steps += 1
            events.log(state.step, "train", {"bad_step": 1.0, "bad_steps": float(state.bad_steps)})
            if state.bad_steps > cfg.max_bad_steps:
                raise LoraLabError(
                    f"training diverged: {state.bad_steps} steps with a non-finite loss or gradient "
                    f"(train.max_bad_steps={cfg.max_bad_steps}); lower train.lr or enable train.max_grad_norm"
                )
            continue
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        rule_metrics |= rule.after_step(state.step, loss_sum)

        seconds = time.perf_counter() - started
        state.seconds += seconds
        state.tokens += tokens
        if state.step % log_every == 0 or state.step == steps:
            events.log(
                state.step,
                "train",
                {
                    "loss": loss_sum,
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": grad_norm,
                    "tokens_per_s": tokens / seconds,
                    "step_time_s": seconds,
                    "peak_mem_mb": peak_memory_mb(),
                    "epoch": state.epoch + state.position / order.steps_per_epoch,
                    **rule_metrics,
                },
            )
        events.after_step(state, epoch_ended, state.step == steps)
    return state


def peak_memory_mb() -> float:
    """Peak accelerator memory if there is a GPU, else the process's peak resident memory."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
