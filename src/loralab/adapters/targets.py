"""Resolve `target_modules` presets (standard | extended | attention-ffn | all-linear) per model architecture."""

from __future__ import annotations

import re

from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn
from transformers.pytorch_utils import Conv1D

from loralab.errors import ConfigError

PRESETS = ("standard", "extended", "attention-ffn", "all-linear")
BLOCK_INDEX = re.compile(r"\.\d+\.")

# q,k,v,o per family; regexes where a bare name ("dense") would also match feed-forward layers.
EXTENDED = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "bert": r".*attention\.(self\.(query|key|value)|output\.dense)",
    "roberta": r".*attention\.(self\.(query|key|value)|output\.dense)",
    "gpt2": r".*attn\.(c_attn|c_proj)",
}


def resolve_targets(target_modules: str | list[str], model: nn.Module) -> str | list[str]:
    """Turn a preset into module names for this model; lists and regexes pass through to PEFT."""
    if isinstance(target_modules, list) or target_modules not in PRESETS:
        return target_modules
    if target_modules == "all-linear":
        return "all-linear"
    if target_modules == "attention-ffn":
        return block_linears(model)
    family = getattr(getattr(model, "config", None), "model_type", None)
    table = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING if target_modules == "standard" else EXTENDED
    if family not in table:
        raise ConfigError(
            f"method.adapter.target_modules={target_modules} has no entry for model type '{family}'; "
            "give a list of module names or a regex"
        )
    targets = table[family]
    return list(targets) if isinstance(targets, list | tuple) else targets


def block_linears(model: nn.Module) -> str:
    """A regex for the linear layers inside the numbered transformer blocks (attention and feed-forward), so
    that no head, pooler or head transform is matched."""
    suffixes = {
        BLOCK_INDEX.split(name, maxsplit=1)[1]
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear | Conv1D) and BLOCK_INDEX.search(name)
    }
    if not suffixes:
        raise ConfigError("method.adapter.target_modules=attention-ffn found no linear layers in numbered blocks")
    return r".*\.\d+\.(" + "|".join(sorted(map(re.escape, suffixes))) + ")"
