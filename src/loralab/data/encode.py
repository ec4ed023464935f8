"""Examples → token features, once per run: by the task's format, cut to `task.max_length` by `task.truncation`.

Features are lists (input_ids, attention_mask, and labels: a class index, a float, or per-token ids with
IGNORE_INDEX where no loss is taken); `collate` pads them into micro-batches later.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from loralab.data.chat import encode_chat, resolve_chat_template
from loralab.data.collate import IGNORE_INDEX
from loralab.data.tasks import Example, TaskSpec
from loralab.errors import DataError

log = logging.getLogger("loralab")


def encode_examples(
    spec: TaskSpec,
    examples: Sequence[Example],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    truncation: str = "right",
) -> list[dict]:
    """The training features of a task's examples (classification, regression, sft, chat, or text on a causal LM)."""
    if spec.format in ("classification", "regression"):
        return encode_classification(examples, tokenizer, max_length, truncation)
    if spec.is_chat:
        template = resolve_chat_template(tokenizer, spec.chat_template)
        sequences = [encode_chat(example.messages, tokenizer, template) for example in examples]
    elif spec.format == "sft":
        sequences = [sft_sequence(example, tokenizer) for example in examples]
    else:
        examples = [example for example in examples if example.text.strip()]
        sequences = [text_sequence(example, tokenizer) for example in examples]
    return fit_sequences(sequences, examples, max_length, truncation)


def sft_sequence(example: Example, tokenizer: PreTrainedTokenizerBase) -> dict:
    """Prompt + target + EOS, with labels IGNORE_INDEX on the prompt so only the answer carries loss."""
    prompt = tokenizer(example.text, add_special_tokens=True)["input_ids"]
    target = tokenizer(example.target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = prompt + target
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [IGNORE_INDEX] * len(prompt) + target}


def text_sequence(example: Example, tokenizer: PreTrainedTokenizerBase) -> dict:
    """Plain text for continued pre-training of a causal LM: every token carries loss, EOS closes the document."""
    ids = tokenizer(example.text, add_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)}


def fit_sequences(sequences: list[dict], examples: Sequence[Example], max_length: int, truncation: str) -> list[dict]:
    """Cut each sequence to `max_length` (right: keep the start, left: keep the end, error: refuse), then drop
    those left without a single loss token, saying how many."""
    if truncation == "error":
        refuse_long(sequences, examples, max_length)
    keep = slice(0, max_length) if truncation == "right" else slice(-max_length, None)
    fitted = [{key: values[keep] for key, values in sequence.items()} for sequence in sequences]
    kept = [f for f in fitted if any(label != IGNORE_INDEX for label in f["labels"])]
    if not kept:
        raise DataError(f"no example keeps a loss token within task.max_length={max_length}; raise it")
    if len(kept) < len(fitted):
        log.warning(
            "%d of %d examples have no answer token within task.max_length=%d (task.truncation=%s) and are left out",
            len(fitted) - len(kept),
            len(fitted),
            max_length,
            truncation,
        )
    return kept


def refuse_long(sequences: list[dict], examples: Sequence[Example], max_length: int) -> None:
    """task.truncation=error: one line naming the longest example when any is over `max_length`."""
    lengths = [len(s["input_ids"]) for s in sequences]
    over = sum(length > max_length for length in lengths)
    if over:
        longest = max(range(len(lengths)), key=lengths.__getitem__)
        raise DataError(
            f"task.truncation=error: {over} example(s) exceed task.max_length={max_length}; the longest, "
            f"id {examples[longest].id}, has {lengths[longest]} tokens"
        )


def encode_classification(
    examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase, max_length: int, truncation: str = "right"
) -> list[dict]:
    """Token ids (and the label) of each sentence or sentence pair, cut to max_length from the chosen side."""
    if truncation == "error":
        sequences = [tokenizer(e.text, e.text_pair)["input_ids"] for e in examples]
        refuse_long([{"input_ids": s} for s in sequences], examples, max_length)
    side = tokenizer.truncation_side
    tokenizer.truncation_side = "left" if truncation == "left" else "right"
    try:
        features = []
        for example in examples:
            encoded = tokenizer(example.text, example.text_pair, truncation=True, max_length=max_length)
            feature = {key: list(value) for key, value in encoded.items()}
            feature["labels"] = example.label
            features.append(feature)
    finally:
        tokenizer.truncation_side = side
    return features
