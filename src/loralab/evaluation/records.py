"""A run's evaluation files: eval.json (the metrics) and predictions.jsonl (one object per evaluated example)."""

from __future__ import annotations

import json
from pathlib import Path

from loralab.errors import RunError
from loralab.evaluation.evaluate import EvalResult


def write_eval(directory: Path, result: EvalResult, name: str = "eval.json") -> None:
    """eval.json (metrics) and predictions.jsonl (one object per evaluated example)."""
    (directory / name).write_text(json.dumps({"metrics": result.metrics, "n": len(result.predictions)}, indent=2))
    with open(directory / "predictions.jsonl", "w") as handle:
        for record in result.predictions:
            handle.write(json.dumps(record) + "\n")


def stored_metrics(directory: Path) -> dict[str, float]:
    """The final metrics a completed run wrote to its eval.json."""
    path = directory / "eval.json"
    if not path.is_file():
        raise RunError(f"no eval.json in {directory}")
    return json.loads(path.read_text())["metrics"]
