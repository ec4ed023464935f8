"""An edit evaluated before and after: the source and the edited adapter on the same GSM8K-style prompts."""

from __future__ import annotations

import json

from loralab.config.load import config_to_dict
from loralab.config.schema import RunConfig
from loralab.edit.spectral import EditOutcome
from loralab.evaluation.gsm8k import get_profile
from loralab.evaluation.standalone import compare_adapters

METRICS_FILE = "metrics_gsm8k.json"


def evaluate_before_after(
    config: RunConfig, outcome: EditOutcome, max_samples: int | None = None, max_new_tokens: int | None = None
) -> dict[str, dict[str, float]]:
    """Write metrics_gsm8k.json {"results": {"baseline", "edited"}, "meta"} and each side's predictions file."""
    adapters = {"baseline": outcome.source, "edited": outcome.out_dir}
    results = compare_adapters(config, adapters, max_samples, max_new_tokens)
    for name, result in results.items():
        with open(outcome.out_dir / f"predictions_gsm8k_{name}.jsonl", "w") as handle:
            handle.writelines(json.dumps(record) + "\n" for record in result.predictions)
    meta = {
        "task": config.task.name,
        "n": len(results["edited"].predictions),
        "max_new_tokens": max_new_tokens or get_profile(config.eval.profile).max_new_tokens,
        **{f"eval.{key}": value for key, value in config_to_dict(config)["eval"].items()},
    }
    document = {"results": {name: result.metrics for name, result in results.items()}, "meta": meta}
    (outcome.out_dir / METRICS_FILE).write_text(json.dumps(document, indent=2) + "\n")
    return document["results"]
