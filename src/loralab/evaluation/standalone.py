"""Evaluation outside training: a base model + saved adapter on a task, and re-scoring saved predictions."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from loralab.adapters import load_adapter
from loralab.adapters.dual_rank import adapter_split
from loralab.config.load import load_task_config, task_section
from loralab.config.schema import RunConfig
from loralab.data import TaskSpec, load_task, resolved_spec, task_spec
from loralab.diffusion import load_diffusion_adapter, load_diffusion_model
from loralab.errors import ConfigError, DataError
from loralab.evaluation.dispatch import evaluate_in_views
from loralab.evaluation.evaluate import EvalResult, check_task_metrics, evaluate_gsm8k
from loralab.evaluation.generate import Generator, HfGenerator, VllmGenerator
from loralab.evaluation.gsm8k import get_profile, score_outputs
from loralab.evaluation.metrics import compute_metrics, extract_answer
from loralab.evaluation.records import write_eval
from loralab.models import load_model
from loralab.models.heads import resolve_head
from loralab.models.load import source
from loralab.seeding import seed_everything


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def evaluate_adapter(
    config: RunConfig, adapter_dir: Path, out: Path, max_samples: int | None = None, max_new_tokens: int | None = None
) -> dict:
    """Load the base model, put the adapter on it, evaluate on the task's eval split, write `out/`."""
    if task_spec(config.task).answer == "gsm8k":
        result = compare_adapters(config, {"adapter": Path(adapter_dir)}, max_samples, max_new_tokens)["adapter"]
    else:
        if config.eval.backend != "hf" or config.eval.fewshot is not None:
            raise ConfigError(f"eval.backend=vllm and eval.fewshot serve GSM8K-style tasks, not {config.task.name}")
        check_task_metrics(task_spec(config.task))  # a misspelt metric fails now, not after the model has run
        seed_everything(config.seed)
        task = load_task(config.task)
        result = evaluate_classic(config, adapter_dir, task.spec, task.eval[: max_samples or config.eval.max_samples])
    out.mkdir(parents=True, exist_ok=True)
    write_eval(out, result)
    return result.metrics


def compare_adapters(
    config: RunConfig, adapters: Mapping[str, Path], max_samples: int | None = None, max_new_tokens: int | None = None
) -> dict[str, EvalResult]:
    """Each adapter on the same GSM8K-style prompts, under config.eval's profile and shots, with one generator.

    Shots come from the task's train split; eval.fewshot null means the profile's (5).
    """
    seed_everything(config.seed)
    task = load_task(config.task)
    examples = task.eval[: max_samples or config.eval.max_samples]
    profile = get_profile(config.eval.profile)
    fewshot = profile.fewshot if config.eval.fewshot is None else config.eval.fewshot
    generator = build_generator(config, adapters)
    return {
        name: evaluate_gsm8k(generator, examples, task.train, profile, fewshot, max_new_tokens, name)
        for name in adapters
    }


def build_generator(config: RunConfig, adapters: Mapping[str, Path]) -> Generator:
    """config.eval.backend's generator over the base model, serving each named adapter (PEFT adapters)."""
    if config.eval.backend == "vllm":
        return VllmGenerator(source(config.model.name), adapters, config.model.dtype, config.seed)
    model, tokenizer = load_model(config.model, "causal_lm")
    model = model.to(default_device())
    (first, directory), *others = adapters.items()
    model = load_adapter(model, directory, adapter_name=first)
    for name, other in others:
        model.load_adapter(str(other), adapter_name=name)
    return HfGenerator(model, tokenizer, config.eval.batch_size)


def evaluate_classic(config: RunConfig, adapter_dir: Path, spec: TaskSpec, examples: list) -> EvalResult:
    """Classification, regression, text and non-GSM8K generation tasks, with the adapter's views."""
    head = resolve_head(config.model.kind, spec.format)
    if head == "masked_diffusion":
        model, tokenizer = load_diffusion_model(config.model, config.diffusion)
        model = load_diffusion_adapter(model.to(default_device()), adapter_dir)
    else:
        model, tokenizer = load_model(config.model, head, spec.num_labels)
        model = load_adapter(model.to(default_device()), adapter_dir)
    return evaluate_in_views(config, head, model, tokenizer, spec, examples, adapter_split(adapter_dir))


def score_predictions(task: str, path: Path, profile: str | None = None) -> dict[str, float]:
    """Metrics of a predictions.jsonl from its `prediction` (or raw `output`) and `reference` fields.

    GSM8K-style tasks are re-scored from the raw `output` by a GSM8K profile (default lm-eval).
    """
    spec = resolved_spec(load_task_config(**task_section(task)))
    records = read_predictions(path)
    if spec.answer == "gsm8k":
        if any("output" not in r for r in records):
            raise DataError(f"{path}: GSM8K re-scoring needs each record's raw 'output'")
        metrics, _ = score_outputs(
            get_profile(profile or "lm-eval"), [r["output"] for r in records], [r["reference"] for r in records]
        )
        return metrics
    if profile is not None:
        raise ConfigError(f"--profile applies to GSM8K-style tasks, not {spec.name}")
    predictions = [r["prediction"] if "prediction" in r else extract_answer(spec.answer, r["output"]) for r in records]
    return compute_metrics(spec.metrics, predictions, [r["reference"] for r in records], spec.label_names)


def read_predictions(path: Path) -> list[dict]:
    if not path.is_file():
        raise DataError(f"predictions file not found: {path}")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{path}:{number}: not a JSON object") from None
        if not isinstance(record, dict) or "reference" not in record or not ({"prediction", "output"} & set(record)):
            raise DataError(f"{path}:{number}: needs 'reference' and 'prediction' or 'output'")
        records.append(record)
    if not records:
        raise DataError(f"{path} holds no predictions")
    return records
