"""Resolve `target_modules` presets (standard | extended | all-linear) per model architecture."""

from __future__ import annotations

from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from loralab.errors import ConfigError

PRESETS = ("standard", "extended", "all-linear")

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
    family = getattr(getattr(model, "config", None), "model_type", None)
    table = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING if target_modules == "standard" else EXTENDED
    if family not in table:
        raise ConfigError(
            f"method.adapter.target_modules={target_modules} has no entry for model type '{family}'; "
            "give a list of module names or a regex"
        )
    targets = table[family]
    return list(targets) if isinstance(targets, list | tuple) else targets
