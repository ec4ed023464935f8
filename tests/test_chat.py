"""Chat rendering and assistant-only loss: ids and labels against hand-built byte-level expectations."""

from __future__ import annotations

import pytest
from transformers.convert_slow_tokenizer import bytes_to_unicode

from loralab.data.chat import DEFAULT_CHAT_TEMPLATE, chat_prompt, encode_chat, resolve_chat_template
from loralab.data.collate import IGNORE_INDEX
from loralab.errors import DataError
from loralab.models.presets import tiny_tokenizer

CONVERSATION = (
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3×3?"},
    {"role": "assistant", "content": "9 — easy."},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "Ciao!"},
)
REPLIES = ["4", "9 — easy.", "Ciao!"]
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer("tiny-llama")


def byte_ids(tokenizer, text: str) -> list[int]:
    """One id per UTF-8 byte: the GPT-2 byte symbol looked up in the vocabulary."""
    symbols = bytes_to_unicode()
    return [tokenizer.convert_tokens_to_ids(symbols[byte]) for byte in text.encode("utf-8")]


def labelled_runs(encoded: dict) -> list[list[int]]:
    """The ids of each maximal run of positions that carry loss."""
    runs: list[list[int]] = []
    previous = IGNORE_INDEX
    for label in encoded["labels"]:
        if label != IGNORE_INDEX:
            if previous == IGNORE_INDEX:
                runs.append([])
            runs[-1].append(label)
        previous = label
    return runs


def test_default_template_ids_and_labels_by_hand(tokenizer):
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id

    def turn(reply: str) -> list[int]:
        return [*byte_ids(tokenizer, reply), eos, *byte_ids(tokenizer, "\n")]

    pieces = [  # (ids, carries loss), written from the default template's layout
        ([bos], False),
        (byte_ids(tokenizer, "<|system|>\nYou are terse.\n<|user|>\n2+2?\n<|assistant|>\n"), False),
        (turn("4"), True),
        (byte_ids(tokenizer, "<|user|>\nAnd 3×3?\n<|assistant|>\n"), False),
        (turn("9 — easy."), True),
        (byte_ids(tokenizer, "<|user|>\nBye\n<|assistant|>\n"), False),
        (turn("Ciao!"), True),
    ]
    ids = [i for piece, _ in pieces for i in piece]
    labels = [i if loss else IGNORE_INDEX for piece, loss in pieces for i in piece]

    encoded = encode_chat(CONVERSATION, tokenizer, DEFAULT_CHAT_TEMPLATE)

    assert encoded["input_ids"] == ids
    assert encoded["labels"] == labels
    assert encoded["attention_mask"] == [1] * len(ids)
    assert [tokenizer.decode(run) for run in labelled_runs(encoded)] == [f"{reply}</s>\n" for reply in REPLIES]


def test_decode_equals_the_render(tokenizer):
    for template in (DEFAULT_CHAT_TEMPLATE, CHATML):
        encoded = encode_chat(CONVERSATION, tokenizer, template)
        render = tokenizer.apply_chat_template(list(CONVERSATION), chat_template=template, tokenize=False)
        assert tokenizer.decode(encoded["input_ids"]) == render


def test_chatml_override_labels_each_reply_and_its_end_marker(tokenizer):
    template = resolve_chat_template(tokenizer, CHATML)
    encoded = encode_chat(CONVERSATION, tokenizer, template)

    assert template == CHATML
    assert [tokenizer.decode(run) for run in labelled_runs(encoded)] == [f"{r}<|im_end|>\n" for r in REPLIES]
    assert sum(label != IGNORE_INDEX for label in encoded["labels"]) == sum(
        len(f"{r}<|im_end|>\n".encode()) for r in REPLIES
    )
    assert encoded["input_ids"][:14] == byte_ids(tokenizer, "<|im_start|>sy")  # no BOS: this template writes none


def test_resolution_order_file_override_and_missing_file(tokenizer, tmp_path):
    path = tmp_path / "chatml.jinja"
    path.write_text(CHATML, encoding="utf-8")
    assert resolve_chat_template(tokenizer, None) == DEFAULT_CHAT_TEMPLATE
    assert resolve_chat_template(tokenizer, str(path)) == CHATML

    with pytest.raises(DataError) as error:
        resolve_chat_template(tokenizer, str(tmp_path / "missing.jinja"))
    assert "missing.jinja" in str(error.value) and "\n" not in str(error.value)

    own = tiny_tokenizer("tiny-llama")
    own.chat_template = CHATML
    assert resolve_chat_template(own, None) == CHATML


def test_no_assistant_turn_and_unstable_template_are_refused(tokenizer):
    with pytest.raises(DataError, match="no assistant turn"):
        encode_chat(CONVERSATION[:2], tokenizer, DEFAULT_CHAT_TEMPLATE)
    with pytest.raises(DataError, match="no assistant turn"):
        chat_prompt(CONVERSATION[:2], tokenizer, DEFAULT_CHAT_TEMPLATE)

    unstable = DEFAULT_CHAT_TEMPLATE.replace("{{ '<|assistant|>\\n' }}", "{{ 'ASSISTANT:' }}")
    with pytest.raises(DataError, match="turn 3 ") as error:
        encode_chat(CONVERSATION, tokenizer, unstable)
    assert "\n" not in str(error.value)

    refusing = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(DataError, match="roles must alternate"):
        encode_chat(CONVERSATION, tokenizer, refusing)


def test_chat_prompt_is_the_generation_prefix_and_the_last_reply(tokenizer):
    prompt, reply = chat_prompt(CONVERSATION, tokenizer, DEFAULT_CHAT_TEMPLATE)
    assert prompt == (
        "<s><|system|>\nYou are terse.\n<|user|>\n2+2?\n<|assistant|>\n4</s>\n"
        "<|user|>\nAnd 3×3?\n<|assistant|>\n9 — easy.</s>\n<|user|>\nBye\n<|assistant|>\n"
    )
    assert reply == "Ciao!"

    encoded = encode_chat(CONVERSATION, tokenizer, DEFAULT_CHAT_TEMPLATE)
    generation_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert encoded["input_ids"][: len(generation_ids)] == generation_ids
