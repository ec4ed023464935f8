"""Tokenise examples once, then pad micro-batches on the fly (classification pairs, SFT prompt+target, packed rows)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from loralab.data.packing import IGNORE_INDEX, collate_packed


def encode_classification(examples: Sequence, tokenizer: PreTrainedTokenizerBase, max_length: int) -> list[dict]:
    """Token ids (and the label) of each sentence or sentence pair, truncated to max_length."""
    features = []
    for example in examples:
        encoded = tokenizer(example.text, example.text_pair, truncation=True, max_length=max_length)
        feature = {key: list(value) for key, value in encoded.items()}
        feature["labels"] = example.label
        features.append(feature)
    return features


def encode_sft(examples: Sequence, tokenizer: PreTrainedTokenizerBase, max_length: int) -> list[dict]:
    """Prompt + target + EOS, with labels IGNORE_INDEX on the prompt so only the answer carries loss.

    When too long, the prompt is cut from the left (down to half the budget) before the target is cut.
    """
    features = []
    for example in examples:
        prompt = tokenizer(example.text, add_special_tokens=True)["input_ids"]
        target = tokenizer(example.target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(prompt) + len(target) > max_length:
            keep = max(max_length - len(target), max_length // 2)
            prompt = prompt[-keep:]
            target = target[: max_length - len(prompt)]
        ids = prompt + target
        features.append(
            {
                "input_ids": ids,
                "attention_mask": [1] * len(ids),
                "labels": [IGNORE_INDEX] * len(prompt) + target,
            }
        )
    return features


def collate(features: Sequence[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch to its longest sequence; SFT labels are padded with IGNORE_INDEX.

    Packed rows (they carry `position_ids`) go to `collate_packed`, so callers need not know which they hold.
    """
    if "position_ids" in features[0]:
        return collate_packed(features, pad_token_id)
    width = max(len(f["input_ids"]) for f in features)
    batch: dict[str, torch.Tensor] = {}
    for key in features[0]:
        values = [f[key] for f in features]
        if key == "labels" and not isinstance(values[0], list):
            dtype = torch.float32 if isinstance(values[0], float) else torch.long
            batch[key] = torch.tensor(values, dtype=dtype)
            continue
        pad = {"input_ids": pad_token_id, "labels": IGNORE_INDEX}.get(key, 0)
        batch[key] = torch.tensor([v + [pad] * (width - len(v)) for v in values], dtype=torch.long)
    return batch


def left_pad_prompts(prompts: Sequence[list[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Left-pad prompt ids for batched generation (decoders continue from the last real token)."""
    width = max(len(p) for p in prompts)
    ids = [[pad_token_id] * (width - len(p)) + list(p) for p in prompts]
    mask = [[0] * (width - len(p)) + [1] * len(p) for p in prompts]
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}
