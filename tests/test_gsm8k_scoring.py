"""GSM8K profiles against independent oracles: prompts, shot selection and scoring, case by case.

The fixture's strict_match / flexible_extract values were computed with lm-evaluation-harness 0.4.13 itself
(task `gsm8k` version 3.0: its RegexFilter / take_first filters and `exact_match_hf_evaluate` with the task
yaml's kwargs); the lm-eval prompts and Random(1234) shots were also checked equal to that version's
`ConfigurableTask.fewshot_context`. The paper_math values come from the LoRA-Spectral-Edit tool's
extraction (TTtianTT/lora-spectral-edit @ f81f3f9, eval_gsm8k.py: `pred_number` / `extract_gsm8k_final_number`).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from loralab.errors import LoraLabError
from loralab.evaluation.gsm8k import LM_EVAL_STOP, PROFILES, get_profile, gold_answer, score_outputs

CASES = json.loads((Path(__file__).parent / "fixtures" / "gsm8k_outputs.json").read_text())
LM_EVAL, PAPER = get_profile("lm-eval"), get_profile("paper_math")
NATALIA = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"
)
JOSH = (
    "The cost of the house and repairs came out to 80,000+50,000=$<<80000+50000=130000>>130,000\n"
    "So he made a profit of 200,000-130,000=$<<200000-130000=70000>>70,000\n#### 70000"
)
SHOTS = [
    ("What is 2+3? ", "2+3 = <<2+3=5>>5\n#### 5"),
    (" How many legs do 2 cats have?", "2*4 = <<2*4=8>>8\n#### 8\n"),
]


def test_fixture_is_large_enough_and_mixes_outcomes():
    assert len(CASES) >= 36
    for metric in ("strict_match", "flexible_extract", "paper_math"):
        outcomes = {case[metric]["correct"] for case in CASES}
        assert outcomes == {True, False}


@pytest.mark.parametrize("case", CASES, ids=[case["note"] for case in CASES])
def test_lm_eval_extraction_and_match_equal_lm_eval(case):
    score = LM_EVAL.score(case["output"], case["gold"])
    for metric in ("strict_match", "flexible_extract"):
        assert score["answers"][metric] == case[metric]["answer"]
        assert score["correct"][metric] is case[metric]["correct"]


@pytest.mark.parametrize("case", CASES, ids=[case["note"] for case in CASES])
def test_paper_math_extraction_and_match_equal_the_tool(case):
    score = PAPER.score(case["output"], case["gold"])
    assert score == {
        "answers": {"accuracy": case["paper_math"]["answer"]},
        "correct": {"accuracy": case["paper_math"]["correct"]},
    }


def test_score_outputs_means_over_the_fixture():
    outputs, golds = [c["output"] for c in CASES], [c["gold"] for c in CASES]
    metrics, scores = score_outputs(LM_EVAL, outputs, golds)
    assert metrics == {"strict_match": 13 / 50, "flexible_extract": 28 / 50}
    assert metrics["strict_match"] == sum(c["strict_match"]["correct"] for c in CASES) / len(CASES)
    assert [s["answers"]["flexible_extract"] for s in scores] == [c["flexible_extract"]["answer"] for c in CASES]
    metrics, _ = score_outputs(PAPER, outputs, golds)
    assert metrics == {"accuracy": 34 / 50}


def test_score_outputs_on_three_outputs_by_hand():
    metrics, _ = score_outputs(LM_EVAL, ["#### 72", "So 72 clips.", "#### 71"], [NATALIA, "72", "#### 72"])
    assert metrics == pytest.approx({"strict_match": 1 / 3, "flexible_extract": 2 / 3})


def test_score_outputs_rejects_empty_or_mismatched_input():
    with pytest.raises(LoraLabError, match="at least one"):
        score_outputs(LM_EVAL, [], [])
    with pytest.raises(LoraLabError, match="got 2 outputs for 1 golds"):
        score_outputs(PAPER, ["1", "2"], ["1"])


def test_scoring_accepts_a_full_answer_or_a_cleaned_gold():
    for gold in (NATALIA, gold_answer(NATALIA), "72"):
        assert LM_EVAL.score("The answer is $72.", gold)["correct"] == {"strict_match": False, "flexible_extract": True}
        assert PAPER.score("#### 72", gold)["correct"] == {"accuracy": True}
    assert LM_EVAL.score("#### 70,000", JOSH)["correct"] == {"strict_match": True, "flexible_extract": True}
    assert PAPER.score("#### 70,000", gold_answer(JOSH))["correct"] == {"accuracy": True}


def test_lm_eval_prompt_with_two_shots_and_none():
    expected = (
        "Question: What is 2+3? \nAnswer: 2+3 = <<2+3=5>>5\n#### 5\n\n"
        "Question:  How many legs do 2 cats have?\nAnswer: 2*4 = <<2*4=8>>8\n#### 8\n\n\n"
        "Question: Tom has 3 apples. How many?\nAnswer:"
    )
    assert LM_EVAL.prompt("Tom has 3 apples. How many?", SHOTS) == expected
    assert LM_EVAL.prompt("Tom has 3 apples. How many?", []) == "Question: Tom has 3 apples. How many?\nAnswer:"


def test_paper_math_prompt_with_two_shots_and_none():
    header = "Solve the following problem. Put your final numeric answer on the last line as:\n#### <answer>\n\n"
    expected = (
        header + "\n"
        "Problem:\nWhat is 2+3?\n\nAnswer:\n2+3 = <<2+3=5>>5\n#### 5\n\n"
        "Problem:\nHow many legs do 2 cats have?\n\nAnswer:\n2*4 = <<2*4=8>>8\n#### 8\n\n"
        "Problem:\nTom has 3 apples. How many?\n\nAnswer:\n"
    )
    assert PAPER.prompt(" Tom has 3 apples. How many?\n", SHOTS) == expected
    assert (
        PAPER.prompt(" Tom has 3 apples. How many?\n", [])
        == header + "Problem:\nTom has 3 apples. How many?\n\nAnswer:\n"
    )


def test_lm_eval_shots_are_successive_samples_of_one_seeded_random():
    train = [(f"q{i}", f"a{i}\n#### {i}") for i in range(30)]
    rnd = random.Random(1234)
    expected = [rnd.sample(train, 5) for _ in range(4)]
    shots = LM_EVAL.select_shots(train, 5, 4)
    assert shots == expected
    assert len({tuple(s) for s in shots}) == 4
    assert LM_EVAL.select_shots(train, 5, 4) == expected
    assert LM_EVAL.select_shots(train, 0, 3) == [[], [], []]


def test_paper_math_shots_are_the_first_train_examples_for_everyone():
    train = [(f"q{i}", f"a{i}\n#### {i}") for i in range(30)]
    assert PAPER.select_shots(train, 5, 3) == [train[:5]] * 3
    assert PAPER.select_shots(train, 0, 2) == [[], []]


def test_gold_answer_cleans_like_lm_eval_and_is_idempotent():
    assert gold_answer(NATALIA) == "72"
    assert gold_answer(JOSH) == "70000"
    assert gold_answer("Step.\n#### 1,234") == "1234"
    assert gold_answer("She pays $<<2*9=18>>18.\n#### 18.") == "18"
    assert gold_answer("#### -3") == "-3"
    for text in (NATALIA, JOSH, "72", "-3", "0.5"):
        assert gold_answer(gold_answer(text)) == gold_answer(text)


def test_profile_settings():
    assert (LM_EVAL.name, LM_EVAL.fewshot, LM_EVAL.max_new_tokens) == ("lm-eval", 5, 256)
    assert LM_EVAL.stop == LM_EVAL_STOP == ("Question:", "</s>", "<|im_end|>")
    assert LM_EVAL.metrics == ("strict_match", "flexible_extract")
    assert (PAPER.name, PAPER.fewshot, PAPER.max_new_tokens, PAPER.stop) == ("paper_math", 5, 512, ())
    assert PAPER.metrics == ("accuracy",)
    assert set(PROFILES) == {"lm-eval", "paper_math"}


def test_unknown_profile_is_a_user_error_with_a_hint():
    with pytest.raises(LoraLabError, match=r"unknown GSM8K profile 'lm_eval' \(did you mean 'lm-eval'\?\)"):
        get_profile("lm_eval")
    with pytest.raises(LoraLabError, match="choose one of: lm-eval, paper_math"):
        get_profile("bleu")
