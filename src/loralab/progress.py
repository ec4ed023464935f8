"""Progress of a run: a rich progress bar on a terminal, plain periodic lines otherwise."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class ProgressReporter:
    """Shows step, loss, lr and tokens/s with an ETA; `enabled=None` means 'only on a TTY'."""

    def __init__(self, total: int, enabled: bool | None = None) -> None:
        self.total = total
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
        if self.progress is not None:
            self.progress.update(self.task, completed=step, status=status)
        else:
            print(f"step {step}/{self.total} {status}", file=sys.stderr, flush=True)

    def note(self, step: int, text: str) -> None:
        line = f"step {step}: {text}"
        if self.progress is not None:
            self.console.print(line)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
