"""The one-step arithmetic tasks (base and shifted) and the causal full fine-tune that writes a reusable model/."""

from __future__ import annotations

import random
import re

import pytest
import torch
from safetensors.torch import load_file

from loralab.config import load_config
from loralab.data.synthetic import GENERATORS, ITEMS, NAMES, PHRASINGS, OneStepArithmetic, generate
from loralab.models import load_model
from loralab.models.presets import build_tiny, tiny_tokenizer
from loralab.training.recipe import run_training

BASE, SHIFTED = "synthetic/arithmetic_simple", "synthetic/arithmetic_shifted"
ANSWER = re.compile(r"^(\d+) ([+-]) (\d+) = (\d+)\n#### (\d+)$")


def parsed(row: dict) -> tuple[int, str, int, int, int]:
    """(a, sign, b, rationale result, final answer) of a row's answer; fails the test when it is malformed."""
    match = ANSWER.match(row["answer"])
    assert match, row["answer"]
    a, sign, b, result, final = match.groups()
    return int(a), sign, int(b), int(result), int(final)


@pytest.mark.parametrize(("name", "low", "high", "phrasing"), [(BASE, 1, 20, "has"), (SHIFTED, 5, 25, "box")])
def test_rows_follow_the_declared_ranges_and_phrasing(name, low, high, phrasing):
    rows = generate(name, "train", 1000)
    numbers = [n for row in rows for n in parsed(row)[::2][:2]]
    assert min(numbers) == low and max(numbers) == high  # the whole declared range is drawn, nothing outside it
    start, add, remove, question = PHRASINGS[phrasing]
    for row in rows[:200]:
        a, sign, b, _, _ = parsed(row)
        sentences = (start, remove if sign == "-" else add, question)
        texts = {" ".join(s.format(name=n, item=i, a=a, b=b) for s in sentences) for n in NAMES for i in ITEMS}
        assert row["question"] in texts


def test_the_shifted_task_differs_from_the_base_in_phrasing_and_numbers():
    base, shifted = generate(BASE, "eval", 200), generate(SHIFTED, "eval", 200)
    assert all(row["question"].startswith("A box holds ") for row in shifted)
    assert not any("box" in row["question"] for row in base)
    assert max(parsed(row)[0] for row in base) <= 20 < max(parsed(row)[0] for row in shifted)
    assert GENERATORS[SHIFTED][0] == OneStepArithmetic(low=5, high=25, phrasing="box")


@pytest.mark.parametrize("name", [BASE, SHIFTED])
def test_answers_are_the_evaluated_expression_and_never_negative(name):
    for row in generate(name, "train", 500) + generate(name, "eval", 100):
        a, sign, b, result, final = parsed(row)
        expected = a + b if sign == "+" else a - b
        assert result == final == expected >= 0
        assert f" {a} " in f" {row['question']}" and f" {b}" in row["question"]


def test_rows_are_deterministic_per_seed_and_splits_disjoint():
    maker = OneStepArithmetic(low=1, high=20, phrasing="has")

    def rows(seed: int) -> list[dict]:
        rng = random.Random(seed)
        return [maker(rng) for _ in range(20)]

    assert rows(7) == rows(7) != rows(8)
    assert generate(BASE, "train", 300) == generate(BASE, "train", 300)
    train = {row["question"] for row in generate(BASE, "train", 2000)}
    assert not train & {row["question"] for row in generate(BASE, "eval", 200)}


@pytest.mark.slow
def test_a_causal_full_fine_tune_writes_a_model_directory_that_reloads_to_the_same_logits(tmp_path):
    config = load_config(
        [],
        [
            f"io.root={tmp_path / 'runs'}",
            "model.name=tiny-llama",
            f"task.name={BASE}",
            "task.train_samples=16",
            "task.eval_samples=2",
            "method.name=full",
            "train.max_steps=2",
            "train.batch_size=8",
            "train.lr=1e-2",
            "eval.max_new_tokens=4",
        ],
    )
    directory = run_training(config, show_progress=False).directory / "model"
    trained = load_file(str(directory.parent / "adapter" / "weights.safetensors"))
    reference = build_tiny("tiny-llama", "causal_lm", None)
    initial = {k: v.clone() for k, v in reference.state_dict().items()}
    reference.load_state_dict(trained, strict=False)
    assert any(not torch.equal(initial[k], v) for k, v in trained.items())  # the saved weights are trained ones
    reloaded, tokenizer = load_model(load_config([], [f"model.name={directory}"]).model, "causal_lm")
    text = "Question: Ines has 3 cards. Ines finds 4 more. How many now?\nAnswer:"
    assert tokenizer(text)["input_ids"] == tiny_tokenizer("tiny-llama")(text)["input_ids"]
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(input_ids=ids).logits, reference.eval()(input_ids=ids).logits)
