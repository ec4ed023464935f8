"""Sequence packing for causal-LM training: several examples per row, no padding between them.

A packed row concatenates whole examples; `position_ids` restart at 0 at each one. With no `attention_mask` in
the batch, transformers reads the restarts as example boundaries and builds a block-diagonal causal mask from
them (`find_packed_sequence_indices` in transformers/masking_utils.py); flash-attention's varlen kernels take
the same `position_ids`. So each example attends only to itself, as if alone, and no compute goes to padding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

IGNORE_INDEX = -100  # the label transformers' cross-entropy skips


def pack(features: Sequence[dict], max_length: int) -> list[dict]:
    """Greedy packing in the given order: each row takes whole examples while they fit in `max_length` tokens.

    Rows hold `input_ids`, `labels` (the first token of every example ignored, so none is predicted from the
    example before it), `position_ids` restarting at each example and `lengths` (its examples' token counts).
    """
    rows, current, used = [], [], 0
    for feature in features:
        length = len(feature["input_ids"])
        if length > max_length:
            raise ValueError(f"an example of {length} tokens does not fit a packed row of {max_length}")
        if current and used + length > max_length:
            rows.append(packed_row(current))
            current, used = [], 0
        current.append(feature)
        used += length
    if current:
        rows.append(packed_row(current))
    return rows


def packed_row(features: Sequence[dict]) -> dict:
    """One row of whole examples, concatenated."""
    return {
        "input_ids": [token for f in features for token in f["input_ids"]],
        "labels": [label for f in features for label in [IGNORE_INDEX, *f["labels"][1:]]],
        "position_ids": [p for f in features for p in range(len(f["input_ids"]))],
        "lengths": [len(f["input_ids"]) for f in features],
    }


def collate_packed(rows: Sequence[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad packed rows to the longest; the padding is a block of its own (positions 0, 1, … again).

    No `attention_mask`: that is what sends transformers down the packed path. `token_mask` (1 on real tokens)
    is for whoever counts tokens (GRIT's statistics); the training loop keeps it from the model.
    """
    width = max(len(row["input_ids"]) for row in rows)
    pads = [width - len(row["input_ids"]) for row in rows]
    return {
        "input_ids": torch.tensor([r["input_ids"] + [pad_token_id] * p for r, p in zip(rows, pads, strict=True)]),
        "labels": torch.tensor([r["labels"] + [IGNORE_INDEX] * p for r, p in zip(rows, pads, strict=True)]),
        "position_ids": torch.tensor([r["position_ids"] + list(range(p)) for r, p in zip(rows, pads, strict=True)]),
        "token_mask": torch.tensor([[1] * (width - p) + [0] * p for p in pads]),
    }
