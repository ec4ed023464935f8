"""One run from a resolved config: the run directory, model + adapter + rule, the loop, evaluation, outputs."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from loralab import collectives
from loralab.adapters import Adapter, build_adapter
from loralab.adapters.params import frozen_hash
from loralab.config.load import config_hash, config_to_dict, dump_yaml
from loralab.config.schema import RunConfig
from loralab.data import TaskSpec, load_task
from loralab.data.encode import encode_examples
from loralab.data.packing import pack
from loralab.diffusion import build_diffusion_adapter, load_diffusion_model
from loralab.diffusion.data import encode_diffusion
from loralab.errors import ConfigError
from loralab.evaluation.diffusion import evaluate_diffusion
from loralab.evaluation.evaluate import EvalResult, evaluate, evaluate_views
from loralab.gradient import GradientRule, build_rule
from loralab.models import load_model
from loralab.models.load import refuse_encoder
from loralab.progress import ProgressReporter
from loralab.seeding import seed_everything
from loralab.tracking import MetricsCSV, RowsCSV, Trackers
from loralab.training.checkpoint import resume_checkpoint, save_checkpoint
from loralab.training.loop import (
    BatchOrder,
    LengthGroupedOrder,
    TrainState,
    peak_memory_mb,
    prepare_for_loop,
    smallest_part,
    total_steps,
    train,
)
from loralab.training.optim import build_optimizer, build_scheduler
from loralab.training.rundir import environment, plan_run, write_status
from loralab.training.sharding import (
    ShardingPlan,
    blocks,
    prepare_sharded,
    read_plan,
    refuse_unshardable,
    shard_hash,
)

log = logging.getLogger("loralab")


EvalCallback = Callable[[int, dict[str, float], bool], None]
"""Called after each in-loop evaluation with (step, metrics, last): how an HPO trial reports its eval curve."""


class StopRun(Exception):
    """Raised by an `on_eval` callback to end a run after an evaluation (an HPO trial its pruner stopped).

    status.json records `state` (default `pruned`), the step and the reason; the exception reaches the caller.
    """

    def __init__(self, reason: str = "", state: str = "pruned") -> None:
        super().__init__(reason)
        self.state = state


@dataclass
class RunOutcome:
    directory: Path
    action: str
    metrics: dict[str, float]


def resolve_head(model_kind: str, task_format: str) -> str:
    """The model head a task needs: a classification head for classification and regression, a causal LM for
    the formats that generate or model text (sft, chat, text), or the masked diffusion LM model.kind asks for."""
    if model_kind == "masked_diffusion":
        if task_format in ("regression", "chat"):
            raise ConfigError(f"model.kind=masked_diffusion cannot run a {task_format} task")
        return "masked_diffusion"
    wanted = "seq_cls" if task_format in ("classification", "regression") else "causal_lm"
    if model_kind not in ("auto", wanted):
        raise ConfigError(f"model.kind={model_kind} cannot run a {task_format} task; use model.kind={wanted} or auto")
    return wanted


@dataclass
class RunParts:
    """What a run trains: the task, the model with its adapter and gradient rule, the encoded training set."""

    spec: TaskSpec
    head: str
    eval_examples: list
    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    adapter: Adapter
    rule: GradientRule
    features: list[dict]
    sharding: ShardingPlan | None = None  # under an accelerate FSDP launch of several processes

    @property
    def split(self) -> int | None:
        """The dual-rank core/extension split (for the core view), None for other adapters."""
        return getattr(self.adapter, "split", None)


def run_training(
    config: RunConfig, show_progress: bool | None = None, on_eval: EvalCallback | None = None
) -> RunOutcome:
    """Train (or resume, or skip) the run a config names and return its final evaluation.

    `on_eval(step, metrics, last)` runs after every evaluation inside the loop; it may raise StopRun.
    """
    collectives.start()
    plan = plan_run(config)
    if plan.action == "skip":
        log.info("run already completed, reusing its results: %s", plan.directory)
        return RunOutcome(plan.directory, "skip", stored_metrics(plan.directory))
    parts = prepare(config)  # everything that can fail on bad input, before the run directory is touched
    collectives.barrier()  # every process has planned before the main one creates (or moves aside) the directory
    if not collectives.is_main():
        collectives.barrier()
        return execute(config, parts, plan.directory, plan.action, False)
    directory = plan.open()
    collectives.barrier()
    handler = attach_log_file(directory / "train.log")
    try:
        return execute(config, parts, directory, plan.action, show_progress, on_eval)
    finally:
        logging.getLogger("loralab").removeHandler(handler)
        handler.close()


def stored_metrics(directory: Path) -> dict[str, float]:
    return json.loads((directory / "eval.json").read_text())["metrics"]


def prepare(config: RunConfig) -> RunParts:
    """Seed, load the task and model, apply the adapter, attach the gradient rule, encode the training set."""
    if config.eval.backend != "hf":
        raise ConfigError("eval.backend=vllm serves loralab eval and edit --eval; training evaluates with hf")
    head = resolve_head(config.model.kind, config.task.format)
    diffusion = head == "masked_diffusion"
    adapter = (
        build_diffusion_adapter(config.method.adapter) if diffusion else build_adapter(config.method.adapter, head)
    )
    rule = build_rule(config.method.gradient)
    sharding = read_plan()  # refuses DeepSpeed and FSDP settings it cannot honour, in any number of processes
    if sharding is not None:
        refuse_unshardable(config.method)
    seed_everything(config.seed, config.train.deterministic)
    task = load_task(config.task)
    spec = task.spec
    if diffusion:
        model, tokenizer = load_diffusion_model(config.model, config.diffusion)
    else:
        if head == "causal_lm":
            refuse_encoder(config.model)  # sft, chat and text generate text: refused from the config, before loading
        model, tokenizer = load_model(config.model, head, spec.num_labels)
    model = adapter.apply(model)
    rule.attach(model, adapter.lora_modules(model))
    if sharding is not None:
        blocks(model, sharding)  # a model without the blocks to shard is refused before the run directory exists
        sharding = sharding if collectives.world_size() > 1 else None  # one process has nothing to shard over
    if diffusion:
        features = encode_diffusion(
            task.train, spec, tokenizer, config.task.max_length, config.diffusion.response_length
        )
    else:
        features = encode_examples(spec, task.train, tokenizer, config.task.max_length, config.task.truncation)
        if config.task.packing:
            features = pack(features, config.task.max_length)
    check_parallel(len(features), config.train)
    eval_examples = task.eval[: config.eval.max_samples]
    return RunParts(spec, head, eval_examples, model, tokenizer, adapter, rule, features, sharding)


def check_parallel(num_examples: int, train_cfg) -> None:
    """Refuse a data-parallel run in which some process would get no example of a micro-batch."""
    processes = collectives.world_size()
    micro_size = train_cfg.batch_size // train_cfg.grad_accum
    if processes > 1 and smallest_part(num_examples, train_cfg.batch_size, micro_size, processes) == 0:
        raise ConfigError(
            f"{processes} processes need ≥ {processes} examples in every micro-batch, but train.batch_size="
            f"{train_cfg.batch_size}, train.grad_accum={train_cfg.grad_accum} and {num_examples} training examples "
            "leave a smaller one; change train.batch_size or task.train_samples"
        )


def evaluate_model(config: RunConfig, head: str, model: nn.Module, tokenizer, spec: TaskSpec, examples) -> EvalResult:
    """One evaluation of `model` as it is, by the evaluator of its head (diffusion sampling or HF)."""
    if head == "masked_diffusion":
        return evaluate_diffusion(
            model, tokenizer, spec, examples, config.diffusion, config.eval.batch_size, config.task.max_length
        )
    return evaluate(
        model,
        tokenizer,
        spec,
        examples,
        config.eval.batch_size,
        config.task.max_length,
        config.eval.max_new_tokens,
        config.eval.profile,
    )


def execute(
    config: RunConfig,
    parts: RunParts,
    directory: Path,
    action: str,
    show_progress: bool | None,
    on_eval: EvalCallback | None = None,
) -> RunOutcome:
    """Train from scratch or from the last checkpoint, then evaluate and save the adapter."""
    model, rule = parts.model, parts.rule
    accelerator = new_accelerator(config.train.mixed_precision)
    optimizer = build_optimizer(model, config.train)
    if parts.sharding is not None:
        model, optimizer = prepare_sharded(accelerator, model, optimizer, parts.sharding)
    else:
        model, optimizer = prepare_for_loop(accelerator, model, optimizer)
    # a sharded base is hashed by the main process's shards: a full tensor would take every process
    hash_frozen = frozen_hash if parts.sharding is None else shard_hash
    base = accelerator.unwrap_model(model)  # without a data-parallel wrapper: evaluation, checkpoints, saving
    rule.bind_optimizer(optimizer)
    if config.task.group_by_length:
        lengths = [len(feature["input_ids"]) for feature in parts.features]
        order = LengthGroupedOrder(lengths, config.train.batch_size, config.effective_data_seed)
    else:
        order = BatchOrder(len(parts.features), config.train.batch_size, config.effective_data_seed)
    steps = total_steps(config.train, order.steps_per_epoch)
    scheduler = build_scheduler(optimizer, config.train, steps)

    state = TrainState()
    if action == "resume":  # the newest checkpoint that verifies; a run with none starts at step 0
        state = resume_checkpoint(directory, base, optimizer, scheduler, rule)

    def run_loop(events) -> TrainState:
        """The same loop in every process; only the events differ (the main process logs, evaluates, saves)."""
        pad = parts.tokenizer.pad_token_id
        return train(
            model,
            parts.features,
            rule,
            config.train,
            accelerator,
            optimizer,
            scheduler,
            state,
            order,
            pad,
            events,
            config.log.every,
        )

    if not collectives.is_main():  # the other processes train their parts and leave every file to the main one
        # a sharded base needs every process in each forward pass: they evaluate alongside the main one
        follower = Follower(config, parts, base) if parts.sharding is not None else Silent()
        run_loop(follower)
        if isinstance(follower, Follower) and not follower.evaluated_last:
            follower.evaluate()
        collectives.barrier()
        return RunOutcome(directory, action, stored_metrics(directory))
    for log_file in ("metrics.csv", f"{rule.name}.csv"):
        MetricsCSV.truncate_after(directory / log_file, state.step)
    # a resumed run keeps the config.yaml it started with: plan_run refused one that differs from `config`
    if action != "resume" or not (directory / "config.yaml").exists():
        (directory / "config.yaml").write_text(dump_yaml(config))
    write_status(
        directory,
        state="running",
        started=time.strftime("%Y-%m-%dT%H:%M:%S"),
        config_hash=config_hash(config),
        frozen_sha256_start=hash_frozen(base),  # end = start: the base did not change
        device=str(accelerator.device),
        processes=collectives.world_size(),
        fsdp=parts.sharding is not None,  # the frozen base sharded over the processes
        total_steps=steps,
        **environment(),
    )

    events = RunEvents(config, directory, parts, base, optimizer, scheduler, steps, show_progress, on_eval)
    started = time.time()
    try:
        state = run_loop(events)
        # a resumed run whose last step was already checkpointed trains no step: evaluate before closing the logs
        final = events.final or events.run_eval(state.step)
    except KeyboardInterrupt:
        write_status(directory, state="interrupted", step=state.step)
        raise
    except StopRun as stop:
        write_status(directory, state=stop.state, step=state.step, reason=str(stop))
        raise
    except BaseException as exc:
        write_status(directory, state="failed", step=state.step, error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        events.close()

    write_eval(directory, final)
    parts.adapter.save(base, directory / "adapter")
    if parts.spec.format in ("text", "sft") and config.method.adapter.kind == "full":  # usable as a model.name
        if isinstance(base, PreTrainedModel):  # a transformers LM saves weights and config, not its tokenizer
            base.save_pretrained(directory / "model")
            parts.tokenizer.save_pretrained(directory / "model")
        else:
            base.save_pretrained(directory / "model", parts.tokenizer)
    rule.write_outputs(directory)
    write_status(
        directory,
        state="completed",
        ended=time.strftime("%Y-%m-%dT%H:%M:%S"),
        step=state.step,
        duration_s=round(time.time() - started, 2),
        peak_mem_mb=round(peak_memory_mb(), 1),
        tokens_per_s=round(state.tokens / state.seconds, 1) if state.seconds else None,
        step_time_s=round(state.seconds / state.step, 4) if state.step else None,
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        total_params=sum(p.numel() for p in model.parameters()),
        frozen_sha256_end=hash_frozen(base),
    )
    collectives.barrier()
    return RunOutcome(directory, action, final.metrics)


class Silent:
    """The loop events of a process that is not the main one: it logs, evaluates and checkpoints nothing."""

    def log(self, step: int, split: str, metrics: dict[str, float]) -> None:
        return None

    def after_step(self, state: TrainState, epoch_ended: bool, last: bool) -> None:
        return None


class Follower(Silent):
    """A process that is not the main one under FSDP: it runs each evaluation the main one runs, and keeps nothing."""

    def __init__(self, config: RunConfig, parts: RunParts, model: nn.Module) -> None:
        self.config, self.parts, self.model = config, parts, model
        self.evaluated_last = False

    def after_step(self, state: TrainState, epoch_ended: bool, last: bool) -> None:
        if eval_due(self.config.train, state, epoch_ended, last):
            self.evaluate()
            self.evaluated_last = last

    def evaluate(self) -> None:
        run_evaluation(self.config, self.parts, self.model)


def eval_due(train_cfg, state: TrainState, epoch_ended: bool, last: bool) -> bool:
    """Whether the loop evaluates after this step: the last one, every `eval_every`, each epoch if asked."""
    every = train_cfg.eval_every
    return last or bool(every and state.step % every == 0) or (epoch_ended and train_cfg.eval_each_epoch)


def run_evaluation(config: RunConfig, parts: RunParts, model: nn.Module) -> EvalResult:
    """One evaluation of the run's model under each of `eval.views`."""
    return evaluate_views(
        model,
        config.eval.views,
        parts.split,
        lambda: evaluate_model(config, parts.head, model, parts.tokenizer, parts.spec, parts.eval_examples),
    )


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


class RunEvents:
    """The loop's side effects for one run: metrics.csv + trackers + progress, evaluation, checkpoints."""

    def __init__(
        self,
        config: RunConfig,
        directory: Path,
        parts: RunParts,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler,
        steps: int,
        show_progress: bool | None,
        on_eval: EvalCallback | None = None,
    ) -> None:
        self.config, self.directory, self.parts, self.model = config, directory, parts, model
        self.on_eval = on_eval
        self.optimizer, self.scheduler = optimizer, scheduler
        self.csv = MetricsCSV(directory / "metrics.csv")
        self.diagnostics = RowsCSV(directory / f"{parts.rule.name}.csv")
        run_name = f"{directory.parent.name}-{directory.name}"
        self.trackers = Trackers.start(config.log.trackers, directory, run_name, config_to_dict(config))
        self.progress = ProgressReporter(steps, enabled=show_progress)
        self.final: EvalResult | None = None

    def log(self, step: int, split: str, metrics: dict[str, float]) -> None:
        self.csv.log(step, split, metrics)
        self.trackers.log(step, {f"{split}/{k}": v for k, v in metrics.items()})
        if split == "train" and "loss" in metrics:
            self.progress.update(step, metrics)
        elif "bad_steps" in metrics:
            self.progress.note(step, f"non-finite loss or gradient, step skipped ({int(metrics['bad_steps'])} so far)")

    def after_step(self, state: TrainState, epoch_ended: bool, last: bool) -> None:
        self.diagnostics.write(self.parts.rule.diagnostics())
        train_cfg = self.config.train
        if eval_due(train_cfg, state, epoch_ended, last):
            result = self.run_eval(state.step)
            if last:
                self.final = result
            if self.on_eval is not None:
                self.on_eval(state.step, result.metrics, last)
        ckpt = train_cfg.checkpoint_every
        if last or (ckpt and state.step % ckpt == 0):
            save_checkpoint(
                self.directory / "checkpoints",
                state.step,
                self.model,
                self.optimizer,
                self.scheduler,
                self.parts.rule,
                state.to_dict(),
                train_cfg.keep_last,
            )

    def run_eval(self, step: int) -> EvalResult:
        result = run_evaluation(self.config, self.parts, self.model)
        self.log(step, "eval", result.metrics)
        self.progress.note(step, "eval " + " ".join(f"{k}={v:.4f}" for k, v in result.metrics.items()))
        return result

    def close(self) -> None:
        self.progress.close()
        self.trackers.finish()
        self.csv.close()
        self.diagnostics.close()


def write_eval(directory: Path, result: EvalResult, name: str = "eval.json") -> None:
    """eval.json (metrics) and predictions.jsonl (one object per evaluated example)."""
    (directory / name).write_text(json.dumps({"metrics": result.metrics, "n": len(result.predictions)}, indent=2))
    with open(directory / "predictions.jsonl", "w") as handle:
        for record in result.predictions:
            handle.write(json.dumps(record) + "\n")


def attach_log_file(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.getLogger("loralab").addHandler(handler)
    return handler
