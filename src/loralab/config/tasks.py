"""Built-in tasks as packaged definitions (`configs/tasks/<name>.yaml`), and how a task section is composed.

A definition holds the same keys a user writes under `task:`; composing layers base.yaml's task section, then
the definition the task's name points to (if any), then the user's own keys. A name with no definition is a
task of the user's own and must say its `format`.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Any

import yaml

from loralab.errors import ConfigError, did_you_mean, unknown

TASKS = resources.files("loralab") / "configs" / "tasks"
DEFAULT_COLUMNS = {  # the columns a format reads when `task.columns` leaves a role out
    "classification": {"text": "text", "text_pair": None, "label": "label"},
    "regression": {"text": "text", "text_pair": None, "label": "label"},
    "sft": {"prompt": "instruction", "input": "input", "completion": "output"},
    "chat": {"messages": "messages"},
    "text": {"text": "text"},
}
SFT_TEMPLATE_NAMES = ("alpaca", "plain", "chat", "gsm8k", "squad", "xsum")  # data.tasks.SFT_TEMPLATES builds each
REQUIRED_ROLES = {  # column roles a format cannot do without
    "classification": ("text", "label"),
    "regression": ("text", "label"),
    "sft": ("prompt", "completion"),
    "chat": ("messages",),
    "text": ("text",),
}


@cache
def definitions() -> dict[str, dict[str, Any]]:
    """Every packaged task definition by name (its path under configs/tasks/, without .yaml)."""
    found: dict[str, dict[str, Any]] = {}

    def walk(folder: Any, prefix: str) -> None:
        for entry in folder.iterdir():
            if entry.is_dir():
                walk(entry, f"{prefix}{entry.name}/")
            elif entry.name.endswith(".yaml"):
                found[prefix + entry.name.removesuffix(".yaml")] = yaml.safe_load(entry.read_text()) or {}

    walk(TASKS, "")
    return found


@cache
def aliases() -> dict[str, str]:
    """Other names of built-in tasks (`alpaca` → `tatsu-lab/alpaca`), from each definition's `aliases`."""
    return {alias: name for name, body in definitions().items() for alias in body.get("aliases", ())}


def builtin_task_names() -> list[str]:
    """Names of the built-in tasks (their aliases are accepted as `task.name` too)."""
    return sorted(definitions())


def canonical_name(name: str) -> str:
    """The built-in name an alias stands for; any other name unchanged."""
    return aliases().get(name, name)


def builtin_definition(name: str) -> dict[str, Any] | None:
    """The packaged keys of a built-in task (without its aliases), or None for a task of the user's own."""
    body = definitions().get(canonical_name(name))
    return None if body is None else {k: v for k, v in body.items() if k != "aliases"}


def compose_task(base: dict, user: Any) -> dict:
    """base.yaml's task section ← the named task's definition ← the user's keys, with the name made canonical."""
    if not isinstance(user, dict):
        raise ConfigError(f"task must be a mapping, got {type(user).__name__}")
    name = user.get("name", base.get("name"))
    if not isinstance(name, str) or not name:
        raise ConfigError(f"task.name must be a non-empty string, got {name!r}")
    definition = builtin_definition(name)
    if definition is None and user.get("format") is None:
        hint = did_you_mean(name, [*definitions(), *aliases()])
        raise ConfigError(
            f"unknown task '{name}'{hint}; for a task of your own set task.format "
            "(classification, regression, sft, chat or text) and task.path or task.hub"
        )
    task = dict(base)
    if definition is not None and user.get("path") is not None:  # local files in the hub's schema replace the hub
        definition = {**definition, "hub": None, "subset": None}
    for layer in (definition or {}, user):
        for key, value in layer.items():  # mappings (splits, columns, roles, keys) merge; a null role removes one
            both = isinstance(value, dict) and isinstance(task.get(key), dict)
            task[key] = {**task[key], **value} if both else value
    task["name"] = canonical_name(name)
    return task


def check_task(task: Any) -> None:
    """Cross-field checks of a resolved TaskConfig: known column roles, a source for a task of one's own."""
    known = DEFAULT_COLUMNS[task.format]
    for role in task.columns or {}:
        if role not in known:
            raise ConfigError(
                f"task.columns: '{role}' is not a column role of format {task.format}"
                + (did_you_mean(role, known) or f" (roles: {', '.join(known)})")
            )
    if builtin_definition(task.name) is None and task.path is None and task.hub is None:
        raise ConfigError(f"task '{task.name}' is not built in: set task.path (a file, glob or directory) or task.hub")
    if task.path is not None and task.hub is not None:
        raise ConfigError("task.path and task.hub are two sources: set one of them")
    if (task.roles or task.keys) and task.format != "chat":
        raise ConfigError(f"task.roles and task.keys describe chat data, not format {task.format}")
    for mapping, allowed in ((task.roles, ("system", "user", "assistant")), (task.keys, ("role", "content"))):
        for key in mapping or {}:
            if key not in allowed:
                raise ConfigError(f"unknown key '{key}' in task.roles/task.keys" + did_you_mean(key, allowed))
    if task.label_names is not None and task.format not in ("classification", "sft"):
        raise ConfigError(f"task.label_names applies to formats classification and sft, not {task.format}")
    if task.template is not None and task.format != "sft":
        raise ConfigError(f"task.template applies to format sft, not {task.format} (chat uses task.chat_template)")
    if task.template is not None and task.template not in SFT_TEMPLATE_NAMES and "{prompt}" not in task.template:
        raise ConfigError(
            f"task.template: {unknown('template', task.template, SFT_TEMPLATE_NAMES)} "
            "(or a string with a {prompt} field)"
        )
    if task.chat_template is not None and task.format not in ("chat", "sft"):
        raise ConfigError(f"task.chat_template applies to format chat (or sft with template chat), not {task.format}")
    if task.packing and task.format not in ("sft", "chat", "text"):
        raise ConfigError(f"task.packing applies to sft, chat and text tasks, not {task.format}")
    if task.packing and task.group_by_length:
        raise ConfigError("task.packing and task.group_by_length are two ways to cut padding: choose one")
