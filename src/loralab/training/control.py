"""How a run is steered from outside the recipe: a callback after each evaluation that may stop it (HPO), and a
test hook that kills the process at a known step."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

EvalCallback = Callable[[int, dict[str, float], bool], None]
"""Called after each in-loop evaluation with (step, metrics, last): how an HPO trial reports its eval curve."""


class StopRun(Exception):
    """Raised by an `on_eval` callback to end a run after an evaluation (an HPO trial its pruner stopped).

    status.json records `state` (default `pruned`), the step and the reason; the exception reaches the caller.
    """

    def __init__(self, reason: str = "", state: str = "pruned") -> None:
        super().__init__(reason)
        self.state = state


KILL_AT = "LORALAB_TEST_KILL_AT"
"""A test hook: `<step>:<token file>` makes the process that first finishes that step (its checkpoint written) and
removes the token SIGKILL itself, so tests of crashes and resumes kill at a known step, not after a wall-clock wait."""


def kill_point() -> tuple[int, Path] | None:
    """The step and token file `LORALAB_TEST_KILL_AT` names, None when it is unset."""
    value = os.environ.get(KILL_AT)
    if not value:
        return None
    step, token = value.split(":", 1)
    return int(step), Path(token)


def kill_if_claimed(token: Path) -> None:
    """SIGKILL this process if it is the one that removes `token` (of many processes, exactly one is)."""
    try:
        token.unlink()
    except FileNotFoundError:
        return
    os.kill(os.getpid(), signal.SIGKILL)
