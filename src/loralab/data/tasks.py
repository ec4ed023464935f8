"""A task as data: the resolved `task:` section becomes a TaskSpec, and each row becomes an Example by its format.

Built-in tasks are packaged definitions (configs/tasks/) of the same keys a user writes; only the SFT prompt
templates that rebuild a published prompt (gsm8k, squad, xsum, alpaca) are code, registered by name below.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from loralab.config.load import build_dataclass
from loralab.config.schema import TaskConfig
from loralab.config.tasks import DEFAULT_COLUMNS, builtin_definition, builtin_task_names, canonical_name
from loralab.data.answers import UNANSWERABLE, gold_answer
from loralab.data.templates import alpaca_prompt, gsm8k_prompt, squad_prompt, xsum_prompt
from loralab.errors import DataError, unknown

Row = dict[str, Any]
CHAT_ROLES = ("system", "user", "assistant")
DEFAULT_METRICS = {
    "classification": ("accuracy", "macro_f1"),
    "regression": ("pearson", "spearman"),
    "sft": ("exact_match", "rougeL"),
    "chat": ("exact_match", "rougeL"),
    "text": (),
}


@dataclass(frozen=True)
class Example:
    """One example: the text(s) a model sees, and the label / target / reference it is judged by."""

    id: str
    text: str
    text_pair: str | None = None
    label: int | float | None = None
    target: str | None = None
    reference: str | list[str] | None = None
    messages: tuple[dict[str, str], ...] | None = None  # chat: {role: system|user|assistant, content} in order
    source: Row | None = field(default=None, compare=False, repr=False)  # the row, where prompts are rebuilt from it


@dataclass(frozen=True)
class TaskSpec:
    """A resolved task: its format, the column of each role, label names, metrics and SFT prompt template."""

    name: str
    format: str  # classification | regression | sft | chat | text
    columns: dict[str, str | None]  # role → column, the format's defaults filled in
    label_names: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ()
    template: str | None = None  # sft: a registered template name or a '{prompt}' format string
    roles: dict[str, str] = field(default_factory=dict)  # chat: the data's role name → loralab's
    keys: dict[str, str] = field(default_factory=lambda: {"role": "role", "content": "content"})
    chat_template: str | None = None

    @property
    def num_labels(self) -> int | None:
        """Outputs of a classification head: 1 for regression, one per label name; None for text outputs."""
        return 1 if self.format == "regression" else len(self.label_names) or None

    @property
    def generates(self) -> bool:
        """Whether the model answers by generating text (sft, chat) rather than by a head or nothing (text)."""
        return self.format in ("sft", "chat")

    @property
    def is_chat(self) -> bool:
        """Whether examples are conversations rendered with a chat template (chat, or sft with template chat)."""
        return self.format == "chat" or self.template == "chat"

    @property
    def answer(self) -> str:
        """How a generated output is read: a GSM8K profile, a SQuAD span, or the whole text."""
        return {"gsm8k": "gsm8k", "squad": "squad"}.get(self.template or "", "text")

    def convert(self, row: Row, index: int) -> Example:
        """One row as an Example, by the task's format (a row missing a column is a DataError)."""
        return CONVERTERS[self.format](self, row, index)


@dataclass(frozen=True)
class TaskData:
    spec: TaskSpec
    train: list[Example]
    eval: list[Example]


def task_spec(cfg: TaskConfig, label_names: tuple[str, ...] | None = None) -> TaskSpec:
    """The TaskSpec of a resolved task section; `label_names` are those inferred from the data, if any."""
    columns = {**DEFAULT_COLUMNS[cfg.format], **(cfg.columns or {})}
    names = tuple(str(v) for v in cfg.label_names) if cfg.label_names is not None else label_names or ()
    template = cfg.template or ("alpaca" if cfg.format == "sft" else None)  # config.tasks.check_task vetted it
    roles = {data: ours for ours, data in {**{r: r for r in CHAT_ROLES}, **(cfg.roles or {})}.items()}
    keys = {"role": "role", "content": "content", **(cfg.keys or {})}
    return TaskSpec(
        cfg.name,
        cfg.format,
        columns,
        names,
        tuple(cfg.metrics) if cfg.metrics is not None else DEFAULT_METRICS[cfg.format],
        template,
        roles,
        keys,
        cfg.chat_template,
    )


def get_task(name: str) -> TaskSpec:
    """The TaskSpec of a built-in task by name or alias (no data read)."""
    definition = builtin_definition(name)
    if definition is None:
        raise DataError(unknown("task", name, builtin_task_names()))
    fields = {"name": canonical_name(name), "path": None, "max_length": 128, "train_samples": None}
    return task_spec(build_dataclass(TaskConfig, {**fields, "eval_samples": None, **definition}, "task"))


def task_names() -> list[str]:
    """Built-in task names (aliases such as 'alpaca' are accepted too)."""
    return builtin_task_names()


def holdout_size(rows: int) -> int:
    """Trailing train rows that become the eval split of a train-only dataset: 10 %, at least 1, at most 500."""
    return max(1, min(500, rows // 10))


# ---- row → Example, by format ---------------------------------------------------------------------


def row_id(row: Row, index: int) -> str:
    """The dataset's own id ('id' or GLUE's 'idx') where it has one, else the row's position in its split."""
    return str(row.get("id", row.get("idx", index)))


def cell(spec: TaskSpec, row: Row, role: str) -> Any:
    """The value of a column role in a row; None where the role has no column (an optional role)."""
    column = spec.columns.get(role)
    return None if column is None else row.get(column)


def label_index(spec: TaskSpec, value: Any) -> int:
    """A label value as its class index: its position in label_names, else an integer class index in range (as
    the hub stores GLUE's labels), but only where the names are words: a 0 among labels named 1 and 2 is an error."""
    if str(value) in spec.label_names:
        return spec.label_names.index(str(value))
    index = class_index(value)
    numbered = any(class_index(name) is not None for name in spec.label_names)  # "0" counts: it is falsy, not None
    if index is not None and 0 <= index < len(spec.label_names) and not numbered:
        return index
    raise DataError(f"label {value!r} is not in task.label_names ({', '.join(spec.label_names)})")


def class_index(value: Any) -> int | None:
    """An integer label (3, or '3' as a CSV holds it) as an int, else None."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return int(value) if isinstance(value, str) and value.strip().isdigit() else None


def required(spec: TaskSpec, row: Row, role: str) -> Any:
    """The value of a column role every row must fill: an empty cell is a data error, not the word 'None'."""
    value = cell(spec, row, role)
    if value is None:
        raise DataError(f"no {role} in column '{spec.columns[role]}'")
    return value


def number(value: Any) -> float | None:
    """A value as a number where it is one (1, 2.5, '10'; not True), else None."""
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def score(value: Any) -> float:
    """A regression label as a finite float."""
    label = number(value)
    if label is None:
        raise DataError(f"label {value!r} is not a number")
    if not math.isfinite(label):
        raise DataError(f"label {value!r} is not a finite number")
    return label


def classification_example(spec: TaskSpec, row: Row, index: int) -> Example:
    """A sentence or sentence pair and its label (a class index, or a float score for regression)."""
    value = required(spec, row, "label")
    if spec.format == "regression":
        label: int | float = score(value)
        reference: Any = label
    else:
        label = label_index(spec, value)
        reference = spec.label_names[label]
    return Example(
        row_id(row, index), str(required(spec, row, "text")), cell(spec, row, "text_pair"), label, None, reference
    )


def sft_example(spec: TaskSpec, row: Row, index: int) -> Example:
    """A prompt (with its optional input) and the completion that carries the loss, through the SFT template."""
    prompt, context = str(required(spec, row, "prompt")), cell(spec, row, "input")
    completion = required(spec, row, "completion")  # a string, or SQuAD's answers mapping
    if spec.label_names:  # classification as generation: the completion is the label's word
        completion = spec.label_names[label_index(spec, completion)]
    if spec.template in SFT_TEMPLATES:
        return SFT_TEMPLATES[spec.template](row_id(row, index), prompt, context or "", completion)
    body = spec.template.format(prompt=prompt, input=context or "")
    return Example(row_id(row, index), body, target=str(completion), reference=str(completion))


def chat_example(spec: TaskSpec, row: Row, index: int) -> Example:
    """A conversation in loralab's roles; the last assistant turn is the reference of generation-based scoring."""
    turns = cell(spec, row, "messages")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"column '{spec.columns['messages']}' must hold a non-empty list of messages")
    messages = tuple(chat_message(spec, turn) for turn in turns)
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    if not replies:
        raise DataError("the conversation has no assistant turn (nothing to train on)")
    transcript = "\n".join(f"{m['role']}: {m['content']}" for m in messages)
    return Example(row_id(row, index), transcript, target=replies[-1], reference=replies[-1], messages=messages)


def chat_message(spec: TaskSpec, turn: Any) -> dict[str, str]:
    """One message in OpenAI form, from the data's role and content keys and role names."""
    role_key, content_key = spec.keys["role"], spec.keys["content"]
    if not isinstance(turn, dict) or role_key not in turn or content_key not in turn:
        raise DataError(f"each message needs the keys '{role_key}' and '{content_key}' (task.keys)")
    role, content = turn[role_key], turn[content_key]
    if role not in spec.roles:
        known = ", ".join(spec.roles)
        raise DataError(
            f"unknown role '{role}' (the roles are {known}); name it with task.roles, e.g. task.roles.user={role}"
        )
    if content is None:
        raise DataError(f"a '{role}' message has no '{content_key}'")
    return {"role": spec.roles[role], "content": str(content)}


def text_example(spec: TaskSpec, row: Row, index: int) -> Example:
    """Unlabelled text (continued pre-training)."""
    return Example(row_id(row, index), str(cell(spec, row, "text") or ""))


CONVERTERS: dict[str, Callable[[TaskSpec, Row, int], Example]] = {
    "classification": classification_example,
    "regression": classification_example,
    "sft": sft_example,
    "chat": chat_example,
    "text": text_example,
}


# ---- SFT prompt templates (prompt, input, completion) → Example -----------------------------------


def alpaca_example(id_: str, prompt: str, context: str, completion: Any) -> Example:
    """Stanford Alpaca's prompt, with the input block only when there is an input; the completion follows it."""
    return Example(id_, alpaca_prompt(prompt, context), target=str(completion), reference=str(completion))


def plain_example(id_: str, prompt: str, context: str, completion: Any) -> Example:
    """The prompt (and input on its own paragraph) then a newline; no instruction wrapper."""
    body = prompt if not context.strip() else f"{prompt}\n\n{context}"
    return Example(id_, body + "\n", target=str(completion), reference=str(completion))


def chat_sft_example(id_: str, prompt: str, context: str, completion: Any) -> Example:
    """One user turn (prompt and input) and one assistant turn, rendered with the chat template."""
    user = prompt if not context.strip() else f"{prompt}\n\n{context}"
    messages = ({"role": "user", "content": user}, {"role": "assistant", "content": str(completion)})
    return Example(id_, user, target=str(completion), reference=str(completion), messages=messages)


def gsm8k_example(id_: str, prompt: str, context: str, completion: Any) -> Example:
    """lm-eval's gsm8k format; the reference is the answer as lm-eval compares it (the cleaned '#### N' number)."""
    return Example(
        id_,
        gsm8k_prompt(prompt),
        target=" " + completion,
        reference=gold_answer(completion),
        source={"question": prompt, "answer": completion},
    )


def squad_example(id_: str, prompt: str, context: str, completion: Any) -> Example:
    """SQuAD as generation: the first gold answer is the target, all gold answers are references.

    An unanswerable SQuAD v2 question targets the word 'unanswerable'; its reference is [''] as in the
    official v2 script, and extract_answer('squad', ...) maps a generated 'unanswerable' to ''.
    """
    answers = list(completion["text"])
    return Example(
        id_,
        squad_prompt(context, prompt),
        target=" " + (answers[0] if answers else UNANSWERABLE),
        reference=answers or [""],
    )


def xsum_example(id_: str, prompt: str, context: str, completion: Any) -> Example:
    """One-sentence summarisation: the summary follows 'Summary:'."""
    return Example(id_, xsum_prompt(prompt), target=" " + completion, reference=completion)


SFT_TEMPLATES: dict[str, Callable[[str, str, str, Any], Example]] = {
    "alpaca": alpaca_example,
    "plain": plain_example,
    "chat": chat_sft_example,
    "gsm8k": gsm8k_example,
    "squad": squad_example,
    "xsum": xsum_example,
}
