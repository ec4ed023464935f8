"""A masked (absorbing-state) diffusion LM on a pretrained bidirectional encoder with a masked-LM head.

The backbone predicts x₀ at masked positions ("SUBS": the [MASK] logit is −∞; unmasked positions carry over).
Sequences are a prompt (never masked) followed by a fixed-length response slot; the forward process masks each
response token with probability 1 − α_t. Adapters see the noise level through `conditioning` (t and the prompt
positions), set for the length of each forward. Parts the LM owns beyond the checkpoint — a time embedding,
and a masked-LM head the checkpoint lacks — train with every adapter and are saved beside it.
MDLM and LLaDA's formulation; docs/methods/lora_diffusion.md §1 states every choice.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from loralab.adapters.base import check_safetensors
from loralab.config.schema import DiffusionConfig, ModelConfig
from loralab.diffusion.schedule import Schedule, sample_times
from loralab.errors import AdapterError, ModelError
from loralab.models.load import load_model_reporting_new

log = logging.getLogger("loralab")
PARTS_FILE = "diffusion_parts.safetensors"


@dataclass
class Conditioning:
    """What adapters may read during one forward: each sample's time t and its prompt positions."""

    t: Tensor  # (batch,)
    prompt_mask: Tensor  # (batch, length) bool


@dataclass
class DiffusionOutput:
    loss: Tensor
    masked_tokens: int


class TimeEmbedding(nn.Module):
    """Sinusoidal features of t → MLP → a vector added to every input embedding; zero at init (a no-op)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, t: Tensor) -> Tensor:
        half = self.hidden // 2
        frequencies = torch.exp(-math.log(10_000) * torch.arange(half, device=t.device) / half)
        angles = 1000 * t.float()[:, None] * frequencies[None]
        features = torch.cat([angles.sin(), angles.cos()], dim=-1)
        features = F.pad(features, (0, self.hidden - features.shape[-1]))
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class MaskedDiffusionLM(nn.Module):
    """`model.kind: masked_diffusion` — the diffusion loss in `forward`, x₀ logits in `denoise`."""

    def __init__(
        self,
        backbone: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        schedule: Schedule,
        time_conditioning: bool = False,
        new_head: tuple[str, ...] = (),
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.config = backbone.config
        self.schedule = schedule
        self.mask_id, self.pad_id, self.eos_id = special_ids(tokenizer)
        hidden = backbone.config.hidden_size
        self.time_embedding = TimeEmbedding(hidden) if time_conditioning else None
        named = dict(backbone.named_parameters())
        self.head_parameters = {name: named[name] for name in new_head if name in named}
        self.conditioning: Conditioning | None = None

    # ---- the model's own trainable parts ------------------------------------------------------------

    def own_parameters(self, head: bool = True) -> dict[str, nn.Parameter]:
        """Parameters that train whatever the adapter: the time embedding and a head the checkpoint lacked."""
        parts = {f"head.{name}": p for name, p in self.head_parameters.items()} if head else {}
        if self.time_embedding is not None:
            parts |= {f"time_embedding.{name}": p for name, p in self.time_embedding.named_parameters()}
        return parts

    def train_own_parts(self) -> None:
        for parameter in self.own_parameters().values():
            parameter.requires_grad_(True)

    def save_own_parts(self, directory: Path, head: bool = True) -> None:
        parts = self.own_parameters(head)
        if parts:
            save_file({k: v.detach().contiguous().cpu() for k, v in parts.items()}, str(Path(directory) / PARTS_FILE))

    def load_own_parts(self, directory: Path) -> None:
        parts, path = self.own_parameters(), Path(directory) / PARTS_FILE
        if not parts:
            return
        check_safetensors(path)
        saved = load_file(str(path))
        if set(saved) != set(parts) or any(saved[k].shape != parts[k].shape for k in parts):
            raise AdapterError(f"{path} does not fit this diffusion model (time conditioning or head differ)")
        with torch.no_grad():
            for key, parameter in parts.items():
                parameter.copy_(saved[key])

    def save_pretrained(self, directory: Path, tokenizer: PreTrainedTokenizerBase) -> None:
        """The whole LM as a model directory (`model.name` of later runs): backbone, tokenizer, time embedding."""
        self.backbone.save_pretrained(str(directory))
        tokenizer.save_pretrained(str(directory))
        self.save_own_parts(Path(directory), head=False)

    # ---- forward ---------------------------------------------------------------------------------------

    def denoise(self, ids: Tensor, attention_mask: Tensor, prompt_mask: Tensor, t: Tensor) -> Tensor:
        """Logits of x₀ at every position of a partly masked sequence at time t; [MASK] is never predicted."""
        self.conditioning = Conditioning(t, prompt_mask.bool())
        try:
            if self.time_embedding is None:
                output = self.backbone(input_ids=ids, attention_mask=attention_mask)
            else:
                embeds = self.backbone.get_input_embeddings()(ids) + self.time_embedding(t)[:, None, :]
                output = self.backbone(inputs_embeds=embeds, attention_mask=attention_mask)
        finally:
            self.conditioning = None
        logits = output.logits
        logits[..., self.mask_id] = float("-inf")  # in place: a vocabulary-wide copy per forward is not needed
        return logits

    def diffusion_loss(
        self, input_ids: Tensor, attention_mask: Tensor, response_mask: Tensor, generator: torch.Generator | None = None
    ) -> DiffusionOutput:
        """Σ over masked response tokens of w(t)·CE, divided by the number of response tokens."""
        response = response_mask.bool()
        t = sample_times(input_ids.shape[0], self.schedule.eps, generator, input_ids.device)
        masked = forward_process(response, t, self.schedule, generator)
        noisy = input_ids.masked_fill(masked, self.mask_id)
        logits = self.denoise(noisy, attention_mask, attention_mask.bool() & ~response, t)
        ce = F.cross_entropy(logits[masked].float(), input_ids[masked], reduction="none")
        weights = self.schedule.weight(t)[:, None].expand_as(masked)[masked]
        loss = (weights * ce).sum() / response.sum().clamp_min(1)
        return DiffusionOutput(loss=loss, masked_tokens=int(masked.sum()))

    def forward(self, input_ids: Tensor, attention_mask: Tensor, response_mask: Tensor, **_: Tensor) -> DiffusionOutput:
        """The training loss: the diffusion loss of a fresh (t, mask) draw plus the adapters' regularisers."""
        output = self.diffusion_loss(input_ids, attention_mask, response_mask)
        output.loss = output.loss + self.regularization()
        return output

    def regularization(self) -> Tensor | float:
        """The sum of every submodule's `regularization_loss()` (trajectory LoRA's rank and orthogonality terms)."""
        terms = [m.regularization_loss() for m in self.modules() if m is not self and hasattr(m, "regularization_loss")]
        return sum(terms) if terms else 0.0


def forward_process(
    response: Tensor, t: Tensor, schedule: Schedule, generator: torch.Generator | None = None
) -> Tensor:
    """Which positions are masked at time t: each response position independently with probability 1 − α_t."""
    draws = torch.rand(response.shape, generator=generator, device=response.device)
    return (draws < schedule.mask_rate(t)[:, None]) & response


def special_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int, int, int]:
    """[MASK], pad and EOS ids (EOS: the tokenizer's, else its separator); the mask must differ from the pad."""
    mask, pad = tokenizer.mask_token_id, tokenizer.pad_token_id
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if mask is None or eos is None:
        raise ModelError("a masked diffusion LM needs a tokenizer with a mask token and an EOS or SEP token")
    if mask == pad:
        raise ModelError("the tokenizer's mask and pad tokens are the same; a masked diffusion LM needs them apart")
    return mask, pad, eos


def load_diffusion_model(
    cfg: ModelConfig, diffusion: DiffusionConfig
) -> tuple[MaskedDiffusionLM, PreTrainedTokenizerBase]:
    """The backbone with its masked-LM head (a missing head: tied decoder + new transform), wrapped for diffusion."""
    backbone, tokenizer, new = load_model_reporting_new(cfg, "masked_lm")
    new_head = tuple(name for name in new if not name.endswith("decoder.weight"))
    identity_transforms(backbone, new_head)
    model = MaskedDiffusionLM(
        backbone, tokenizer, Schedule.from_config(diffusion), diffusion.time_conditioning == "add", new_head
    )
    if model.head_parameters:
        log.info(
            "%s has no trained masked-LM head: the decoder is the tied word-embedding matrix; the head's %d new "
            "tensors (transform identity-initialised, bias) train with every adapter",
            cfg.name,
            len(model.head_parameters),
        )
    parts = Path(cfg.name) / PARTS_FILE
    if parts.is_file():  # a backbone saved by continued pre-training keeps its time embedding beside it
        model.load_own_parts(parts.parent)
    return model, tokenizer


def identity_transforms(backbone: nn.Module, new: tuple[str, ...]) -> None:
    """New square projections of the head start as the identity, so the tied decoder first scores tokens by
    their embedding's agreement with the hidden state."""
    named = dict(backbone.named_parameters())
    with torch.no_grad():
        for name in new:
            parameter = named.get(name)
            if parameter is not None and parameter.dim() == 2 and parameter.shape[0] == parameter.shape[1]:
                parameter.copy_(torch.eye(parameter.shape[0]))
                if name.removesuffix("weight") + "bias" in named:
                    named[name.removesuffix("weight") + "bias"].zero_()
