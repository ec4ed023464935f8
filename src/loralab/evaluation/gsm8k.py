"""GSM8K prompting, few-shot selection and scoring under two published settings, so results compare with theirs.

`lm-eval`: EleutherAI lm-evaluation-harness task `gsm8k` (version 3.0), strict-match and flexible-extract.
`paper_math`: the LoRA-Spectral-Edit tool's `paper_math` profile, "#### N" (else the last integer) accuracy.
"""

from __future__ import annotations

import random
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from loralab.data.answers import gold_answer
from loralab.errors import LoraLabError, unknown

Shot = tuple[str, str]

LM_EVAL_STOP: tuple[str, ...] = ("Question:", "</s>", "<|im_end|>")
LM_EVAL_SEED = 1234
LM_EVAL_FALLBACK = "[invalid]"
STRICT_MATCH = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE_EXTRACT = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")

PAPER_HEADER = "Solve the following problem. Put your final numeric answer on the last line as:\n#### <answer>\n\n"
PAPER_FINAL = re.compile(r"####\s*(-?\d[\d,]*)")
INTEGER = re.compile(r"-?\d+")


@dataclass(frozen=True)
class Gsm8kProfile(ABC):
    """How GSM8K questions are prompted, which train examples serve as shots, and how outputs are scored."""

    name: str
    fewshot: int
    max_new_tokens: int
    stop: tuple[str, ...]
    metrics: tuple[str, ...]

    @abstractmethod
    def prompt(self, question: str, shots: Sequence[Shot]) -> str:
        """The prompt for one question after its (question, full answer) shots."""

    @abstractmethod
    def select_shots(self, train: Sequence[Shot], count: int, n_eval: int) -> list[list[Shot]]:
        """`count` shots from `train` for each of `n_eval` eval examples, in eval order."""

    @abstractmethod
    def score(self, output: str, gold: str) -> dict:
        """{"answers": {metric: extracted answer}, "correct": {metric: bool}} for one output against its gold."""


# ---- lm-eval (gsm8k v3.0) -----------------------------------------------------------------------


def regex_filter(pattern: re.Pattern[str], output: str, select: int) -> str:
    """lm-eval's RegexFilter: the `select`-th match (its first non-empty group), stripped; "[invalid]" if none."""
    matches = pattern.findall(output)
    if not matches:
        return LM_EVAL_FALLBACK
    match = matches[select]
    if isinstance(match, tuple):
        match = next((group for group in match if group), LM_EVAL_FALLBACK)
    return match.strip()


@dataclass(frozen=True)
class LmEvalProfile(Gsm8kProfile):
    """lm-evaluation-harness `gsm8k`: "Question: ...\\nAnswer:" shots drawn by its seeded default sampler."""

    def prompt(self, question: str, shots: Sequence[Shot]) -> str:
        context = "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in shots)
        return context + f"Question: {question}\nAnswer:"

    def select_shots(self, train: Sequence[Shot], count: int, n_eval: int) -> list[list[Shot]]:
        """One Random(1234) sampling `count` of the whole pool per eval example, as lm-eval's ContextSampler does."""
        rnd, pool = random.Random(LM_EVAL_SEED), list(train)
        return [rnd.sample(pool, count) if count else [] for _ in range(n_eval)]

    def score(self, output: str, gold: str) -> dict:
        answers = {
            "strict_match": regex_filter(STRICT_MATCH, output, 0),
            "flexible_extract": regex_filter(FLEXIBLE_EXTRACT, output, -1),
        }
        reference = gold_answer(gold)
        return {"answers": answers, "correct": {m: gold_answer(a) == reference for m, a in answers.items()}}


# ---- paper_math (LoRA-Spectral-Edit) -------------------------------------------------------------


def paper_extract(text: str) -> str:
    """The number after the last "####" without commas, else the last integer once commas are dropped, else ""."""
    finals = PAPER_FINAL.findall(text)
    if finals:
        return finals[-1].replace(",", "")
    integers = INTEGER.findall(text.replace(",", ""))
    return integers[-1] if integers else ""


@dataclass(frozen=True)
class PaperMathProfile(Gsm8kProfile):
    """The paper's "Problem:/Answer:" prompt under one instruction header, with the first train examples as shots."""

    def prompt(self, question: str, shots: Sequence[Shot]) -> str:
        target = f"Problem:\n{question.strip()}\n\nAnswer:\n"
        if not shots:
            return PAPER_HEADER + target
        blocks = [PAPER_HEADER] + [f"Problem:\n{q.strip()}\n\nAnswer:\n{a.strip()}\n" for q, a in shots]
        return "\n".join(blocks).rstrip() + "\n\n" + target

    def select_shots(self, train: Sequence[Shot], count: int, n_eval: int) -> list[list[Shot]]:
        return [list(train[:count]) for _ in range(n_eval)]

    def score(self, output: str, gold: str) -> dict:
        answer = paper_extract(output)
        return {
            "answers": {"accuracy": answer},
            "correct": {"accuracy": answer != "" and answer == paper_extract(gold)},
        }


PROFILES: dict[str, Gsm8kProfile] = {
    "lm-eval": LmEvalProfile("lm-eval", 5, 256, LM_EVAL_STOP, ("strict_match", "flexible_extract")),
    "paper_math": PaperMathProfile("paper_math", 5, 512, (), ("accuracy",)),
}


def get_profile(name: str) -> Gsm8kProfile:
    """The named GSM8K profile; an unknown name is a user error with a did-you-mean."""
    if name not in PROFILES:
        raise LoraLabError(unknown("GSM8K profile", name, PROFILES))
    return PROFILES[name]


def score_outputs(
    profile: Gsm8kProfile, outputs: Sequence[str], golds: Sequence[str]
) -> tuple[dict[str, float], list[dict]]:
    """Mean correctness per metric over the outputs, and each output's score."""
    if not outputs:
        raise LoraLabError("GSM8K scoring needs at least one output")
    if len(outputs) != len(golds):
        raise LoraLabError(f"GSM8K scoring got {len(outputs)} outputs for {len(golds)} golds")
    scores = [profile.score(output, gold) for output, gold in zip(outputs, golds, strict=True)]
    metrics = {m: sum(s["correct"][m] for s in scores) / len(scores) for m in profile.metrics}
    return metrics, scores
