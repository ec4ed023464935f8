"""Names from Hugging Face `TrainingArguments`, PEFT `LoraConfig` and common training scripts, mapped to loralab's
keys, so that an unknown key someone types from habit gets the loralab name in its one-line error."""

from __future__ import annotations

BATCH = "examples per optimizer step over all processes, split into train.grad_accum micro-batches"
FAMILIAR: dict[str, tuple[str, str]] = {  # name → (loralab key, a note where the meaning differs)
    # transformers.TrainingArguments
    "learning_rate": ("train.lr", ""),
    "num_train_epochs": ("train.epochs", ""),
    "max_steps": ("train.max_steps", ""),
    "per_device_train_batch_size": ("train.batch_size", f"loralab has no per-device size: it counts the {BATCH}"),
    "train_batch_size": ("train.batch_size", f"the {BATCH}"),
    "per_device_eval_batch_size": ("eval.batch_size", ""),
    "gradient_accumulation_steps": ("train.grad_accum", "train.batch_size stays the examples per optimizer step"),
    "warmup_ratio": ("train.warmup_ratio", ""),
    "warmup_steps": ("train.warmup_ratio", "a share of the total steps, not a count"),
    "weight_decay": ("train.weight_decay", ""),
    "max_grad_norm": ("train.max_grad_norm", ""),
    "lr_scheduler_type": ("train.scheduler", "linear, cosine or constant"),
    "logging_steps": ("log.every", ""),
    "eval_steps": ("train.eval_every", ""),
    "eval_strategy": ("train.eval_every", "every N steps; train.eval_each_epoch for every epoch"),
    "evaluation_strategy": ("train.eval_every", "every N steps; train.eval_each_epoch for every epoch"),
    "save_steps": ("train.checkpoint_every", ""),
    "save_total_limit": ("train.keep_last", ""),
    "seed": ("seed", ""),
    "data_seed": ("data_seed", ""),
    "bf16": ("train.mixed_precision", "set it to bf16 (model.dtype=bfloat16 for bf16 weights)"),
    "fp16": ("train.mixed_precision", "set it to fp16 (model.dtype=float16 for fp16 weights)"),
    "gradient_checkpointing": ("model.gradient_checkpointing", ""),
    "full_determinism": ("train.deterministic", ""),
    "output_dir": ("io.root", "runs go to <io.root>/<task>/<model>/<method>/<hash>/seed<k>"),
    "overwrite_output_dir": ("io.overwrite", "error, resume, skip, force or ask"),
    "resume_from_checkpoint": ("io.overwrite", "set it to resume: the newest checkpoint continues"),
    "report_to": ("log.trackers", "a list of tensorboard, wandb, swanlab, mlflow"),
    "group_by_length": ("task.group_by_length", ""),
    # models and data (run_clm / TRL SFTConfig / common scripts)
    "model_name_or_path": ("model.name", ""),
    "model_name": ("model.name", ""),
    "torch_dtype": ("model.dtype", ""),
    "dtype": ("model.dtype", ""),
    "trust_remote_code": ("model.trust_remote_code", ""),
    "load_in_4bit": ("model.quantization", "set it to nf4"),
    "dataset_name": ("task.name", "a built-in task, or a name of your own with task.format and task.path"),
    "dataset_config_name": ("task.subset", ""),
    "dataset_text_field": ("task.columns", "{text: COLUMN}"),
    "train_file": ("task.path", "a file, glob or directory"),
    "dataset_path": ("task.path", "a file, glob or directory"),
    "data_path": ("task.path", "a file, glob or directory"),
    "max_seq_length": ("task.max_length", ""),
    "max_length": ("task.max_length", ""),
    "packing": ("task.packing", ""),
    "max_train_samples": ("task.train_samples", ""),
    "max_eval_samples": ("task.eval_samples", ""),
    "max_new_tokens": ("eval.max_new_tokens", ""),
    # peft.LoraConfig
    "r": ("method.adapter.r", ""),
    "lora_r": ("method.adapter.r", ""),
    "lora_alpha": ("method.adapter.alpha", ""),
    "lora_dropout": ("method.adapter.dropout", ""),
    "target_modules": ("method.adapter.target_modules", ""),
    "use_rslora": ("method.adapter.use_rslora", ""),
    "use_dora": ("method.adapter.use_dora", ""),
    "init_lora_weights": ("method.adapter.init_lora_weights", ""),
    "layers_to_transform": ("method.adapter.layers_to_transform", ""),
    "task_type": ("model.kind", "seq_cls or causal_lm; auto follows the task"),
    "peft_type": ("method.adapter.peft_type", "with method.adapter.kind=peft"),
}


def familiar_hint(path: str) -> str:
    """' (did you mean KEY? NOTE)' when the last part of a dotted key is a familiar name for another key, else ''."""
    entry = FAMILIAR.get(path.rpartition(".")[2])
    if entry is None or entry[0] == path:
        return ""
    key, note = entry
    return f" (did you mean '{key}'?{' ' + note if note else ''})"
