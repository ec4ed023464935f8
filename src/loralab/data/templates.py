"""Instruction templates that turn a dataset row into the prompt a decoder sees (targets are built in tasks.py)."""

from __future__ import annotations

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def gsm8k_prompt(question: str) -> str:
    """The lm-evaluation-harness gsm8k prompt; its target is ' ' + the answer with the '#### N' line."""
    return f"Question: {question}\nAnswer:"


def alpaca_prompt(instruction: str, context: str = "") -> str:
    """The Stanford Alpaca template, with the input block only when there is an input (Dolly: its context)."""
    if context.strip():
        return ALPACA_WITH_INPUT.format(instruction=instruction, input=context)
    return ALPACA_NO_INPUT.format(instruction=instruction)


def squad_prompt(context: str, question: str) -> str:
    """Extractive QA as generation: the answer span follows 'Answer:'."""
    return f"Context: {context}\nQuestion: {question}\nAnswer:"


def xsum_prompt(document: str) -> str:
    """One-sentence summarisation: the summary follows 'Summary:'."""
    return f"Document: {document}\nSummary:"


def label_prompt(text: str, text_pair: str | None, label_names: tuple[str, ...]) -> str:
    """A classification example as an instruction whose answer is one of the label words (diffusion LMs)."""
    body = text if text_pair is None else f"{text}\n{text_pair}"
    return f"{body}\nQuestion: {' or '.join(label_names)}?\nAnswer:"
