"""Sequence packing for causal-LM training: several examples per row, no padding between them.

A packed row concatenates whole examples; `position_ids` restart at 0 at each one. With no `attention_mask` in
the batch, transformers reads the restarts as example boundaries and builds a block-diagonal causal mask from
them (`find_packed_sequence_indices` in transformers/masking_utils.py); flash-attention's varlen kernels take
the same `position_ids`. So each example attends only to itself, as if alone, and no compute goes to padding.

Examples go into rows best-fit decreasing (TRL's default packing strategy, "bfd"): longest first, each into the
row it leaves the least room in. Rows come out fuller than greedy in-order packing (fewer rows, less padding up to
the batch's longest row). The data order is not kept; it need not be, as `BatchOrder` shuffles rows every epoch.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import torch

IGNORE_INDEX = -100  # the label transformers' cross-entropy skips


def pack(features: Sequence[dict], max_length: int) -> list[dict]:
    """Best-fit-decreasing rows of whole examples, at most `max_length` tokens each (deterministic)."""
    return [packed_row([features[i] for i in row]) for row in best_fit_decreasing(features, max_length)]


def best_fit_decreasing(features: Sequence[dict], max_length: int) -> list[list[int]]:
    """Indices per row: longest example first (ties by index), each into the row with the least room that still
    fits it (ties: the earliest row), else a new row. O(n log n) comparisons: bisection over sorted (room, row)."""
    lengths = [len(feature["input_ids"]) for feature in features]
    if lengths and max(lengths) > max_length:
        raise ValueError(f"an example of {max(lengths)} tokens does not fit a packed row of {max_length}")
    rows: list[list[int]] = []
    rooms: list[tuple[int, int]] = []  # (room left, row), sorted
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        slot = bisect.bisect_left(rooms, (lengths[index], -1))
        if slot == len(rooms):
            rows.append([])
            room, row = max_length, len(rows) - 1
        else:
            room, row = rooms.pop(slot)
        rows[row].append(index)
        bisect.insort(rooms, (room - lengths[index], row))
    return rows


def packed_row(features: Sequence[dict]) -> dict:
    """Whole examples concatenated: `input_ids`, `labels` (every example's first ignored, so none is predicted from
    the example before it), `position_ids` restarting at each example and `lengths` (its examples' token counts)."""
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
