"""The only errors a user should ever see: the CLI prints them as one line and exits with code 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class LoraLabError(Exception):
    """A user-facing error: bad config, missing file, unknown name, malformed adapter."""


class ConfigError(LoraLabError):
    """The resolved configuration is invalid."""


class DataError(LoraLabError):
    """A task or data file cannot be loaded."""


class ModelError(LoraLabError):
    """A model or tokenizer cannot be loaded."""


class AdapterError(LoraLabError):
    """An adapter directory is missing or malformed."""


class RunError(LoraLabError):
    """A run directory is in a state that forbids the requested action."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return ' (did you mean X?)' for the closest choice, or '' when nothing is close.

    Choices the name abbreviates come first ('acc' → 'accuracy', not the closer-spelled 'mcc'), then difflib's.
    """
    choices = list(choices)
    extending = [choice for choice in choices if name and choice.startswith(name)]
    pool, cutoff = (extending, 0.0) if extending else (choices, 0.6)
    close = difflib.get_close_matches(name, pool, n=1, cutoff=cutoff)
    return f" (did you mean '{close[0]}'?)" if close else ""


def unknown(what: str, name: str, choices: Iterable[str]) -> str:
    """Message for an unknown name, with a did-you-mean or the list of valid names."""
    choices = sorted(choices)
    hint = did_you_mean(name, choices)
    return f"unknown {what} '{name}'" + (hint or f"; choose one of: {', '.join(choices)}")


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when empty): library errors span many lines."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
