"""Load a model and its tokenizer: a preset, a local directory, or a hub id (transformers Auto classes)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Literal

import huggingface_hub
import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoTokenizer,
    BitsAndBytesConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers import logging as hf_logging

from loralab.config.schema import ModelConfig
from loralab.errors import ModelError, did_you_mean, first_line
from loralab.models.presets import (
    AUTO_CLASSES,
    PRESETS,
    TINY_FAMILIES,
    build_tiny,
    dropout_overrides,
    is_preset,
    minilm_directory,
    seeded,
    tiny_config,
    tiny_tokenizer,
)

log = logging.getLogger("loralab")
Head = Literal["seq_cls", "causal_lm", "masked_lm"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(
    cfg: ModelConfig, head: Head, num_labels: int | None = None
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """The model with the requested head, in `cfg.dtype`, and a tokenizer with a pad token."""
    model, tokenizer, _ = load_model_reporting_new(cfg, head, num_labels)
    return model, tokenizer


def load_model_reporting_new(
    cfg: ModelConfig, head: Head, num_labels: int | None = None
) -> tuple[nn.Module, PreTrainedTokenizerBase, tuple[str, ...]]:
    """As `load_model`, plus the names of the parameters the checkpoint lacked (newly initialised)."""
    quantization = nf4_config() if cfg.quantization == "nf4" else None
    tokenizer = load_tokenizer(cfg.name, cfg.trust_remote_code)
    new: tuple[str, ...] = ()
    if cfg.name in TINY_FAMILIES:
        model = build_tiny(cfg.name, head, num_labels, cfg.dropout).to(DTYPES[cfg.dtype])
        if quantization is not None:
            model, _ = reload_quantized(model, head, cfg, quantization)
    else:
        with seeded() if is_preset(cfg.name) else nullcontext():  # a new head is the same in every process
            model, new = from_pretrained(source(cfg.name), head, num_labels, cfg, quantization)
        if cfg.name == "minilm":
            log.info("minilm: pretrained all-MiniLM-L6-v2 encoder; the %s head is newly initialised", head)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    return model, tokenizer, new


def refuse_encoder(cfg: ModelConfig) -> None:
    """Refuse, before building it, a causal-LM head on an encoder (its config read without the weights)."""
    if cfg.name in TINY_FAMILIES:
        config = tiny_config(cfg.name, None)
    else:
        try:
            with quiet_transformers():
                config = AutoConfig.from_pretrained(source(cfg.name), trust_remote_code=cfg.trust_remote_code)
        except (OSError, ValueError):
            return  # the load itself reports why the model is unavailable
    if is_encoder(config):
        raise ModelError(
            f"model '{cfg.name}' is an encoder ({config.model_type}), not a causal LM: sft, chat and text "
            "tasks generate text and need a decoder (e.g. tiny-llama), or model.kind=masked_diffusion for sft/text"
        )


def is_encoder(config: PretrainedConfig) -> bool:
    """Whether a model is a bidirectional encoder (BERT, RoBERTa, ModernBERT…): its family has a masked-LM head
    and the config is neither a decoder nor an encoder-decoder (transformers would still build a 'causal' head)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    decoder = getattr(config, "is_decoder", False) or getattr(config, "is_encoder_decoder", False)
    return config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not decoder


def enable_checkpointing(model: PreTrainedModel) -> None:
    """Recompute activations in backward (non-reentrant), with the KV cache off as checkpointing requires."""
    # transformers 5.2x renamed gradient_checkpointing_enable (deprecated, kept until v6) to activation_...
    enable = getattr(model, "activation_checkpointing_enable", None)
    try:
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    except ValueError as exc:
        raise ModelError(f"model.gradient_checkpointing: {exc}") from None
    model.config.use_cache = False


def load_tokenizer(name: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer of a preset, local directory or hub id; the EOS token pads when there is no pad token."""
    if name in TINY_FAMILIES:
        return tiny_tokenizer(name)
    location = source(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(unavailable(location, exc)) from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(f"the tokenizer of '{name}' has neither a pad nor an EOS token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def source(name: str) -> str:
    """Where from_pretrained finds `name`: the bundled MiniLM directory, a local directory, or a hub id.

    A name close to a preset that is neither a directory nor cached is taken as a typo and refused at
    once, rather than after the hub's network retries.
    """
    if name == "minilm":
        return str(minilm_directory())
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"model directory '{name}' has no config.json (save it with save_pretrained)")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelError(f"model directory '{name}' does not exist")
    hint = did_you_mean(name, PRESETS)
    if hint and not is_cached(name):
        raise ModelError(f"unknown model '{name}'{hint}")
    return name


def is_cached(repo_id: str) -> bool:
    """Whether the local hub cache holds the config of `repo_id` (no network)."""
    try:
        return isinstance(huggingface_hub.try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repo id
        return False


def from_pretrained(
    location: str, head: Head, num_labels: int | None, cfg: ModelConfig, quantization: BitsAndBytesConfig | None
) -> tuple[PreTrainedModel, tuple[str, ...]]:
    """The Auto class of the head, loaded from a directory or hub id, and the names of its newly initialised
    parameters; load failures become a ModelError."""
    kwargs = {"dtype": DTYPES[cfg.dtype], "trust_remote_code": cfg.trust_remote_code, "output_loading_info": True}
    if num_labels is not None:
        kwargs["num_labels"] = num_labels
        if num_labels == 1:
            kwargs["problem_type"] = "regression"
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    with quiet_transformers():
        try:
            if cfg.dropout is not None:
                config = AutoConfig.from_pretrained(location, trust_remote_code=cfg.trust_remote_code)
                kwargs |= dropout_overrides(config, cfg.dropout)
            model, info = AUTO_CLASSES[head].from_pretrained(location, **kwargs)
            return model, tuple(sorted(info["missing_keys"]))
        except (OSError, ValueError) as exc:
            raise ModelError(unavailable(location, exc)) from None


def reload_quantized(
    model: PreTrainedModel, head: Head, cfg: ModelConfig, quantization: BitsAndBytesConfig
) -> tuple[PreTrainedModel, tuple[str, ...]]:
    """A built model in 4 bits: bitsandbytes quantises on from_pretrained, so go through a saved copy."""
    with TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        return from_pretrained(directory, head, None, cfg, quantization)


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports and progress bars (a new head is expected), then restore them."""
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def nf4_config() -> BitsAndBytesConfig:
    """4-bit NF4 weights with bf16 compute and double quantisation (QLoRA); CUDA only."""
    if not torch.cuda.is_available():
        raise ModelError("model.quantization=nf4 needs a CUDA GPU (and bitsandbytes)")
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
    )


def unavailable(location: str, exc: Exception) -> str:
    """One line on why `location` did not load: hub unreachable (offline), or transformers' own first line."""
    first = first_line(exc)
    if huggingface_hub.is_offline_mode() or "connect" in first.lower():
        first = "the hub is unreachable (offline) and it is not in the local cache"
    presets = ", ".join(PRESETS)
    return f"cannot load model '{location}': {first}; pass a local directory as model.name or a preset ({presets})"


def model_family(model: nn.Module) -> str:
    """The architecture family (`config.model_type`: llama, bert, roberta, gpt2, ...)."""
    return getattr(getattr(model, "config", None), "model_type", "unknown")
