"""Load a model and its tokenizer: a preset, a local directory, or a hub id (transformers Auto classes)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase
from transformers import logging as hf_logging

from loralab.config.schema import ModelConfig
from loralab.errors import ModelError, did_you_mean
from loralab.models.presets import AUTO_CLASSES, PRESETS, TINY_FAMILIES, build_tiny, minilm_directory

log = logging.getLogger("loralab")
Head = Literal["seq_cls", "causal_lm", "masked_lm"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(
    cfg: ModelConfig, head: Head, num_labels: int | None = None
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """The model with the requested head, in `cfg.dtype`, and a tokenizer with a pad token."""
    if cfg.name in TINY_FAMILIES:
        model, tokenizer = build_tiny(TINY_FAMILIES[cfg.name], head, num_labels)
        model = model.to(DTYPES[cfg.dtype])
    else:
        source = model_source(cfg.name)
        tokenizer = load_tokenizer(source, cfg.trust_remote_code)
        model = from_pretrained(source, head, num_labels, cfg)
        if cfg.name == "minilm":
            log.info(
                "minilm: pretrained all-MiniLM-L6-v2 encoder from %s; the %s head is newly initialised", source, head
            )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model, tokenizer


def model_source(name: str) -> str:
    """A local directory for presets and paths; otherwise the name itself, as a hub id."""
    if name == "minilm":
        return str(minilm_directory())
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    looks_like_path = name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace("/", "", 1)
    hint = did_you_mean(name, PRESETS)
    if looks_like_path or hint:
        raise ModelError(f"unknown model '{name}': not a preset or an existing directory{hint}")
    return name


def load_tokenizer(source: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(unavailable(source, exc)) from None


def from_pretrained(source: str, head: Head, num_labels: int | None, cfg: ModelConfig) -> nn.Module:
    kwargs = {"dtype": DTYPES[cfg.dtype], "trust_remote_code": cfg.trust_remote_code}
    if num_labels is not None:
        kwargs["num_labels"] = num_labels
    if cfg.quantization == "nf4":
        kwargs["quantization_config"] = nf4_config()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized head" warnings: we log our own line
    hf_logging.disable_progress_bar()
    try:
        return AUTO_CLASSES[head].from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(unavailable(source, exc)) from None
    finally:
        hf_logging.set_verbosity(verbosity)


def nf4_config():
    """4-bit NF4 weights with bf16 compute and double quantisation (QLoRA); CUDA only."""
    if not torch.cuda.is_available():
        raise ModelError("model.quantization=nf4 needs a CUDA GPU (bitsandbytes)")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
    )


def unavailable(source: str, exc: Exception) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or "connect" in first.lower()
    reason = "the hub is unreachable and it is not in the local cache" if offline else first
    presets = ", ".join(PRESETS)
    return f"cannot load model '{source}': {reason}; pass a local directory as model.name or a preset ({presets})"


def model_family(model: nn.Module) -> str:
    """The architecture family (`config.model_type`: llama, bert, roberta, gpt2, ...)."""
    return getattr(getattr(model, "config", None), "model_type", "unknown")
