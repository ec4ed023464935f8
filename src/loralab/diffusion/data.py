"""Examples as diffusion sequences: a prompt that is never masked, then a response slot of fixed length.

Classification examples become an instruction whose response is the label word; generation examples keep
their prompt and target; text (continued pre-training) examples are all response. The slot holds the target
tokens, then EOS up to `response_length`; a prompt too long for `max_length` loses its oldest tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from loralab.data.tasks import Example, TaskSpec
from loralab.data.templates import label_prompt
from loralab.diffusion.model import special_ids
from loralab.errors import ConfigError


def prompt_and_response(spec: TaskSpec, example: Example) -> tuple[str, str]:
    """The prompt text and the response text of one example."""
    if spec.format == "classification":
        return label_prompt(example.text, example.text_pair, spec.label_names), spec.label_names[example.label]
    if spec.format == "sft":
        return example.text, (example.target or "").strip()
    raise ConfigError(f"model.kind=masked_diffusion cannot run {spec.format} task {spec.name}")


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, budget: int) -> list[int]:
    """Prompt ids with special tokens, cut from the left (after the first token) to at most `budget` ids."""
    ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    return ids if len(ids) <= budget else ids[:1] + ids[len(ids) - budget + 1 :]


def encode_diffusion(
    examples: Sequence[Example],
    spec: TaskSpec,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    response_length: int,
) -> list[dict]:
    """input_ids, attention_mask and response_mask (1 on the positions the forward process may mask)."""
    if spec.format == "text":
        return [encode_text(tokenizer, example.text, max_length) for example in examples if example.text.strip()]
    if max_length <= response_length + 2:
        raise ConfigError(f"task.max_length ({max_length}) must exceed diffusion.response_length + 2")
    eos = special_ids(tokenizer)[2]
    features = []
    for example in examples:
        prompt_text, response_text = prompt_and_response(spec, example)
        prompt = encode_prompt(tokenizer, prompt_text, max_length - response_length)
        response = tokenizer(response_text, add_special_tokens=False)["input_ids"][:response_length]
        response += [eos] * (response_length - len(response))
        features.append(
            {
                "input_ids": prompt + response,
                "attention_mask": [1] * (len(prompt) + response_length),
                "response_mask": [0] * len(prompt) + [1] * response_length,
            }
        )
    return features


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str, max_length: int) -> dict:
    """Plain text for continued pre-training: every token but the special ones may be masked."""
    encoded = tokenizer(text, truncation=True, max_length=max_length, return_special_tokens_mask=True)
    ids = list(encoded["input_ids"])
    return {
        "input_ids": ids,
        "attention_mask": [1] * len(ids),
        "response_mask": [1 - special for special in encoded["special_tokens_mask"]],
    }
