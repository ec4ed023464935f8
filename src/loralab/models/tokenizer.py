"""An offline byte-level tokenizer for the tiny presets: the special tokens + 256 byte symbols, no merges.

decode(encode(text)) == text for any UTF-8 text (digits, '####', '$', newlines), so answer extraction on
generated text behaves as with a real tokenizer, and nothing is downloaded.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIALS = {
    "pad_token": "<pad>",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "mask_token": "<mask>",
    "cls_token": "<cls>",
    "sep_token": "<sep>",
}
FAMILIES = ("llama", "gpt2", "bert", "roberta")


def byte_tokenizer(family: str, model_max_length: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer whose special-token layout follows the family (llama, gpt2, bert, roberta)."""
    if family not in FAMILIES:
        raise ValueError(f"byte tokenizer family must be one of {FAMILIES}, not '{family}'")
    vocab = {token: index for index, token in enumerate(SPECIALS.values())}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=SPECIALS["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(SPECIALS.values()))
    template = post_processor(family, vocab)
    if template is not None:
        backend.post_processor = template
    inputs = ["input_ids", "token_type_ids", "attention_mask"] if family == "bert" else ["input_ids", "attention_mask"]
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, model_max_length=model_max_length, model_input_names=inputs, **SPECIALS
    )


def post_processor(family: str, vocab: dict[str, int]) -> processors.TemplateProcessing | None:
    """<s> a (<s> b) for Llama; <cls> a <sep> (b <sep>) for encoders, b typed 1 for BERT; nothing for GPT-2."""
    cls, sep, bos = SPECIALS["cls_token"], SPECIALS["sep_token"], SPECIALS["bos_token"]
    if family == "llama":
        return processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, vocab[bos])]
        )
    if family in ("bert", "roberta"):
        return processors.TemplateProcessing(
            single=f"{cls} $A {sep}",
            pair=f"{cls} $A {sep} $B:1 {sep}:1",
            special_tokens=[(cls, vocab[cls]), (sep, vocab[sep])],
        )
    return None
