"""The training loop, readable top to bottom.

One optimizer step = one batch of `train.batch_size` examples in `train.grad_accum` micro-batches:
    rule.begin_step → rule.compute_gradients (per micro-batch; regularizer in the loss) → rule.before_step
    → clip (before rule.before_step when rule.clip_first) → non-finite guard → optimizer.step → scheduler.step
    → rule.after_step
then logging, evaluation and checkpoints through the `LoopEvents` the caller provides.

Under data parallelism (P processes) every micro-batch is split into P consecutive parts, one per process, and
the gradients are averaged once per step, after the last micro-batch (see `micro_batches`).
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

from loralab import collectives
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


class LengthGroupedOrder:
    """Seeded batches of examples of similar length (`task.group_by_length`), as HF's LengthGroupedSampler: per
    epoch a permutation cut into mega-batches of 50 batches, each sorted by length (longest first) and cut into
    batches, then the batches shuffled. Less padding per batch; still a function of (seed, epoch, position)."""

    MEGA_BATCHES = 50

    def __init__(self, lengths: list[int], batch_size: int, seed: int) -> None:
        self.lengths, self.batch_size, self.seed = np.asarray(lengths), batch_size, seed
        self.steps_per_epoch = math.ceil(len(lengths) / batch_size)
        self._epoch, self._batches = -1, []

    def batch(self, epoch: int, position: int) -> list[int]:
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, self.epoch_batches(epoch)
        return self._batches[position]

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """Every batch of the epoch, in order (only the last mega-batch can leave a short batch)."""
        generator = np.random.default_rng([self.seed, epoch])
        permutation, size = generator.permutation(len(self.lengths)), self.batch_size
        batches = []
        for start in range(0, len(permutation), self.MEGA_BATCHES * size):
            group = permutation[start : start + self.MEGA_BATCHES * size]
            group = group[np.argsort(-self.lengths[group], kind="stable")]
            batches += [group[i : i + size].tolist() for i in range(0, len(group), size)]
        return [batches[i] for i in generator.permutation(len(batches))]


@dataclass(frozen=True)
class MicroBatch:
    """This process's part of one micro-batch: its first row in the optimizer batch, its examples, its weight."""

    start: int
    indices: list[int]
    weight: float


def micro_batches(indices: list[int], micro_size: int, processes: int = 1, rank: int = 0) -> list[MicroBatch]:
    """The micro-batches of `micro_size` consecutive examples of a batch, each cut into `processes` parts.

    A part's weight is its share of the batch times `processes`, so the average over processes of the weighted
    gradients is the batch gradient: P processes reproduce one process's micro-batches (and its gradient, for
    losses that average over examples; token-averaged losses weight each part by its examples, as the micro-batches
    of gradient accumulation already are).
    """
    parts = []
    for first in range(0, len(indices), micro_size):
        rows = len(indices[first : first + micro_size])
        start, end = first + rows * rank // processes, first + rows * (rank + 1) // processes
        parts.append(MicroBatch(start, indices[start:end], (end - start) * processes / len(indices)))
    return parts


def smallest_part(num_examples: int, batch_size: int, micro_size: int, processes: int) -> int:
    """The fewest examples any process gets in any micro-batch of an epoch (0 means some process would idle)."""
    batches = {min(batch_size, num_examples), num_examples % batch_size} - {0}  # a full batch, an epoch's last
    micro = {size for b in batches for size in (min(micro_size, b), b % micro_size)} - {0}
    return min(micro) // processes


def average_gradients(parameters: list[nn.Parameter], loss: float, tokens: int) -> tuple[float, int]:
    """Mean gradients, mean loss and total tokens over processes; a gradient no process has stays None."""
    if collectives.world_size() == 1:
        return loss, tokens
    device = parameters[0].device
    local = [loss, tokens] + [float(p.grad is not None) for p in parameters]
    scalars = collectives.all_sum(torch.tensor(local, dtype=torch.float64, device=device))
    for parameter, anywhere in zip(parameters, scalars[2:].tolist(), strict=True):
        if anywhere and parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
    collectives.all_mean_([p.grad for p in parameters if p.grad is not None])
    return float(scalars[0]) / collectives.world_size(), int(scalars[1])


def prepare_for_loop(
    accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """`accelerator.prepare` for `train`: the model always, the optimizer only when fp16's gradient scaler needs
    accelerate's wrapper to step it. That wrapper's `step` and `zero_grad` cost about 0.3 ms of importlib and
    `inspect.signature` look-ups per step, and the loop needs nothing else from it (it averages gradients itself)."""
    model = accelerator.prepare(model)
    return model, accelerator.prepare(optimizer) if accelerator.scaler is not None else optimizer


def total_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    return cfg.max_steps if cfg.max_steps is not None else max(1, math.ceil(cfg.epochs * steps_per_epoch))


class LoopEvents(Protocol):
    """What the caller does around the loop: log, evaluate, checkpoint."""

    def log(self, step: int, split: str, metrics: dict[str, float]) -> None: ...

    def after_step(self, state: TrainState, epoch_ended: bool, last: bool) -> None: ...


NON_MODEL_KEYS = frozenset({"token_mask"})  # batch entries for the loop and the rules, not for the forward


def model_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """The task loss transformers computes from `labels` (cross-entropy, or MSE for regression).

    A packed batch runs without the KV cache: transformers builds its block-diagonal mask from `position_ids` only
    when there is neither an attention mask nor a cache (and a model loaded with `use_cache` makes one).
    """
    inputs = {k: v for k, v in batch.items() if k not in NON_MODEL_KEYS}
    if "position_ids" in inputs:
        inputs["use_cache"] = False
    return model(**inputs).loss


def train(
    model: nn.Module,
    features: list[dict],
    rule: GradientRule,
    cfg: TrainConfig,
    accelerator: Accelerator,
    optimizer: torch.optim.Optimizer,
    scheduler,
    state: TrainState,
    order: BatchOrder | LengthGroupedOrder,
    pad_token_id: int,
    events: LoopEvents,
    log_every: int,
) -> TrainState:
    """Run optimizer steps from `state` until the step budget is spent; returns the final state."""
    steps = total_steps(cfg, order.steps_per_epoch)
    micro_size = cfg.batch_size // cfg.grad_accum
    processes, rank = collectives.world_size(), collectives.rank()
    parameters = [p for p in model.parameters() if p.requires_grad]
    model.train()
    while state.step < steps:
        started = time.perf_counter()
        indices = order.batch(state.epoch, state.position)
        state.position += 1
        epoch_ended = state.position >= order.steps_per_epoch
        if epoch_ended:
            state.epoch, state.position = state.epoch + 1, 0

        # forward + backward per micro-batch, each weighted by its share of the batch; one gradient sync per step
        loss_sum, tokens = 0.0, 0
        rule.begin_step(len(indices))
        with accelerator.no_sync(model):
            for part in micro_batches(indices, micro_size, processes, rank):
                micro = collate([features[i] for i in part.indices], pad_token_id)
                tokens += sum(len(features[i]["input_ids"]) for i in part.indices)  # real tokens, packed or not
                batch = {k: v.to(accelerator.device) for k, v in micro.items()}
                rule.locate(part.start)
                loss = rule.compute_gradients(
                    model, batch, model_loss, lambda value, w=part.weight: accelerator.backward(value * w)
                )
                loss_sum += float(loss) * part.weight
        loss_sum, tokens = average_gradients(parameters, loss_sum, tokens)

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
