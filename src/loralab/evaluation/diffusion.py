"""Evaluate a masked diffusion LM with its adapter: generated responses (and a verbaliser argmax) → task metrics.

Classification is scored twice: by the label word the sampler generates (first word, lower-cased, as
`extract_answer('label', …)`), and as `verbalizer_<metric>` by the argmax over the label words' first tokens at
the first response position, in one forward with the whole slot masked (t = 1). Generation tasks are scored on
the generated text. Text tasks report the ELBO per response token (nats, a lower bound on log-likelihood).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from loralab.config.schema import DiffusionConfig
from loralab.data.collate import collate
from loralab.data.tasks import Example, TaskSpec
from loralab.diffusion.data import encode_diffusion, encode_prompt, prompt_and_response
from loralab.diffusion.model import MaskedDiffusionLM
from loralab.diffusion.sampler import SamplerSettings, response_slots, sample
from loralab.evaluation.evaluate import EvalResult
from loralab.evaluation.metrics import compute_metrics, extract_answer

log = logging.getLogger("loralab")
ELBO_SEED = 0  # the (t, mask) draws of a text evaluation are the same at every evaluation


@torch.no_grad()
def evaluate_diffusion(
    model: MaskedDiffusionLM,
    tokenizer: PreTrainedTokenizerBase,
    spec: TaskSpec,
    examples: Sequence[Example],
    cfg: DiffusionConfig,
    batch_size: int,
    max_length: int,
) -> EvalResult:
    """Metrics and predictions.jsonl records of `examples`, with the model as it is (adapter on)."""
    was_training = model.training
    model.eval()
    try:
        if spec.format == "text":
            return EvalResult({"elbo": elbo(model, tokenizer, spec, examples, batch_size, max_length)}, [])
        records = generated_records(model, tokenizer, spec, examples, cfg, batch_size, max_length)
    finally:
        model.train(was_training)
    predictions, references = [r["prediction"] for r in records], [r["reference"] for r in records]
    metrics = compute_metrics(spec.metrics, predictions, references, spec.label_names)
    if spec.format == "classification" and all("verbalizer" in r for r in records):
        verbalized = [r["verbalizer"] for r in records]
        scored = compute_metrics(spec.metrics, verbalized, references, spec.label_names)
        metrics |= {f"verbalizer_{name}": value for name, value in scored.items()}
    return EvalResult(metrics, records)


def generated_records(
    model: MaskedDiffusionLM,
    tokenizer: PreTrainedTokenizerBase,
    spec: TaskSpec,
    examples: Sequence[Example],
    cfg: DiffusionConfig,
    batch_size: int,
    max_length: int,
) -> list[dict]:
    """predictions.jsonl records: prompt, sampled output, extracted answer, reference (and the verbaliser's label)."""
    settings = SamplerSettings.from_config(cfg)
    verbalizer = verbalizer_ids(tokenizer, spec) if spec.format == "classification" else None
    answer = "label" if spec.format == "classification" else spec.answer
    records = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        texts = [prompt_and_response(spec, e)[0] for e in chunk]
        prompts = [encode_prompt(tokenizer, text, max_length - cfg.response_length) for text in texts]
        generator = torch.Generator().manual_seed(start)
        outputs = [
            tokenizer.decode(ids, skip_special_tokens=True) for ids in sample(model, prompts, settings, generator)
        ]
        argmax = verbalize(model, prompts, cfg.response_length, verbalizer) if verbalizer else None
        for i, (example, text, output) in enumerate(zip(chunk, texts, outputs, strict=True)):
            prediction = extract_answer(answer, output)
            references = example.reference if isinstance(example.reference, list) else [example.reference]
            record = {
                "id": example.id,
                "input": text,
                "output": output,
                "prediction": prediction,
                "reference": example.reference,
                "correct": prediction in references,
            }
            if argmax is not None:
                record["verbalizer"] = spec.label_names[argmax[i]]
            records.append(record)
    return records


def verbalizer_ids(tokenizer: PreTrainedTokenizerBase, spec: TaskSpec) -> list[int] | None:
    """The first token of each label word, or None (logged) when two labels share it."""
    first = [tokenizer(name, add_special_tokens=False)["input_ids"][0] for name in spec.label_names]
    if len(set(first)) < len(first):
        log.warning("%s: label words share a first token; no verbaliser metric", spec.name)
        return None
    return first


def verbalize(model: MaskedDiffusionLM, prompts: list[list[int]], length: int, verbalizer: list[int]) -> list[int]:
    """Index of the label whose first token scores highest at the first slot position, slot fully masked."""
    device = next(model.parameters()).device
    ids, attention, prompt_mask, slots = response_slots(prompts, length, model.mask_id, model.pad_id, device)
    logits = model.denoise(ids, attention, prompt_mask, torch.ones(len(prompts), device=device))
    first = logits.gather(1, slots[:, :1, None].expand(-1, -1, logits.shape[-1]))[:, 0]
    return first[:, verbalizer].argmax(dim=-1).tolist()


def elbo(
    model: MaskedDiffusionLM,
    tokenizer: PreTrainedTokenizerBase,
    spec: TaskSpec,
    examples: Sequence[Example],
    batch_size: int,
    max_length: int,
) -> float:
    """−(diffusion loss) per response token over the examples, with seeded (t, mask) draws."""
    features = encode_diffusion(examples, spec, tokenizer, max_length, 1)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(ELBO_SEED)
    total, tokens = 0.0, 0
    for start in range(0, len(features), batch_size):
        batch = {k: v.to(device) for k, v in collate(features[start : start + batch_size], model.pad_id).items()}
        count = int(batch["response_mask"].sum())
        total += float(model.diffusion_loss(**batch, generator=generator).loss) * count
        tokens += count
    return -total / max(tokens, 1)
