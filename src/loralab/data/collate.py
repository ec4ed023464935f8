"""Pad tokenised features into micro-batches on the fly (data.encode tokenises them once per run; packed rows too)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from loralab.data.packing import IGNORE_INDEX, collate_packed


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
