"""Evaluate a model with its adapter on a task: real predictions (argmax logits or generated text) → metrics."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from loralab.adapters.dual_rank import adapter_view
from loralab.data.collate import collate, encode_classification, left_pad_prompts
from loralab.evaluation.metrics import compute_metrics, extract_answer

STOP_STRINGS = ("\n\nQuestion:", "Question:", "</s>", "<|im_end|>", "<|endoftext|>")


@dataclass
class EvalResult:
    metrics: dict[str, float]
    predictions: list[dict]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    spec,
    examples: Sequence,
    batch_size: int,
    max_length: int,
    max_new_tokens: int = 128,
) -> EvalResult:
    """Score `examples` with the model as it is (adapter on), from argmax logits or greedy generation."""
    was_training = model.training
    model.eval()
    try:
        if spec.kind == "generation":
            records = generate_records(model, tokenizer, spec, examples, batch_size, max_new_tokens)
        else:
            records = classify_records(model, tokenizer, spec, examples, batch_size, max_length)
    finally:
        model.train(was_training)
    predictions, references = [r["prediction"] for r in records], [r["reference"] for r in records]
    metrics = compute_metrics(spec.metrics, predictions, references, spec.label_names)
    return EvalResult(metrics=metrics, predictions=records)


def evaluate_views(model: nn.Module, views: list[str], split: int | None, run: Callable[[], EvalResult]) -> EvalResult:
    """Run an evaluation under each adapter view; metrics get a `<view>/` prefix unless only `full` is asked for.

    The predictions kept are the full view's when it is evaluated, else the first view's.
    """
    if views == ["full"]:
        return run()
    metrics: dict[str, float] = {}
    predictions: list[dict] = []
    for view in views:
        with adapter_view(model, view, split):
            result = run()
        metrics |= {f"{view}/{name}": value for name, value in result.metrics.items()}
        if view == "full" or not predictions:
            predictions = result.predictions
    return EvalResult(metrics, predictions)


def classify_records(model, tokenizer, spec, examples, batch_size: int, max_length: int) -> list[dict]:
    device = next(model.parameters()).device
    features = encode_classification(examples, tokenizer, max_length)
    records = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        batch = collate(features[start : start + batch_size], tokenizer.pad_token_id)
        batch.pop("labels")
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float()
        predicted = logits.squeeze(-1).tolist() if spec.kind == "regression" else logits.argmax(-1).tolist()
        for example, value in zip(chunk, predicted, strict=True):
            records.append(classification_record(spec, example, value))
    return records


def classification_record(spec, example, value) -> dict:
    text = example.text if example.text_pair is None else f"{example.text}\n{example.text_pair}"
    if spec.kind == "regression":
        return {"id": example.id, "input": text, "prediction": value, "reference": example.label}
    prediction, reference = spec.label_names[value], spec.label_names[example.label]
    return {
        "id": example.id,
        "input": text,
        "prediction": prediction,
        "reference": reference,
        "correct": prediction == reference,
    }


def generate_records(model, tokenizer, spec, examples, batch_size: int, max_new_tokens: int) -> list[dict]:
    device = next(model.parameters()).device
    records = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        prompts = [tokenizer(e.text, add_special_tokens=True)["input_ids"] for e in chunk]
        batch = {k: v.to(device) for k, v in left_pad_prompts(prompts, tokenizer.pad_token_id).items()}
        generated = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        new_tokens = generated[:, batch["input_ids"].shape[1] :]
        for example, tokens in zip(chunk, new_tokens, strict=True):
            output = cut_at_stop(tokenizer.decode(tokens, skip_special_tokens=True))
            prediction = extract_answer(spec.answer, output)
            record = {
                "id": example.id,
                "input": example.text,
                "output": output,
                "prediction": prediction,
                "reference": example.reference,
            }
            references = example.reference if isinstance(example.reference, list) else [example.reference]
            record["correct"] = prediction in references
            records.append(record)
    return records


def cut_at_stop(text: str, stops: Sequence[str] = STOP_STRINGS) -> str:
    """Truncate generated text at the first stop string."""
    cut = min((text.find(s) for s in stops if s in text), default=len(text))
    return text[:cut]
