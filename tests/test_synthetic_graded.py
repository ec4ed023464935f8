"""The graded sentiment tasks: reproducible per seed, labels that a hand-written reader of the passage recovers
(so the noise rate is the measured share of labels that disagree with it), and difficulty that grows by level."""

from __future__ import annotations

import collections
import itertools
import os
import random
import re
import subprocess
import sys
from dataclasses import replace

import pytest

from conftest import task
from loralab.data import load_task
from loralab.data.synthetic import (
    GRADED_SENTIMENT,
    NEGATIVE,
    POSITIVE,
    SENTIMENT_LEVELS,
    SENTIMENT_WORDS,
    SentimentLevel,
    generate,
    graded_sentiment_row,
    made_up_adjectives,
)

# the reader's own vocabulary, written out here rather than imported, so a drift in the generator shows up
FRAMES = ("it is not true that ", "nobody would say that ", "i would not claim that ", "it is false that ")
NEGATED = re.compile(r"\b(was not|is not|was never|did not seem|never felt|was hardly)\b")
REPORTED = re.compile(r"^(a friend said|my neighbour thought|the critics wrote|a colleague claimed) that ")


def clause_reading(clause: str, lexicon: int = 0) -> tuple[int, int]:
    """(sentiment, negation count) of one clause: the adjective's polarity flipped once per negation."""
    clause, depth = clause.lower(), 0  # "I would not claim that" keeps its capital inside a sentence
    while clause.startswith(FRAMES):
        frame = next(f for f in FRAMES if clause.startswith(f))
        clause, depth = clause[len(frame) :], depth + 1
    depth += len(NEGATED.findall(clause))
    positive, negative = made_up_adjectives(lexicon) if lexicon else (POSITIVE, NEGATIVE)
    (polarity,) = {int(word in positive) for word in re.findall(r"[a-z]+", clause) if word in {*positive, *negative}}
    return polarity ^ (depth % 2), depth  # one polarity per clause, however many adjectives name it


def deciding_clause(sentence: str) -> tuple[str, list[str]]:
    """The clause that decides a main sentence, and every clause in it (a concession has two)."""
    if sentence.startswith("although "):
        conceded, decided = sentence[len("although ") :].split(", ", 1)
        return decided, [conceded, decided]
    for marker, decided_first in (
        (", although ", True),
        (", even though ", True),
        (", but ", False),
        ("; still, ", False),
    ):
        if marker in sentence:
            first, second = sentence.split(marker)
            return (first if decided_first else second), [first, second]
    return sentence, [sentence]


def read_passage(passage: str, lexicon: int = 0) -> dict[str, int]:
    """The label a careful reader gives a passage, with the counts of its difficulty features."""
    sentences = [s[0].lower() + s[1:] for s in passage.removesuffix(".").split(". ")]
    main = [s for s in sentences if not REPORTED.match(s)]
    assert len(main) == 1, passage
    decided, clauses = deciding_clause(main[0])
    depths = [clause_reading(clause, lexicon)[1] for clause in clauses]
    return {
        "label": clause_reading(decided, lexicon)[0],
        "distractors": len(sentences) - 1,
        "concession": int(len(clauses) == 2),
        "max_depth": max(depths),
        "negations": sum(depths),
    }


def rows(level: SentimentLevel, count: int = 4000, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [graded_sentiment_row(rng, level) for _ in range(count)]


def test_the_generator_is_deterministic_per_seed():
    level = SENTIMENT_LEVELS[3]
    assert rows(level, 300, seed=5) == rows(level, 300, seed=5)
    assert rows(level, 300, seed=5) != rows(level, 300, seed=6)
    assert generate("synthetic/sentiment-3", "eval", 100) == generate("synthetic/sentiment-3", "eval", 100)


@pytest.mark.parametrize("name", sorted(GRADED_SENTIMENT))
def test_noise_free_labels_are_what_a_reader_of_the_passage_says(name):
    knobs = GRADED_SENTIMENT[name]
    for row in rows(replace(knobs, noise=0.0)):
        assert read_passage(row["sentence"], knobs.lexicon)["label"] == row["label"], row


@pytest.mark.parametrize("rate", [0.05, 0.1, 0.3])
def test_the_noise_rate_is_the_measured_share_of_flipped_labels(rate):
    noisy = rows(replace(SENTIMENT_LEVELS[2], noise=rate))
    flipped = sum(read_passage(row["sentence"])["label"] != row["label"] for row in noisy) / len(noisy)
    assert abs(flipped - rate) < 3 * (rate * (1 - rate) / len(noisy)) ** 0.5 + 0.005  # binomial, 4000 draws
    clean = rows(replace(SENTIMENT_LEVELS[2], noise=0.0))  # noise draws no random numbers: same passages
    assert [row["sentence"] for row in clean] == [row["sentence"] for row in noisy]


def test_the_packaged_levels_flip_their_stated_share():
    for name, level in GRADED_SENTIMENT.items():
        train = generate(name, "train", 2000)
        flipped = sum(read_passage(row["sentence"], level.lexicon)["label"] != row["label"] for row in train)
        flipped /= len(train)
        assert abs(flipped - level.noise) < 3 * (level.noise * (1 - level.noise) / 2000) ** 0.5 + 0.005


@pytest.mark.parametrize("name", sorted(GRADED_SENTIMENT))
def test_each_level_shows_its_difficulty_features_up_to_its_limits(name):
    knobs = GRADED_SENTIMENT[name]
    readings = [read_passage(row["sentence"], knobs.lexicon) for row in rows(knobs)]
    assert {r["distractors"] for r in readings} == set(range(knobs.distractors + 1))
    assert max(r["max_depth"] for r in readings) == knobs.negations
    concessions = sum(r["concession"] for r in readings) / len(readings)
    assert abs(concessions - knobs.contrast) < 0.03


def test_difficulty_grows_with_the_numbered_level():
    means = []
    for n in sorted(SENTIMENT_LEVELS):
        readings = [read_passage(row["sentence"]) for row in rows(SENTIMENT_LEVELS[n])]
        means.append([sum(r[key] for r in readings) / len(readings) for key in ("negations", "distractors")])
    for easier, harder in itertools.pairwise(means):
        assert harder[0] >= easier[0] - 0.05 and harder[1] >= easier[1] - 0.05  # equal knobs: sampling noise
    assert means[-1][0] > means[0][0] + 0.5 and means[-1][1] > means[0][1] + 0.4


def test_the_graded_tasks_load_as_declared_two_class_tasks():
    data = load_task(task("synthetic/sentiment-3", train=200, evaluation=50))
    assert data.spec.label_names == ("negative", "positive")
    assert {example.label for example in data.train} == {0, 1} and len(data.eval) == 50
    assert not {e.text for e in data.train} & {e.text for e in data.eval}


def test_the_words_task_teaches_made_up_polarities_three_to_a_deciding_clause():
    positive, negative = made_up_adjectives(SENTIMENT_WORDS.lexicon)
    vocabulary = {*positive, *negative}
    assert len(positive) == len(negative) == SENTIMENT_WORDS.lexicon // 2 == len(vocabulary) // 2
    assert not vocabulary & {*POSITIVE, *NEGATIVE}
    # the same words in a fresh process with another hash seed: the vocabulary does not depend on set or str hashing
    fresh = subprocess.run(
        [
            sys.executable,
            "-c",
            f"from loralab.data.synthetic import made_up_adjectives as m; print(m({SENTIMENT_WORDS.lexicon}))",
        ],
        env={**os.environ, "PYTHONHASHSEED": "12345"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert fresh.stdout.strip() == repr((positive, negative))

    def deciding_words(passage: str) -> list[str]:
        (main,) = [s for s in passage.lower().removesuffix(".").split(". ") if not REPORTED.match(s)]
        return [word for word in re.findall(r"[a-z]+", main) if word in vocabulary]

    train = generate("synthetic/sentiment-words", "train", 2000)
    seen = collections.Counter(word for row in train for word in deciding_words(row["sentence"]))
    assert len(seen) >= 0.97 * SENTIMENT_WORDS.lexicon  # each word decides about 6 passages (Poisson: a few none)
    for row in generate("synthetic/sentiment-words", "eval", 500):
        words = deciding_words(row["sentence"])
        assert len(set(words)) == SENTIMENT_WORDS.adjectives
        assert {int(word in positive) for word in words} == {row["label"]}
        assert any(seen[word] for word in words)  # every eval passage has a word that training passages decide by
