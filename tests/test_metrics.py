"""Metrics against hand computations and direct library calls; answer extraction on crafted outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sacrebleu
from rouge_score import rouge_scorer
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score, matthews_corrcoef

from loralab.errors import LoraLabError
from loralab.evaluation.metrics import compute_metrics, extract_answer
from loralab.evaluation.standalone import score_predictions

SQUAD_CASES = json.loads((Path(__file__).parent / "fixtures" / "squad_cases.json").read_text())
PREDICTED = [1, 0, 1, 1, 0, 1, 0, 0]
GOLD = [1, 0, 0, 1, 1, 1, 0, 1]


def test_classification_metrics_equal_hand_and_sklearn_values():
    scores = compute_metrics(["accuracy", "f1", "mcc"], PREDICTED, GOLD)
    # tp = 3, fp = 1, fn = 2, tn = 2
    assert scores["accuracy"] == 5 / 8
    assert scores["f1"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 2)) == f1_score(GOLD, PREDICTED)
    assert scores["mcc"] == pytest.approx((3 * 2 - 1 * 2) / ((4 * 5 * 3 * 4) ** 0.5))
    assert scores["mcc"] == pytest.approx(matthews_corrcoef(GOLD, PREDICTED))


def test_label_words_are_scored_as_indices_so_f1_uses_label_1():
    names = ("not_equivalent", "equivalent")
    words = [[names[i] for i in values] for values in (PREDICTED, GOLD)]
    scores = compute_metrics(["accuracy", "f1", "mcc"], *words, label_names=names)
    assert scores == compute_metrics(["accuracy", "f1", "mcc"], PREDICTED, GOLD)
    assert compute_metrics(["accuracy"], ["maybe", "equivalent"], ["equivalent"] * 2, label_names=names) == {
        "accuracy": 0.5
    }
    with pytest.raises(LoraLabError, match="f1 needs label indices"):
        compute_metrics(["f1"], *words)


def test_regression_metrics_equal_scipy():
    predicted, gold = [0.1, 2.0, 3.5, 4.0, 1.0], [0.0, 2.5, 3.0, 5.0, 1.5]
    scores = compute_metrics(["pearson", "spearman"], predicted, gold)
    assert scores["pearson"] == pytest.approx(pearsonr(predicted, gold)[0])
    assert scores["spearman"] == pytest.approx(spearmanr(predicted, gold)[0]) == 1.0


def test_exact_match_accepts_any_reference_after_stripping():
    scores = compute_metrics(["exact_match"], ["72", " Paris", "3", "x"], ["72", ["London", "Paris"], "4", "X"])
    assert scores == {"exact_match": 0.5}


def test_squad_em_and_f1_follow_the_official_normalisation():
    predictions = ["The Eiffel Tower!", "the big red dog", "Lyon", "", "an apple pie"]
    references = [["Eiffel tower"], ["red dog"], ["Paris", "Lyon, France"], [""], ["Apple  pie.", "a pear"]]
    scores = compute_metrics(["squad_em", "squad_f1"], predictions, references)
    # EM: articles and punctuation removed, case and spacing ignored → 1, 0, 0, 1 (both empty), 1
    assert scores["squad_em"] == pytest.approx(3 / 5)
    # F1: 1; big red dog vs red dog → p 2/3, r 1 → 0.8; lyon vs (lyon france) → p 1, r 1/2 → 2/3; 1; 1
    assert scores["squad_f1"] == pytest.approx((1 + 0.8 + 2 / 3 + 1 + 1) / 5)
    assert compute_metrics(["squad_em", "squad_f1"], ["Paris"], [[""]]) == {"squad_em": 0.0, "squad_f1": 0.0}


@pytest.mark.parametrize("case", SQUAD_CASES, ids=[case["note"] for case in SQUAD_CASES])
def test_squad_scores_equal_the_official_script_on_fixture_cases(case):
    """Expected EM/F1 (as fractions, not the script's percentages) come from a separate re-implementation of the
    official evaluate-v1.1.py rules (lower-case, ASCII punctuation deleted, a/an/the deleted as whole words, white
    space collapsed; multiset token-overlap F1; max over golds) with v2.0's empty-answer rule, run once."""
    scores = compute_metrics(["squad_em", "squad_f1"], [case["prediction"]], [case["golds"]])
    assert scores["squad_em"] == pytest.approx(case["em"], abs=1e-9)
    assert scores["squad_f1"] == pytest.approx(case["f1"], abs=1e-9)


def test_squad_scores_of_the_fixture_cases_together_are_their_means():
    predictions, golds = [c["prediction"] for c in SQUAD_CASES], [c["golds"] for c in SQUAD_CASES]
    scores = compute_metrics(["squad_em", "squad_f1"], predictions, golds)
    assert len(SQUAD_CASES) >= 15 and {c["em"] for c in SQUAD_CASES} == {0.0, 1.0}
    assert scores["squad_em"] == pytest.approx(sum(c["em"] for c in SQUAD_CASES) / len(SQUAD_CASES), abs=1e-9)
    assert scores["squad_f1"] == pytest.approx(sum(c["f1"] for c in SQUAD_CASES) / len(SQUAD_CASES), abs=1e-9)


def test_rouge_equals_rouge_score():
    predictions = ["the cats are sitting on the mat", "it jumps high.\na quick brown fox."]
    references = ["the cat sat on the mat", "the quick brown fox jumps.\nit jumped over the dog"]
    kinds = ["rouge1", "rouge2", "rougeL", "rougeLsum"]
    scores = compute_metrics(kinds, predictions, references)
    scorer = rouge_scorer.RougeScorer(kinds, use_stemmer=True)
    direct = [scorer.score(r, p) for p, r in zip(predictions, references, strict=True)]
    for kind in kinds:
        assert scores[kind] == pytest.approx(sum(d[kind].fmeasure for d in direct) / 2)
    assert scores["rougeLsum"] != pytest.approx(scores["rougeL"])


def test_bleu_equals_sacrebleu_with_all_references():
    predictions = ["the cat sat on the mat", "there is a dog in the garden today"]
    assert compute_metrics(["bleu"], predictions, ["the cat sat on a mat", "a dog is in the garden today"])[
        "bleu"
    ] == pytest.approx(
        sacrebleu.corpus_bleu(
            predictions, [["the cat sat on a mat", "a dog is in the garden today"]], tokenize="13a"
        ).score
    )
    several = [["the cat sat on a mat", "a cat sat on the mat"], ["there is a dog in the garden"]]
    expected = sacrebleu.corpus_bleu(
        predictions,
        [["the cat sat on a mat", "there is a dog in the garden"], ["a cat sat on the mat", None]],
        tokenize="13a",
    ).score
    assert compute_metrics(["bleu"], predictions, several)["bleu"] == pytest.approx(expected)


def test_bad_metric_calls_are_user_errors():
    with pytest.raises(LoraLabError, match=r"unknown metric 'acuracy' \(did you mean 'accuracy'\?\)"):
        compute_metrics(["acuracy"], [1], [1])
    with pytest.raises(LoraLabError, match="2 predictions but 1 references"):
        compute_metrics(["accuracy"], [1, 0], [1])
    with pytest.raises(LoraLabError, match="no predictions"):
        compute_metrics(["accuracy"], [], [])


def test_extract_text_label_and_squad_answers():
    assert extract_answer("text", "  The summary.  \nMore text\n") == "The summary.  \nMore text"
    assert extract_answer("label", " Positive! it was great") == "positive"
    assert extract_answer("label", "\n") == ""
    assert extract_answer("squad", " Unanswerable.\n") == "" and extract_answer("squad", " Paris\nQ") == "Paris"
    with pytest.raises(LoraLabError, match="unknown answer kind 'gsm8k'"):
        extract_answer("gsm8k", "#### 1")
    with pytest.raises(LoraLabError, match="unknown answer kind 'number'"):
        extract_answer("number", "1")


def test_score_predictions_maps_a_tasks_label_words(tmp_path):
    """`loralab score` on MRPC predictions (label words, as runs write them) gives sklearn's F1 on indices."""
    names = ("not_equivalent", "equivalent")
    path = tmp_path / "predictions.jsonl"
    pairs = zip(PREDICTED, GOLD, strict=True)
    path.write_text("".join(f'{{"prediction": "{names[p]}", "reference": "{names[g]}"}}\n' for p, g in pairs))
    scores = score_predictions("glue/mrpc", path)
    assert scores["f1"] == pytest.approx(f1_score(GOLD, PREDICTED)) and scores["accuracy"] == 5 / 8
