"""Which model head a task needs: the one choice the recipe, `loralab eval` and `loralab analyze` all make."""

from __future__ import annotations

from loralab.errors import ConfigError


def resolve_head(model_kind: str, task_format: str) -> str:
    """The model head a task needs: a classification head for classification and regression, a causal LM for
    the formats that generate or model text (sft, chat, text), or the masked diffusion LM model.kind asks for."""
    if model_kind == "masked_diffusion":
        if task_format in ("regression", "chat"):
            raise ConfigError(f"model.kind=masked_diffusion cannot run a {task_format} task")
        return "masked_diffusion"
    wanted = "seq_cls" if task_format in ("classification", "regression") else "causal_lm"
    if model_kind not in ("auto", wanted):
        raise ConfigError(f"model.kind={model_kind} cannot run a {task_format} task; use model.kind={wanted} or auto")
    return wanted
