"""One evaluation of a model as it is, by the evaluator of its head, under each of `eval.views`.

The training recipe (in-loop and final evaluations) and `loralab eval` (a saved adapter) both come through here.
"""

from __future__ import annotations

from torch import nn

from loralab.config.schema import RunConfig
from loralab.data import TaskSpec
from loralab.evaluation.diffusion import evaluate_diffusion
from loralab.evaluation.evaluate import EvalResult, evaluate, evaluate_views


def evaluate_model(config: RunConfig, head: str, model: nn.Module, tokenizer, spec: TaskSpec, examples) -> EvalResult:
    """One evaluation of `model` as it is, by the evaluator of its head (diffusion sampling or HF)."""
    if head == "masked_diffusion":
        return evaluate_diffusion(
            model, tokenizer, spec, examples, config.diffusion, config.eval.batch_size, config.task.max_length
        )
    return evaluate(
        model,
        tokenizer,
        spec,
        examples,
        config.eval.batch_size,
        config.task.max_length,
        config.eval.max_new_tokens,
        config.eval.profile,
    )


def evaluate_in_views(
    config: RunConfig, head: str, model: nn.Module, tokenizer, spec: TaskSpec, examples, split: int | None
) -> EvalResult:
    """`evaluate_model` under each of `eval.views` (`split`: the dual-rank core/extension split, else None)."""
    return evaluate_views(
        model, config.eval.views, split, lambda: evaluate_model(config, head, model, tokenizer, spec, examples)
    )
