"""Evaluation outside training: a base model + saved adapter on a task, and re-scoring saved predictions."""

from __future__ import annotations

import json
from pathlib import Path

from loralab.adapters import load_adapter
from loralab.adapters.dual_rank import adapter_split
from loralab.config.schema import RunConfig
from loralab.data import get_task, load_task
from loralab.errors import DataError
from loralab.evaluation.evaluate import evaluate, evaluate_views
from loralab.evaluation.metrics import compute_metrics, extract_answer
from loralab.models import load_model
from loralab.training.recipe import resolve_head, write_eval
from loralab.training.seeding import seed_everything


def evaluate_adapter(config: RunConfig, adapter_dir: Path, out: Path, max_samples: int | None = None) -> dict:
    """Load the base model, put the adapter on it, evaluate on the task's eval split, write `out/`."""
    spec = get_task(config.task.name)
    head = resolve_head(config.model.kind, spec.kind)
    seed_everything(config.seed)
    task = load_task(config.task)
    model, tokenizer = load_model(config.model, head, spec.num_labels)
    model = load_adapter(model, adapter_dir)
    examples = task.eval[: max_samples or config.eval.max_samples]
    result = evaluate_views(
        model,
        config.eval.views,
        adapter_split(adapter_dir),
        lambda: evaluate(
            model, tokenizer, spec, examples, config.eval.batch_size, config.task.max_length, config.eval.max_new_tokens
        ),
    )
    out.mkdir(parents=True, exist_ok=True)
    write_eval(out, result)
    return result.metrics


def score_predictions(task_name: str, path: Path) -> dict[str, float]:
    """Metrics of a predictions.jsonl from its `prediction` (or raw `output`) and `reference` fields."""
    spec = get_task(task_name)
    records = read_predictions(path)
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
