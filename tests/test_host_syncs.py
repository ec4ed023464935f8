"""The GPU-ready loop on the CPU: device→host reads per optimizer step, pinned per method (docs/gpu.md, "Host
reads"), the batches a background thread prepares ahead, and `train.compile`.

A `TorchFunctionMode` counts every call that reads a tensor's value back to the host (`item`, `float()`, `int()`,
`bool()`, `tolist`, `cpu`, `numpy`, `nonzero`, ...) made directly by loralab's own code, between one step's end and
the next, over 10 steps of 4 micro-batches that do not log (only the run's last step does). On a GPU each such read
waits for the device. Reads inside torch and transformers are not loralab's and are not counted (AdamW's step
counter lives on the host anyway).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from torch import Tensor
from torch.overrides import TorchFunctionMode

from loralab.config import RunConfig, load_config
from loralab.errors import ConfigError
from loralab.training.loop import (
    BatchOrder,
    Prefetcher,
    TrainState,
    new_accelerator,
    optimizer_steps,
    prepare_for_loop,
)
from loralab.training.optim import build_optimizer, build_scheduler
from loralab.training.recipe import RunParts, prepare

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:Full backward hook is firing")]

READS = frozenset(
    {"item", "__float__", "__int__", "__index__", "__bool__", "tolist", "cpu", "numpy", "nonzero", "equal"}
)
LORALAB = str(Path(__import__("loralab").__file__).parent)
STEPS = 10
COMMON = ["task.train_samples=64", "train.batch_size=8", "train.grad_accum=4", "train.warmup_ratio=0"]
LLAMA = ["model.name=tiny-llama", "task.name=synthetic/arithmetic", "task.max_length=256", "method.adapter.dropout=0"]
GRIT = [  # a covariance recording every 2nd step (every 8th backward); fixed periods, no inversion while counted
    "method.name=grit",
    "method.gradient.cov_update_freq=8",
    "method.gradient.kfac_update_freq=11",
    "method.gradient.reprojection_freq=11",
    "method.gradient.kfac_min_samples=16",
    "method.gradient.adaptive=false",
]


class HostReads(TorchFunctionMode):
    """Counts host reads whose caller is loralab's code; `per_step` holds one count per finished step."""

    def __init__(self) -> None:
        super().__init__()
        self.count, self.per_step = 0, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in READS and sys._getframe(1).f_code.co_filename.startswith(LORALAB):
            self.count += 1
        return func(*args, **(kwargs or {}))

    def step_done(self) -> None:
        self.per_step.append(self.count)
        self.count = 0


def reads_per_step(
    tmp_path: Path, overrides: list[str], warmup: int = 0, before: Callable[[RunParts], None] | None = None
) -> tuple[list[int], RunParts]:
    """Host reads in each of `STEPS` steps that follow `warmup` uncounted ones, on the real loop; and the parts.
    `before` sees the parts before training."""
    config: RunConfig = load_config([], [*COMMON, *overrides, f"io.root={tmp_path}"])
    parts = prepare(config)
    if before is not None:
        before(parts)
    accelerator = new_accelerator("no")
    model, optimizer = prepare_for_loop(accelerator, parts.model, build_optimizer(parts.model, config.train))
    parts.rule.bind_optimizer(optimizer)
    scheduler = build_scheduler(optimizer, config.train, warmup + STEPS)
    order = BatchOrder(len(parts.features), config.train.batch_size, config.seed)
    state, counter, pad = TrainState(), HostReads(), parts.tokenizer.pad_token_id

    def advance(steps: int) -> None:
        """Steps up to `steps`, the last one logged as the recipe logs a run's last step (log.every is never due)."""
        for step in optimizer_steps(
            model, parts.features, parts.rule, config.train, accelerator, optimizer, scheduler, state, order, pad, steps
        ):
            if state.step == steps:
                step.train_metrics(scheduler.get_last_lr()[0], state.epoch)
            counter.step_done()

    if warmup:
        advance(warmup)
    with counter:
        advance(warmup + STEPS)
    return counter.per_step[-STEPS:], parts


def test_baseline_reads_once_per_step(tmp_path):
    """LoRA, no rule: the non-finite guard's one read (loss and gradient norm together), nothing per micro-batch."""
    reads, _ = reads_per_step(tmp_path, [*LLAMA, "method.name=lora"])
    assert reads == [1] * STEPS


OURS = ["model.name=tiny-bert", "method.name=ours", "method.gradient.samples_per_vote=2", "method.adapter.dropout=0"]


def test_shake_align_reads_once_per_step(tmp_path):
    """Shake-to-Align (4 votes a step): its statistics of every block and the guard's loss and gradient norm in one
    read."""
    reads, parts = reads_per_step(tmp_path, OURS)
    assert reads == [1] * STEPS
    assert len(parts.rule.windows) == 4


@pytest.mark.parametrize("route", ["vectorized", "microbatch"])
def test_shake_align_guard_still_skips_a_non_finite_batch_gradient(tmp_path, route):
    """The guard that rides on Shake-to-Align's read sees the batch gradient (on either route) before the correction:
    a NaN in the first backward skips that batch, and the rule keeps it out of its history, so the next 10 steps
    train normally (one read each) and every parameter stays finite."""
    seen: dict = {"backwards": 0}

    def poison_first_backward(gradient: Tensor) -> Tensor:
        seen["backwards"] += 1
        return gradient * math.nan if seen["backwards"] == 1 else gradient

    def poison(parts: RunParts) -> None:
        next(p for n, p in parts.model.named_parameters() if "lora_A" in n).register_hook(poison_first_backward)
        parts.rule.bind_optimizer = lambda optimizer: seen.update(optimizer=optimizer)

    window = ["method.gradient.history.window_steps=20"]  # holds every step's statistics: the skipped one is absent
    reads, parts = reads_per_step(tmp_path, [*OURS, f"method.gradient.route={route}", *window], before=poison)
    assert reads == [1] * STEPS and seen["backwards"] > 1
    assert {int(state["step"]) for state in seen["optimizer"].state.values()} == {STEPS}  # not STEPS + 1
    assert all(p.isfinite().all() for p in parts.model.parameters())
    windows = parts.rule.history.state_dict()["windows"]
    assert {len(kept) for kept in windows.values()} == {STEPS}
    assert all(math.isfinite(value) for kept in windows.values() for stats in kept for value in stats)


def test_grit_reads_once_per_step_with_covariance_recordings_and_regularizer_refreshes(tmp_path):
    """GRIT, preconditioning after its inversion at step 11: only the guard's read every step. A recorded micro-batch
    (every 8th backward: the first of steps 13, 15, ...) weighs its tokens by the attention mask and counts them on
    the device, and the next micro-batch refreshes the regularizer's weights on the device, as the first after an
    inversion does (step 12): neither reads. The run's last step logs: the natural-gradient norm is read then."""
    reads, parts = reads_per_step(tmp_path, [*LLAMA, *GRIT], warmup=11)
    assert all(state.inverse_a is not None for state in parts.rule.modules.values())
    assert parts.rule.stats.version == 11  # backwards 0, 8, ..., 80 recorded: 5 of them in the counted steps
    assert parts.rule.cached_weights is not None and parts.rule.cached_weights[0][0] == 11
    assert reads == [1] * (STEPS - 1) + [1 + 1]


def test_prefetcher_yields_in_order_and_raises_the_threads_error():
    def items():
        yield from range(5)
        raise ValueError("bad row")

    prefetcher = Prefetcher(items())
    assert [next(prefetcher) for _ in range(5)] == list(range(5))
    with pytest.raises(ValueError, match="bad row"):
        next(prefetcher)
    prefetcher.close()
    assert not prefetcher.thread.is_alive()


def test_prefetcher_closes_while_its_thread_waits_on_a_full_queue():
    prefetcher = Prefetcher(itertools.count())
    assert next(prefetcher) == 0
    prefetcher.close()  # the thread is blocked putting item 3 into a queue of 2
    assert not prefetcher.thread.is_alive()


class Stop(Exception):
    pass


def test_no_prefetch_thread_outlives_the_loop_even_when_a_step_raises(tmp_path):
    config = load_config([], [*COMMON, "model.name=tiny-bert", "train.max_steps=4", f"io.root={tmp_path}"])
    parts = prepare(config)
    accelerator = new_accelerator("no")
    model, optimizer = prepare_for_loop(accelerator, parts.model, build_optimizer(parts.model, config.train))
    scheduler = build_scheduler(optimizer, config.train, 4)
    order = BatchOrder(len(parts.features), config.train.batch_size, config.seed)
    pad = parts.tokenizer.pad_token_id

    def run(stop_at: int) -> None:
        """The loop as the recipe drives it (closed on the way out), raising after step `stop_at`."""
        state = TrainState()
        batches = optimizer_steps(
            model, parts.features, parts.rule, config.train, accelerator, optimizer, scheduler, state, order, pad, 4
        )
        with contextlib.closing(batches):
            for _ in batches:
                if state.step == stop_at:
                    raise Stop

    before = threading.active_count()
    run(0)
    with pytest.raises(Stop):
        run(2)
    assert threading.active_count() == before
    assert not [t for t in threading.enumerate() if t.name == "loralab-prefetch"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["method.name=grit"], "train.compile cannot run with method.gradient.kind=grit"),
        (["method.name=ours"], "use method.gradient.route=microbatch"),
    ],
)
def test_compile_is_refused_in_one_line_where_hooks_run_inside_the_graph(overrides, message):
    with pytest.raises(ConfigError, match=message) as error:
        load_config([], ["train.compile=true", *overrides])
    assert "\n" not in str(error.value)


def test_compiled_training_follows_the_eager_losses(tmp_path):
    """LoRA on tiny-llama (no dropout), 3 steps with and without torch.compile: the same losses up to float32
    reordering in the compiled kernels."""
    losses = {}
    for compiled in (False, True):
        config = load_config([], [*COMMON, *LLAMA, "train.max_steps=3", f"train.compile={str(compiled).lower()}"])
        parts = prepare(config)
        accelerator = new_accelerator("no")
        model, optimizer = prepare_for_loop(accelerator, parts.model, build_optimizer(parts.model, config.train))
        scheduler = build_scheduler(optimizer, config.train, 3)
        order = BatchOrder(len(parts.features), config.train.batch_size, config.seed)
        pad = parts.tokenizer.pad_token_id
        losses[compiled] = [
            step.loss
            for step in optimizer_steps(
                model, parts.features, parts.rule, config.train, accelerator, optimizer, scheduler, TrainState(), order,
                pad, 3,
            )
        ]  # fmt: skip
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    assert len(losses[True]) == 3
