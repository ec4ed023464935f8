"""Progress of a run: a rich progress bar on a terminal, plain periodic lines otherwise."""

from __future__ import annotations

import sys
from collections.abc import Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class ProgressReporter:
    """Shows step, loss, lr and tokens/s with an ETA; `enabled=None` means 'only on a TTY'.

    `transcript` receives every step and note line as plain text, bar or not (the run's train.log).
    """

    def __init__(
        self, total: int, enabled: bool | None = None, transcript: Callable[[str], None] | None = None
    ) -> None:
        self.total = total
        self.transcript = transcript
        self.bar = sys.stderr.isatty() if enabled is None else enabled
        self.console = Console(stderr=True)
        self.progress = None
        if self.bar:
            self.progress = Progress(
                TextColumn("train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self.task = self.progress.add_task("train", total=total, status="")
            self.progress.start()

    def update(self, step: int, metrics: dict[str, float]) -> None:
        status = f"loss {metrics['loss']:.4f} lr {metrics['lr']:.2e} {metrics['tokens_per_s']:.0f} tok/s"
        line = f"step {step}/{self.total} {status}"
        self.record(line)
        if self.progress is not None:
            self.progress.update(self.task, completed=step, status=status)
        else:
            print(line, file=sys.stderr, flush=True)

    def note(self, step: int, text: str) -> None:
        line = f"step {step}: {text}"
        self.record(line)
        if self.progress is not None:
            self.console.print(line)
        else:
            print(line, file=sys.stderr, flush=True)

    def record(self, line: str) -> None:
        """Hand a line to the transcript, if there is one."""
        if self.transcript is not None:
            self.transcript(line)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
