"""The training recipe, top to bottom: set up a run from its resolved config, train it, save what it made.

    run_training: plan the run directory (start, resume or skip) → prepare (task, model, adapter, rule, data)
    → train: accelerator, optimizer and schedule, resume; the loop with logging, evaluation and checkpoints
      inline; the final evaluation → save: eval.json, the adapter, the rule's outputs, status.json.

This module is the one writer of a run directory's files. Under data parallelism every process runs the same loop;
the main one logs, checkpoints and writes, the others train their parts (and, with a sharded base, evaluate
alongside the main one, since every forward pass needs every process). Nothing else in loralab imports from here
but the CLI and the experiment drivers (sweep, hpo) that call `run_training`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import logging.handlers
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from loralab import collectives
from loralab.adapters import Adapter, build_adapter
from loralab.adapters.compress import compress_adapter
from loralab.adapters.params import frozen_hash
from loralab.config.load import config_hash, config_to_dict, dump_yaml
from loralab.config.schema import RunConfig
from loralab.data import TaskSpec, load_task, task_spec
from loralab.data.encode import encode_examples
from loralab.data.packing import pack
from loralab.diffusion import build_diffusion_adapter, load_diffusion_model
from loralab.diffusion.data import encode_diffusion
from loralab.errors import ConfigError, LoraLabError
from loralab.evaluation.dispatch import evaluate_in_views
from loralab.evaluation.evaluate import EvalResult, check_task_metrics
from loralab.evaluation.records import stored_metrics, write_eval
from loralab.gradient import GradientRule, build_rule
from loralab.models import load_model
from loralab.models.heads import resolve_head
from loralab.models.load import refuse_encoder
from loralab.progress import ProgressReporter
from loralab.seeding import seed_everything
from loralab.tracking import MetricsCSV, RowsCSV, Trackers
from loralab.training.checkpoint import resume_checkpoint, save_checkpoint
from loralab.training.control import EvalCallback, StopRun, kill_if_claimed, kill_point
from loralab.training.loop import (
    BatchOrder,
    LengthGroupedOrder,
    TrainState,
    new_accelerator,
    optimizer_steps,
    peak_memory_mb,
    prepare_for_loop,
    smallest_part,
    total_steps,
)
from loralab.training.optim import build_optimizer, build_scheduler
from loralab.training.rundir import environment, plan_run, write_status
from loralab.training.sharding import ShardingPlan, blocks, prepare_sharded, read_plan, refuse_unshardable, shard_hash

log = logging.getLogger("loralab")
transcript = logging.getLogger("loralab.transcript")  # the progress lines, for train.log: the terminal has them
transcript.propagate = False
transcript.setLevel(logging.INFO)


@dataclass
class RunOutcome:
    directory: Path
    action: str
    metrics: dict[str, float]


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
    with run_log() as open_log:
        plan = plan_run(config)
        if plan.action == "skip":
            log.info("run already completed, reusing its results: %s", plan.directory)
            return RunOutcome(plan.directory, "skip", stored_metrics(plan.directory))
        parts = prepare(config)  # everything that can fail on bad input, before the run directory is touched
        collectives.barrier()  # every process has planned before the main one creates (or moves aside) the directory
        main = collectives.is_main()
        directory = plan.open() if main else plan.directory
        collectives.barrier()
        if not main:
            return train(config, parts, directory, plan.action, False, None)
        open_log(directory / "train.log")
        return train(config, parts, directory, plan.action, show_progress, on_eval)


def prepare(config: RunConfig) -> RunParts:
    """Seed, load the task and model, apply the adapter, attach the gradient rule, encode the training set."""
    if config.eval.backend != "hf":
        raise ConfigError("eval.backend=vllm serves loralab eval and edit --eval; training evaluates with hf")
    check_task_metrics(task_spec(config.task))  # a misspelt metric would otherwise fail only after training
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


def train(
    config: RunConfig,
    parts: RunParts,
    directory: Path,
    action: str,
    show_progress: bool | None,
    on_eval: EvalCallback | None,
) -> RunOutcome:
    """Train from scratch or from the last checkpoint, evaluating and checkpointing on the way, then save."""
    main, cfg, rule = collectives.is_main(), config.train, parts.rule

    # ---- setup: accelerator, optimizer, batch order, schedule, resume --------------------------------------
    accelerator = new_accelerator(cfg.mixed_precision)
    optimizer = build_optimizer(parts.model, cfg)
    if parts.sharding is not None:
        model, optimizer = prepare_sharded(accelerator, parts.model, optimizer, parts.sharding)
    else:
        model, optimizer = prepare_for_loop(accelerator, parts.model, optimizer)
    base = accelerator.unwrap_model(model)  # without a data-parallel wrapper: evaluation, checkpoints, saving
    # a sharded base is hashed by the main process's shards: a full tensor would take every process
    hash_frozen = frozen_hash if parts.sharding is None else shard_hash
    rule.bind_optimizer(optimizer)
    if config.task.group_by_length:
        lengths = [len(feature["input_ids"]) for feature in parts.features]
        order = LengthGroupedOrder(lengths, cfg.batch_size, config.effective_data_seed)
    else:
        order = BatchOrder(len(parts.features), cfg.batch_size, config.effective_data_seed)
    steps = total_steps(cfg, order.steps_per_epoch)
    scheduler = build_scheduler(optimizer, cfg, steps)
    state = TrainState()
    if action == "resume":  # the newest checkpoint that verifies; a run with none starts at step 0
        state = resume_checkpoint(directory, base, optimizer, scheduler, rule)
    # a sharded base needs every process in each forward pass: the others evaluate alongside the main one
    evaluates = main or parts.sharding is not None
    kill = kill_point()  # tests only: die at a known step, as a crash would

    # ---- the run's logs: metrics.csv, the rule's diagnostics CSV, trackers, progress (main process only) -----------
    if main:
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
        csv, diagnostics = MetricsCSV(directory / "metrics.csv"), RowsCSV(directory / f"{rule.name}.csv")
        run_name = f"{directory.parent.name}-{directory.name}"
        trackers = Trackers.start(config.log.trackers, directory, run_name, config_to_dict(config))
        progress = ProgressReporter(steps, enabled=show_progress, transcript=transcript.info)

    def log(step: int, split: str, metrics: dict[str, float]) -> None:
        """One row of metrics.csv, the same values to the trackers, and the progress line."""
        if not main:
            return
        csv.log(step, split, metrics)
        trackers.log(step, {f"{split}/{k}": v for k, v in metrics.items()})
        if split == "train" and "loss" in metrics:
            progress.update(step, metrics)
        elif "bad_steps" in metrics:
            progress.note(step, f"non-finite loss or gradient, step skipped ({int(metrics['bad_steps'])} so far)")
        elif split == "eval":
            progress.note(step, "eval " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))

    def evaluate(step: int) -> EvalResult:
        result = evaluate_in_views(
            config, parts.head, base, parts.tokenizer, parts.spec, parts.eval_examples, parts.split
        )
        log(step, "eval", result.metrics)
        return result

    # ---- the loop: one optimizer step per pass, then log, evaluate, checkpoint -------------------------------
    final: EvalResult | None = None
    started = time.time()
    try:
        batches = optimizer_steps(
            model, parts.features, rule, cfg, accelerator, optimizer, scheduler, state, order,
            parts.tokenizer.pad_token_id, steps,
        )  # fmt: skip
        with contextlib.closing(batches):  # closing ends the prefetch thread, also when a step raises
            for step in batches:
                last = state.step == steps
                if step.finite:
                    if state.step % config.log.every == 0 or last:
                        epoch = state.epoch + state.position / order.steps_per_epoch
                        log(state.step, "train", step.train_metrics(scheduler.get_last_lr()[0], epoch))
                    if main:
                        diagnostics.write(rule.diagnostics())
                else:
                    log(state.step, "train", {"bad_step": 1.0, "bad_steps": float(state.bad_steps)})
                    if state.bad_steps > cfg.max_bad_steps:
                        raise LoraLabError(
                            f"training diverged: {state.bad_steps} steps with a non-finite loss or gradient "
                            f"(train.max_bad_steps={cfg.max_bad_steps}); lower train.lr or enable train.max_grad_norm"
                        )
                # evaluate after the last step, every eval_every steps, and at each epoch's end if asked, even when
                # that epoch's last batch was skipped as non-finite
                every = cfg.eval_every
                due = step.finite and (last or bool(every and state.step % every == 0))
                if evaluates and (due or (step.epoch_ended and cfg.eval_each_epoch)):
                    result = evaluate(state.step)
                    if last:
                        final = result
                    if on_eval is not None:
                        on_eval(state.step, result.metrics, last)
                if main and step.finite and (last or (cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0)):
                    save_checkpoint(
                        directory / "checkpoints", state.step, base, optimizer, scheduler, rule, state.to_dict(),
                        cfg.keep_last,
                    )  # fmt: skip
                if kill is not None and step.finite and state.step == kill[0]:
                    kill_if_claimed(kill[1])
        # a resumed run whose last step was already checkpointed trains no step: evaluate before closing the logs
        if final is None and evaluates:
            final = evaluate(state.step)
    except KeyboardInterrupt:
        if main:
            write_status(directory, state="interrupted", step=state.step)
        raise
    except StopRun as stop:
        write_status(directory, state=stop.state, step=state.step, reason=str(stop))
        raise
    except BaseException as exc:
        if main:
            write_status(directory, state="failed", step=state.step, error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        if main:
            progress.close()
            trackers.finish()
            csv.close()
            diagnostics.close()

    # ---- save: eval.json, the adapter, the rule's outputs, status.json (main process only) ---------------------
    if not main:
        collectives.barrier()
        return RunOutcome(directory, action, stored_metrics(directory))
    write_eval(directory, final)
    parts.adapter.save(base, directory / "adapter")
    if parts.spec.format in ("text", "sft") and config.method.adapter.kind == "full":  # usable as a model.name
        if isinstance(base, PreTrainedModel):  # a transformers LM saves weights and config, not its tokenizer
            base.save_pretrained(directory / "model")
            parts.tokenizer.save_pretrained(directory / "model")
        else:
            base.save_pretrained(directory / "model", parts.tokenizer)
    outputs = rule.outputs()
    for name, value in outputs.json_files.items():
        (directory / name).write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")
    for name, tensors in outputs.adapter_tensors.items():
        save_file(tensors, str(directory / "adapter" / name), metadata={"format": "pt"})
    if outputs.compressed_adapter:
        compress_adapter(directory / "adapter", directory / "adapter_compressed")
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


@contextlib.contextmanager
def run_log() -> Iterator[Callable[[Path], None]]:
    """Collect a run's train.log: loralab's log records and the progress lines, until the context ends.

    Records from before the run directory exists (planning, data encoding) are held until `open_log(path)` writes
    them; a run that never opens its log (skipped, refused, another process's) writes nothing.
    """
    loralab_log = logging.getLogger("loralab")
    held = logging.handlers.MemoryHandler(capacity=10_000, flushLevel=logging.CRITICAL + 1, flushOnClose=False)
    loralab_log.addHandler(held)
    handlers: list[logging.Handler] = [held]

    def open_log(path: Path) -> None:
        file = logging.FileHandler(path)
        file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        held.setTarget(file)
        held.flush()
        loralab_log.removeHandler(held)
        loralab_log.addHandler(file)
        transcript.addHandler(file)
        handlers.append(file)

    try:
        yield open_log
    finally:
        for handler in handlers:
            loralab_log.removeHandler(handler)
            transcript.removeHandler(handler)
            handler.close()
