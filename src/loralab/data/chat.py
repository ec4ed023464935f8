"""Chat conversations: render them with a chat template and put the loss on the assistant's turns only.

The masking rule is the one users expect from TRL's assistant-only loss and torchtune's per-message masking:
the tokens of every assistant turn (its content plus the template's end-of-turn tokens, so the model learns to
stop) carry loss; system and user text and the role headers are labelled IGNORE_INDEX. An assistant turn i is
located by rendering: it is the text between the render of messages[:i] with the generation prompt and the
render of messages[:i + 1]. That needs a prefix-stable template (each render extends the previous one); a
template that rewrites earlier turns is refused rather than mis-masked.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from loralab.data.collate import IGNORE_INDEX
from loralab.errors import DataError, first_line

Messages = Sequence[dict[str, str]]

# For tokenizers without a chat template (the tiny presets' byte tokenizer). Each message is `<|role|>\n`, its
# content, then `\n`; an assistant's content is followed by EOS (generation stops there) before that `\n`, and
# the generation prompt is the assistant header. The render is `<s><|user|>\nHi\n<|assistant|>\nHello</s>\n`.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def resolve_chat_template(tokenizer: PreTrainedTokenizerBase, override: str | None) -> str:
    """The template to render with: the override (a Jinja string or a file holding one), else the tokenizer's own,
    else DEFAULT_CHAT_TEMPLATE."""
    if override is None:
        return tokenizer.get_chat_template() if tokenizer.chat_template else DEFAULT_CHAT_TEMPLATE
    if "{{" in override or "{%" in override:
        return override
    path = Path(override).expanduser()
    if not path.is_file():
        raise DataError(f"chat_template '{override}' is neither a Jinja template nor an existing file")
    return path.read_text(encoding="utf-8")


def render(
    messages: Messages, tokenizer: PreTrainedTokenizerBase, template: str, add_generation_prompt: bool = False
) -> str:
    """The template's text for these messages; a template error becomes a one-line DataError."""
    try:
        return tokenizer.apply_chat_template(
            list(messages), chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except TemplateError as exc:
        raise DataError(f"chat template cannot render {len(messages)} messages: {first_line(exc)}") from exc


def assistant_turns(messages: Messages) -> list[int]:
    """Indices of the assistant messages; a conversation without one has nothing to learn or score."""
    turns = [index for index, message in enumerate(messages) if message["role"] == "assistant"]
    if not turns:
        raise DataError("chat conversation has no assistant turn (nothing carries loss)")
    return turns


def assistant_spans(
    messages: Messages, tokenizer: PreTrainedTokenizerBase, template: str
) -> tuple[str, list[tuple[int, int]]]:
    """The full render and the (start, end) character span of each assistant turn in it, checked prefix-stable."""
    text = render(messages, tokenizer, template)
    spans: list[tuple[int, int]] = []
    for index in assistant_turns(messages):
        prompt = render(messages[:index], tokenizer, template, add_generation_prompt=True)
        through = render(messages[: index + 1], tokenizer, template)
        after_previous = not spans or len(prompt) >= spans[-1][1]
        if not (through.startswith(prompt) and text.startswith(through) and after_previous):
            raise DataError(
                f"chat template is not prefix-stable at turn {index + 1} (assistant): the render before it with the "
                "generation prompt must extend the earlier turns' render and be a prefix of the render through it"
            )
        spans.append((len(prompt), len(through)))
    return text, spans


def encode_chat(messages: Messages, tokenizer: PreTrainedTokenizerBase, template: str) -> dict[str, list[int]]:
    """input_ids / attention_mask / labels of a conversation, labels IGNORE_INDEX outside the assistant turns.

    The render is tokenised segment by segment (prompt text, assistant text, ...) so each prompt's tokens are those
    generation sees; add_special_tokens=False since the template writes BOS itself.
    """
    text, spans = assistant_spans(messages, tokenizer, template)
    bounds = [0, *(position for span in spans for position in span), len(text)]
    ids: list[int] = []
    labels: list[int] = []
    for segment, (start, end) in enumerate(pairwise(bounds)):
        if start == end:
            continue
        piece = tokenizer(text[start:end], add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if segment % 2 else [IGNORE_INDEX] * len(piece)
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def chat_prompt(messages: Messages, tokenizer: PreTrainedTokenizerBase, template: str) -> tuple[str, str]:
    """The generation prompt (everything before the last assistant turn, plus the generation prompt) and that
    turn's content, the reference the generated reply is scored against."""
    last = assistant_turns(messages)[-1]
    return render(messages[:last], tokenizer, template, add_generation_prompt=True), messages[last]["content"]
