"""The training loop, readable top to bottom.

One optimizer step = one batch of `train.batch_size` examples in `train.grad_accum` micro-batches:
    rule.begin_step → rule.compute_gradients (per micro-batch; regularizer in the loss) → rule.before_step
    → clip (before rule.before_step when rule.clip_first) → non-finite guard → optimizer.step → scheduler.step
    → rule.after_step
`optimizer_steps` yields after each; the recipe (training/recipe.py) logs, evaluates and checkpoints between them.

Under data parallelism (P processes) every micro-batch is split into P consecutive parts, one per process, and
the gradients are averaged once per step, after the last micro-batch (see `micro_batches`).

On a GPU every read of a device value waits for the device, so the loop reads once per step: the loss (summed on
the device) and the gradient norm together, for the non-finite guard and the log (a rule that reads to decide its
edit, Shake-to-Align, carries them in its own read); rules' tensor metrics are read only on steps that log
(tests/test_host_syncs.py pins the count per method).
"""

from __future__ import annotations

import contextlib
import math
import queue
import resource
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from functools import partial
from typing import Generic, TypeVar

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs
from torch import Tensor, nn

from loralab import collectives
from loralab.config.schema import TrainConfig
from loralab.data.collate import collate
from loralab.gradient.base import GradientRule, host_metrics

T = TypeVar("T")


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


def average_gradients(parameters: list[nn.Parameter], loss: Tensor, tokens: int) -> tuple[Tensor, int]:
    """Mean gradients, mean loss (a float64 tensor) and total tokens over processes; a gradient no process has stays
    None. Under data parallelism this costs one host read per step (which parameters have a gradient anywhere)."""
    if collectives.world_size() == 1:
        return loss, tokens
    device = parameters[0].device
    local = [tokens] + [float(p.grad is not None) for p in parameters]
    scalars = collectives.all_sum(torch.cat([loss.reshape(1), torch.tensor(local, dtype=torch.float64, device=device)]))
    counts = scalars[1:].tolist()
    for parameter, anywhere in zip(parameters, counts[1:], strict=True):
        if anywhere and parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
    collectives.all_mean_([p.grad for p in parameters if p.grad is not None])
    return scalars[0] / collectives.world_size(), int(counts[0])


def prepare_for_loop(
    accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """`accelerator.prepare` for `train`: the model always, the optimizer only when fp16's gradient scaler needs
    accelerate's wrapper to step it. That wrapper's `step` and `zero_grad` cost about 0.3 ms of importlib and
    `inspect.signature` look-ups per step, and the loop needs nothing else from it (it averages gradients itself)."""
    model = accelerator.prepare(model)
    return model, accelerator.prepare(optimizer) if accelerator.scaler is not None else optimizer


def new_accelerator(mixed_precision: str) -> Accelerator:
    """An Accelerator for this run; runs in one process (sweeps, tests) may each ask for another precision.

    accelerate keeps its settings in a process-wide singleton that refuses a second precision, so they are
    reset first; the distributed set-up (PartialState) is kept.
    """
    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(
        mixed_precision=mixed_precision,
        cpu=collectives.cpu_only(),
        # the loop syncs gradients itself, once per step; DDP's per-forward buffer broadcast would be a collective
        # in every forward (and a deadlock when only the main process evaluates)
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
    )


def total_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """The run's optimizer steps: train.max_steps, else train.epochs of the batch order's steps (at least one)."""
    return cfg.max_steps if cfg.max_steps is not None else max(1, math.ceil(cfg.epochs * steps_per_epoch))


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


@dataclass(frozen=True)
class PreparedBatch:
    """One optimizer batch collated ahead of its step: its size, this process's micro-batches (in pinned memory
    for a CUDA device) and their real tokens."""

    examples: int
    micro: list[tuple[MicroBatch, dict[str, Tensor]]]
    tokens: int


def next_position(epoch: int, position: int, steps_per_epoch: int) -> tuple[int, int]:
    """The (epoch, position) of the batch after this one."""
    return (epoch + 1, 0) if position + 1 >= steps_per_epoch else (epoch, position + 1)


def prepared_batches(
    features: list[dict],
    order: BatchOrder | LengthGroupedOrder,
    start: tuple[int, int],
    micro_size: int,
    pad_token_id: int,
    pin: bool,
) -> Iterator[PreparedBatch]:
    """Every batch from `start` (epoch, position) on, in the loop's order, collated (and pinned when `pin`)."""
    processes, rank = collectives.world_size(), collectives.rank()
    epoch, position = start
    while True:
        indices = order.batch(epoch, position)
        micro = []
        for part in micro_batches(indices, micro_size, processes, rank):
            batch = collate([features[i] for i in part.indices], pad_token_id)
            micro.append((part, {k: v.pin_memory() for k, v in batch.items()} if pin else batch))
        tokens = sum(len(features[i]["input_ids"]) for part, _ in micro for i in part.indices)  # packed or not
        yield PreparedBatch(len(indices), micro, tokens)
        epoch, position = next_position(epoch, position, order.steps_per_epoch)


class Prefetcher(Generic[T]):
    """The items of an iterator, made ahead in one background thread with at most `depth` waiting; `close` ends the
    thread. An error in the thread is raised by the `next` that would have returned its item."""

    def __init__(self, items: Iterator[T], depth: int = 2) -> None:
        self.items, self.queue, self.stopped = items, queue.Queue(maxsize=depth), threading.Event()
        self.thread = threading.Thread(target=self.produce, name="loralab-prefetch", daemon=True)
        self.thread.start()

    def produce(self) -> None:
        try:
            for item in self.items:
                self.queue.put((item, None))
                if self.stopped.is_set():
                    return
        except BaseException as error:  # handed to the training thread
            self.queue.put((None, error))

    def __next__(self) -> T:
        item, error = self.queue.get()
        if error is not None:
            raise error
        return item

    def close(self) -> None:
        """Stop and join the thread: once the queue is drained, its one pending `put` returns and it sees the flag."""
        self.stopped.set()
        with contextlib.suppress(queue.Empty):
            while True:
                self.queue.get_nowait()
        self.thread.join()


def accumulate(model: nn.Module, batch: PreparedBatch, rule: GradientRule, accelerator: Accelerator) -> Tensor:
    """Forward and backward every micro-batch of one optimizer batch through the rule, each weighted by its share of
    the batch; the weighted loss sum, in float64 on the device (the host's float sum, bit for bit, without a read)."""
    loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    rule.begin_step(batch.examples)
    for part, micro in batch.micro:
        inputs = {k: v.to(accelerator.device, non_blocking=True) for k, v in micro.items()}  # async from pinned memory
        rule.locate(part.start)
        loss = rule.compute_gradients(
            model, inputs, model_loss, lambda value, w=part.weight: accelerator.backward(value * w)
        )
        loss_sum = loss_sum + loss.double() * part.weight
    return loss_sum


@dataclass
class Step:
    """What one pass through the loop did: an optimizer step (`finite`), or a batch skipped for a non-finite loss
    or gradient. `rule_metrics` may hold device tensors: `train_metrics` reads them, on the steps that log."""

    finite: bool
    epoch_ended: bool  # this batch was its epoch's last
    loss: float
    grad_norm: float
    tokens: int
    seconds: float
    rule_metrics: dict

    def train_metrics(self, lr: float, epoch: float) -> dict[str, float]:
        """The step's row of metrics.csv (split `train`), the rule's tensor metrics read in one transfer."""
        return {
            "loss": self.loss,
            "lr": lr,
            "grad_norm": self.grad_norm,
            "tokens_per_s": self.tokens / self.seconds,
            "step_time_s": self.seconds,
            "peak_mem_mb": peak_memory_mb(),
            "epoch": epoch,
            **host_metrics(self.rule_metrics),
        }


def guard_values(loss_sum: Tensor, parameters: list[nn.Parameter]) -> Tensor:
    """The non-finite guard's values on the device: the loss and the norm of the gradients `.grad` holds now."""
    grads = [p.grad for p in parameters if p.grad is not None]
    return torch.stack([loss_sum, torch.nn.utils.get_total_norm(grads).double()])


def optimizer_steps(
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
    steps: int,
) -> Iterator[Step]:
    """Take batches from `state` on and yield after each, until `state.step` reaches `steps`; `state` advances.

    A non-finite loss or gradient skips the batch (no optimizer step; `state.bad_steps` counts it). On CUDA the next
    batches are collated by a background thread (`Prefetcher`); closing the generator ends that thread.
    """
    parameters = [p for p in model.parameters() if p.requires_grad]
    model.train()
    forward = torch.compile(model) if cfg.compile else model  # training forwards only: evaluation stays eager
    start, pin = (state.epoch, state.position), accelerator.device.type == "cuda"
    prepared = prepared_batches(features, order, start, cfg.batch_size // cfg.grad_accum, pad_token_id, pin)
    # collate ahead only on CUDA, where it overlaps the GPU's work; on a CPU the thread competes with the step (~9 %)
    batches = Prefetcher(prepared) if pin else prepared
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm is not None else math.inf
    try:
        while state.step < steps:
            started = time.perf_counter()
            batch = next(batches)
            state.epoch, state.position = next_position(state.epoch, state.position, order.steps_per_epoch)

            with accelerator.no_sync(model):  # one gradient sync per step, after the last micro-batch
                loss_sum = accumulate(forward, batch, rule, accelerator)
            loss_sum, tokens = average_gradients(parameters, loss_sum, batch.tokens)

            # the gradient rule edits .grad, then clip, step, schedule (clip first for rules that ask for it)
            if accelerator.scaler is not None:
                accelerator.unscale_gradients()
            if rule.reads_in_before_step:
                # the rule reads its statistics anyway: the guard (loss, gradient norm before the rule's edit) rides
                # on that read, the step's one; the norm clipping then finds stays on the device
                guard = partial(guard_values, loss_sum, parameters)
                rule_metrics, (loss_value, grad_norm) = rule.before_step_reading(state.step, guard)
                torch.nn.utils.clip_grad_norm_(parameters, max_norm)
            else:
                rule_metrics = {} if rule.clip_first else rule.before_step(state.step)
                norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
                if rule.clip_first:
                    rule_metrics = rule.before_step(state.step)
                # the step's one host read: loss and gradient norm together, for the non-finite guard and the log
                loss_value, grad_norm = torch.stack([loss_sum, norm.double()]).tolist()
            epoch_ended = state.position == 0
            if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
                optimizer.zero_grad(set_to_none=True)
                state.bad_steps += 1
                yield Step(False, epoch_ended, loss_value, grad_norm, tokens, time.perf_counter() - started, {})
                continue
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            rule_metrics |= rule.after_step(state.step, loss_value)

            seconds = time.perf_counter() - started
            state.seconds += seconds
            state.tokens += tokens
            yield Step(True, epoch_ended, loss_value, grad_norm, tokens, seconds, rule_metrics)
    finally:
        batches.close()


def peak_memory_mb() -> float:
    """Peak accelerator memory if there is a GPU, else the process's peak resident memory."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
