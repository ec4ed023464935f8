"""The low-confidence remasking sampler: start from an all-[MASK] response slot, reveal the most confident.

At each step t_i (from 1 towards 0) the model predicts x₀ for the masked positions (greedy argmax, or a
float64 Gumbel-max draw at `temperature`), and the `n_i` most confident of them are revealed; `n_i` follows
the schedule so that the masked count tracks 1 − α(t_{i+1}) and nothing is masked after the last step.
Revealed and prompt tokens never change. With `block_length` the slot is filled block by block
(semi-autoregressive), each block with an equal share of the steps; t is the global 1 − i/T throughout.
Outputs are cut at the first EOS, and once every sequence has one, later blocks are not sampled.
LLaDA's sampler (Nie et al., 2025); docs/methods/lora_diffusion.md §2.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from loralab.config.schema import DiffusionConfig
from loralab.diffusion.model import MaskedDiffusionLM
from loralab.diffusion.schedule import Schedule


@dataclass(frozen=True)
class SamplerSettings:
    response_length: int = 32
    steps: int = 64
    temperature: float = 0.0
    block_length: int | None = None

    @classmethod
    def from_config(cls, cfg: DiffusionConfig) -> SamplerSettings:
        return cls(cfg.response_length, cfg.steps, cfg.temperature, cfg.block_length)


def reveal_counts(positions: int, steps: int, schedule: Schedule) -> list[int]:
    """How many of `positions` masked tokens each of `steps` steps reveals: the masked count after step i is
    round(positions · (1 − α(1 − (i+1)/steps))), and 0 after the last."""
    times = torch.tensor([1 - (i + 1) / steps for i in range(steps)], dtype=torch.float64)
    remaining = [round(positions * float(rate)) for rate in schedule.mask_rate(times)]
    remaining[-1] = 0
    counts, masked = [], positions
    for target in remaining:
        target = min(target, masked)
        counts.append(masked - target)
        masked = target
    return counts


def pick(logits: Tensor, temperature: float, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """The token chosen at each position and its probability under the model (the confidence)."""
    probabilities = torch.softmax(logits.double(), dim=-1)
    if temperature == 0:
        confidence, choice = probabilities.max(dim=-1)
        return choice, confidence
    uniform = torch.rand(logits.shape, generator=generator, dtype=torch.float64).to(logits.device)
    gumbel = -torch.log(-torch.log(uniform.clamp(1e-300, 1 - 1e-16)))
    choice = (logits.double() / temperature + gumbel).argmax(dim=-1)
    return choice, probabilities.gather(-1, choice[..., None]).squeeze(-1)


@torch.no_grad()
def sample(
    model: MaskedDiffusionLM,
    prompts: Sequence[Sequence[int]],
    settings: SamplerSettings,
    generator: torch.Generator | None = None,
    on_step: Callable[[Tensor], None] | None = None,
) -> list[list[int]]:
    """Response token ids for each prompt (ids with special tokens), cut before the first EOS."""
    device = next(model.parameters()).device
    length, block = settings.response_length, settings.block_length or settings.response_length
    ids, attention, prompt_mask, slots = response_slots(prompts, length, model.mask_id, model.pad_id, device)
    blocks = length // block
    steps_per_block = settings.steps // blocks
    step = 0
    for b in range(blocks):
        positions = slots[:, b * block : (b + 1) * block]
        for count in reveal_counts(block, steps_per_block, model.schedule):
            t = torch.full((len(prompts),), 1 - step / settings.steps, device=device)
            step += 1
            if count == 0:
                continue
            logits = model.denoise(ids, attention, prompt_mask, t)
            block_logits = logits.gather(1, positions[..., None].expand(-1, -1, logits.shape[-1]))
            choice, confidence = pick(block_logits, settings.temperature, generator)
            confidence = confidence.masked_fill(ids.gather(1, positions) != model.mask_id, float("-inf"))
            chosen = confidence.topk(count, dim=1).indices
            ids.scatter_(1, positions.gather(1, chosen), choice.gather(1, chosen))
            if on_step is not None:
                on_step(ids.clone())
        if (ids.gather(1, slots[:, : (b + 1) * block]) == model.eos_id).any(dim=1).all():
            rest = slots[:, (b + 1) * block :]
            ids.scatter_(1, rest, torch.full_like(rest, model.eos_id))
            break
    return [cut_at_eos(row.tolist(), model.eos_id) for row in ids.gather(1, slots)]


def response_slots(
    prompts: Sequence[Sequence[int]], length: int, mask_id: int, pad_id: int, device
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Right-padded [prompt | length × MASK] rows, their attention and prompt masks, and each row's slot positions."""
    width = max(len(p) for p in prompts) + length
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    slots = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, : len(prompt)] = torch.tensor(list(prompt), dtype=torch.long)
        ids[row, len(prompt) : len(prompt) + length] = mask_id
        attention[row, : len(prompt) + length] = 1
        slots[row] = torch.arange(len(prompt), len(prompt) + length)
    prompt_mask = attention.bool()
    prompt_mask.scatter_(1, slots, False)
    return ids.to(device), attention.to(device), prompt_mask.to(device), slots.to(device)


def cut_at_eos(tokens: list[int], eos_id: int) -> list[int]:
    return tokens[: tokens.index(eos_id)] if eos_id in tokens else tokens
