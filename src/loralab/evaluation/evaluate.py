"""Evaluate a model with its adapter on a task: real predictions (argmax logits or generated text) → metrics."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from loralab.adapters.dual_rank import adapter_view
from loralab.data.chat import chat_prompt, resolve_chat_template
from loralab.data.collate import IGNORE_INDEX, collate
from loralab.data.encode import encode_classification, encode_examples
from loralab.data.tasks import Example, TaskSpec
from loralab.errors import LoraLabError
from loralab.evaluation.generate import Generator, HfGenerator
from loralab.evaluation.gsm8k import Gsm8kProfile, get_profile, score_outputs
from loralab.evaluation.metrics import check_metrics, compute_metrics, extract_answer

STOP_STRINGS = ("\n\nQuestion:", "Question:", "</s>", "<|im_end|>", "<|endoftext|>")  # generation tasks but GSM8K


@dataclass
class EvalResult:
    metrics: dict[str, float]
    predictions: list[dict]


def check_task_metrics(spec: TaskSpec) -> None:
    """Refuse a task.metrics name `evaluate` could not compute, so a run fails before training, not after.

    GSM8K-style tasks are scored by eval.profile's metrics and text tasks by their loss: neither looks the names up.
    """
    if spec.answer != "gsm8k" and spec.format != "text":
        check_metrics(spec.metrics)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    spec,
    examples: Sequence,
    batch_size: int,
    max_length: int,
    max_new_tokens: int = 128,
    profile: str = "lm-eval",
) -> EvalResult:
    """Score `examples` with the model as it is (adapter on), from argmax logits or greedy generation.

    GSM8K-style tasks are prompted zero-shot and scored by the GSM8K `profile`.
    """
    was_training = model.training
    model.eval()
    try:
        if spec.answer == "gsm8k":
            generator = HfGenerator(model, tokenizer, batch_size)
            return evaluate_gsm8k(generator, examples, [], get_profile(profile), 0, max_new_tokens)
        if spec.format == "text":
            return language_model_loss(model, tokenizer, spec, examples, batch_size, max_length)
        if spec.generates:
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
        predicted = logits.squeeze(-1).tolist() if spec.format == "regression" else logits.argmax(-1).tolist()
        for example, value in zip(chunk, predicted, strict=True):
            records.append(classification_record(spec, example, value))
    return records


def classification_record(spec, example, value) -> dict:
    text = example.text if example.text_pair is None else f"{example.text}\n{example.text_pair}"
    if spec.format == "regression":
        return {"id": example.id, "input": text, "prediction": value, "reference": example.label}
    prediction, reference = spec.label_names[value], spec.label_names[example.label]
    return {
        "id": example.id,
        "input": text,
        "prediction": prediction,
        "reference": reference,
        "correct": prediction == reference,
    }


def generation_prompts(spec, examples: Sequence[Example], tokenizer) -> list[str]:
    """What the model continues: the prompt text, or a conversation rendered up to its last assistant turn."""
    if not spec.is_chat:
        return [e.text for e in examples]
    template = resolve_chat_template(tokenizer, spec.chat_template)
    return [chat_prompt(e.messages, tokenizer, template)[0] for e in examples]


def generate_records(model, tokenizer, spec, examples, batch_size: int, max_new_tokens: int) -> list[dict]:
    prompts = generation_prompts(spec, examples, tokenizer)
    generator = HfGenerator(model, tokenizer, batch_size, add_special_tokens=not spec.is_chat)  # templates add BOS
    outputs = generator.generate(prompts, max_new_tokens, STOP_STRINGS)
    records = []
    for example, prompt, output in zip(examples, prompts, outputs, strict=True):
        prediction = extract_answer(spec.answer, output)
        references = example.reference if isinstance(example.reference, list) else [example.reference]
        records.append(
            {
                "id": example.id,
                "input": prompt,
                "output": output,
                "prediction": prediction,
                "reference": example.reference,
                "correct": prediction in references,
            }
        )
    return records


def language_model_loss(model, tokenizer, spec, examples, batch_size: int, max_length: int) -> EvalResult:
    """Text tasks on a causal LM: the mean next-token loss over every eval token, and its perplexity."""
    device = next(model.parameters()).device
    features = encode_examples(spec, examples, tokenizer, max_length)
    total, tokens, records = 0.0, 0, []
    for start in range(0, len(features), batch_size):
        batch = {
            k: v.to(device) for k, v in collate(features[start : start + batch_size], tokenizer.pad_token_id).items()
        }
        labels = batch.pop("labels")
        logits = model(**batch).logits.float()[:, :-1]
        targets = labels[:, 1:]
        losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        counted = (targets != IGNORE_INDEX).sum(-1)
        for row, count in zip(losses.sum(-1).tolist(), counted.tolist(), strict=True):
            records.append({"loss": row / max(count, 1), "tokens": count})
            total, tokens = total + row, tokens + count
    mean = total / max(tokens, 1)
    return EvalResult({"loss": mean, "perplexity": math.exp(min(mean, 50.0))}, records)


def evaluate_gsm8k(
    generator: Generator,
    examples: Sequence[Example],
    shot_pool: Sequence[Example],
    profile: Gsm8kProfile,
    fewshot: int,
    max_new_tokens: int | None = None,
    adapter: str | None = None,
) -> EvalResult:
    """Greedy answers to GSM8K-style questions, prompted and scored by `profile` with `fewshot` shots from the pool."""
    pool = [(e.source["question"], e.source["answer"]) for e in shot_pool]
    if fewshot > len(pool):
        raise LoraLabError(f"{fewshot} shots asked for, but the train split holds {len(pool)} examples")
    shots = profile.select_shots(pool, fewshot, len(examples))
    prompts = [profile.prompt(e.source["question"], s) for e, s in zip(examples, shots, strict=True)]
    outputs = generator.generate(prompts, max_new_tokens or profile.max_new_tokens, profile.stop, adapter)
    metrics, scores = score_outputs(profile, outputs, [e.reference for e in examples])
    records = [gsm8k_record(e, p, o, s, profile) for e, p, o, s in zip(examples, prompts, outputs, scores, strict=True)]
    return EvalResult(metrics, records)


def gsm8k_record(example: Example, prompt: str, output: str, score: dict, profile: Gsm8kProfile) -> dict:
    """A predictions.jsonl row: `prediction`/`correct` by the profile's first metric, then every metric's."""
    first = profile.metrics[0]
    return {
        "id": example.id,
        "input": prompt,
        "output": output,
        "prediction": score["answers"][first],
        "reference": example.reference,
        "correct": score["correct"][first],
        "answers": score["answers"],
        "matches": score["correct"],
    }
