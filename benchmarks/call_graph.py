"""How many distinct loralab functions a 2-step LoRA run passes through (the recipe's reading cost).

Counts the code objects whose file is under loralab's package directory that `sys.setprofile` sees called during
`loralab train` of 2 steps on tiny-bert with the synthetic sentiment task (the quickstart with a tiny model).
Run: `python benchmarks/call_graph.py [--list]`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import loralab
from loralab.cli import main
from loralab.config import load_config

PACKAGE = str(Path(loralab.__file__).resolve().parent)


def count_calls(run: Callable[[], None]) -> set[tuple[str, int, str]]:
    """The (file, first line, name) of every loralab function called while `run()` runs."""
    seen: set[tuple[str, int, str]] = set()

    def profile(frame, event, arg) -> None:
        if event == "call" and frame.f_code.co_filename.startswith(PACKAGE):
            code = frame.f_code
            seen.add((code.co_filename, code.co_firstlineno, code.co_qualname))

    sys.setprofile(profile)
    try:
        run()
    finally:
        sys.setprofile(None)
    return {entry for entry in seen if entry[2] != "<module>"}  # module bodies are imports, not the run's path


def recipe_run(overrides: list[str]) -> Callable[[], None]:
    """The training recipe alone, from a config resolved beforehand (what the CLI calls after parsing)."""
    from loralab.training.recipe import run_training

    config = load_config([], overrides)
    return lambda: run_training(config, show_progress=False)


def cli_run(overrides: list[str]) -> Callable[[], None]:
    """The whole `loralab train` verb: argument parsing, config resolution, the recipe, the printed table."""

    def run() -> None:
        if main(["train", *overrides]):
            raise SystemExit("the run failed")

    return run


def main_cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="print every function, by file")
    args = parser.parse_args()
    # a first, unprofiled run imports every module: the counts leave out import-time calls
    for name, make in (("warm-up", recipe_run), ("recipe (run_training)", recipe_run), ("loralab train", cli_run)):
        with tempfile.TemporaryDirectory() as root:
            overrides = [
                f"io.root={root}",
                "model.name=tiny-bert",
                "task.train_samples=32",
                "task.eval_samples=16",
                "train.batch_size=8",
                "train.max_steps=2",
                "log.every=1",
            ]
            if name == "warm-up":
                make(overrides)()
                continue
            functions = count_calls(make(overrides))
        if args.list:
            for file, line, qualname in sorted(functions):
                print(f"{Path(file).relative_to(PACKAGE)}:{line} {qualname}")
        print(f"{name}: {len(functions)} loralab functions in {len({entry[0] for entry in functions})} files")


if __name__ == "__main__":
    main_cli()
