"""Task metrics from the field's libraries (scikit-learn, scipy, rouge-score, sacrebleu) and answer extraction."""

from __future__ import annotations

import functools
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from loralab.data.answers import UNANSWERABLE
from loralab.errors import ConfigError, LoraLabError, unknown

PUNCTUATION = frozenset(string.punctuation)
ARTICLES = re.compile(r"\b(a|an|the)\b")
ANSWER_KINDS = ("label", "text", "squad")  # GSM8K answers are extracted by evaluation.gsm8k's profiles


# ---- answer extraction --------------------------------------------------------------------------


def extract_answer(kind: str, output: str) -> str:
    """The prediction a generated output stands for.

    text: the whole output, stripped (multi-line responses and summaries are scored whole);
    label: the first word, lower-cased, without punctuation; squad: the first line, '' when it says unanswerable.
    """
    if kind not in ANSWER_KINDS:
        raise LoraLabError(unknown("answer kind", kind, ANSWER_KINDS))
    if kind == "text":
        return output.strip()
    first_line = output.strip().split("\n", 1)[0].strip()
    if kind == "label":
        words = first_line.split()
        return words[0].lower().strip(string.punctuation) if words else ""
    if kind == "squad" and squad_normalize(first_line) == UNANSWERABLE:
        return ""
    return first_line


# ---- SQuAD (official normalisation; v2.0's rule for empty answers) -------------------------------


def squad_normalize(text: str) -> str:
    """Lower-case, drop punctuation and the articles a/an/the, collapse white space (official SQuAD script)."""
    text = "".join(ch for ch in text.lower() if ch not in PUNCTUATION)
    return " ".join(ARTICLES.sub(" ", text).split())


def squad_f1_one(prediction: str, reference: str) -> float:
    """Token-overlap F1 of one prediction against one answer; an empty answer only matches an empty one."""
    predicted, gold = squad_normalize(prediction).split(), squad_normalize(reference).split()
    if not predicted or not gold:
        return float(predicted == gold)
    common = sum((Counter(predicted) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def as_list(reference: Any) -> list:
    """A reference as a list of acceptable answers."""
    return list(reference) if isinstance(reference, list | tuple) else [reference]


def best_over_references(score: Callable[[str, str], float]) -> Callable[[Sequence, Sequence], float]:
    """Mean over examples of the best score against any of the example's references."""

    def metric(predictions: Sequence, references: Sequence) -> float:
        pairs = zip(predictions, references, strict=True)
        return float(np.mean([max(score(str(p), str(r)) for r in as_list(refs)) for p, refs in pairs]))

    return metric


squad_em = best_over_references(lambda p, r: float(squad_normalize(p) == squad_normalize(r)))
squad_f1 = best_over_references(squad_f1_one)
exact_match = best_over_references(lambda p, r: float(p.strip() == r.strip()))


# ---- classification and regression ---------------------------------------------------------------


def accuracy(predictions: Sequence, references: Sequence) -> float:
    return float(np.mean([p == r for p, r in zip(predictions, references, strict=True)]))


def binary_f1(predictions: Sequence, references: Sequence) -> float:
    """F1 of the positive class, label 1 (GLUE's convention for MRPC/QQP); labels must be indices."""
    from sklearn.metrics import f1_score

    if any(isinstance(v, str) for v in [*predictions, *references]):
        raise LoraLabError("f1 needs label indices: pass label_names to compute_metrics to map label words")
    return float(f1_score(references, predictions, pos_label=1, average="binary", zero_division=0))


def macro_f1(predictions: Sequence, references: Sequence) -> float:
    """F1 averaged over the classes that occur in the references or predictions, each class weighted alike."""
    from sklearn.metrics import f1_score

    return float(f1_score(references, predictions, average="macro", zero_division=0))


def mcc(predictions: Sequence, references: Sequence) -> float:
    from sklearn.metrics import matthews_corrcoef

    return float(matthews_corrcoef(references, predictions))


def correlation_defined(predictions: Sequence[float], references: Sequence[float]) -> bool:
    """Whether a correlation exists: at least 2 pairs and neither side constant (scipy raises or warns otherwise)."""
    x, y = np.asarray(predictions, dtype=float), np.asarray(references, dtype=float)
    return x.size >= 2 and bool(np.ptp(x) > 0) and bool(np.ptp(y) > 0)


def pearson(predictions: Sequence[float], references: Sequence[float]) -> float:
    """Pearson's r (scipy); NaN where undefined, so a tiny or constant eval split does not fail the run."""
    from scipy.stats import pearsonr

    if not correlation_defined(predictions, references):
        return float("nan")
    return float(pearsonr(predictions, references)[0])


def spearman(predictions: Sequence[float], references: Sequence[float]) -> float:
    """Spearman's rho (scipy); NaN where undefined, as for pearson."""
    from scipy.stats import spearmanr

    if not correlation_defined(predictions, references):
        return float("nan")
    return float(spearmanr(predictions, references)[0])


# ---- text generation ------------------------------------------------------------------------------


@functools.cache
def rouge_scorer_for(kind: str) -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer([kind], use_stemmer=True)


def rouge(kind: str) -> Callable[[Sequence, Sequence], float]:
    """Mean ROUGE F-measure (rouge-score, Porter stemming, no bootstrap); rougeLsum splits sentences on newlines."""
    return best_over_references(lambda p, r: rouge_scorer_for(kind).score(r, p)[kind].fmeasure)


def bleu(predictions: Sequence, references: Sequence) -> float:
    """Corpus BLEU (sacrebleu, 13a tokenisation) against all of each example's references."""
    import sacrebleu

    refs = [as_list(r) for r in references]
    streams = [[str(r[i]) if i < len(r) else None for r in refs] for i in range(max(len(r) for r in refs))]
    return float(sacrebleu.corpus_bleu([str(p) for p in predictions], streams, tokenize="13a").score)


METRICS: dict[str, Callable[[Sequence, Sequence], float]] = {
    "accuracy": accuracy,
    "f1": binary_f1,
    "macro_f1": macro_f1,
    "mcc": mcc,
    "pearson": pearson,
    "spearman": spearman,
    "exact_match": exact_match,
    "squad_em": squad_em,
    "squad_f1": squad_f1,
    "rouge1": rouge("rouge1"),
    "rouge2": rouge("rouge2"),
    "rougeL": rouge("rougeL"),
    "rougeLsum": rouge("rougeLsum"),
    "bleu": bleu,
}


def label_indices(values: Sequence, label_names: Sequence[str]) -> list:
    """Label words → their indices (-1 for a word that is no label); other values pass through."""
    index = {name: i for i, name in enumerate(label_names)}
    return [index.get(v, -1) if isinstance(v, str) else v for v in values]


def check_metrics(names: Sequence[str]) -> None:
    """Refuse a metric name that is not in METRICS; a run checks its task's before it trains, not after."""
    for name in names:
        if name not in METRICS:
            raise ConfigError(f"task.metrics: {unknown('metric', name, METRICS)}")


def compute_metrics(
    names: Sequence[str], predictions: Sequence, references: Sequence, label_names: Sequence[str] = ()
) -> dict[str, float]:
    """Each named metric of the predictions against the references.

    With `label_names` (a classification task's, in index order) label words are scored as their indices.
    """
    check_metrics(names)
    if len(predictions) != len(references):
        raise LoraLabError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise LoraLabError("no predictions to score")
    if label_names:
        predictions, references = label_indices(predictions, label_names), label_indices(references, label_names)
    return {name: METRICS[name](predictions, references) for name in names}
