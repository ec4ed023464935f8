"""Offline synthetic tasks, generated deterministically, in the schema of their hub counterparts.

`sentiment` rows look like glue/sst2, `entailment` like glue/rte, `arithmetic` like gsm8k, so the same
converters, templates and metrics serve both. Each split draws from its own seeded `random.Random`, and a
fixed hash of an example's key text assigns every possible example to exactly one split: train and eval
never share a text, and a split's first N rows are the same whatever N the caller asks for.
"""

from __future__ import annotations

import itertools
import random
import zlib
from collections.abc import Callable

from loralab.data.tasks import Row
from loralab.errors import DataError

# ---- sentiment: compositional polarity (negation flips it, the clause after "but" decides it) ----------

SUBJECTS = [
    "the movie",
    "the film",
    "this book",
    "the restaurant",
    "the service",
    "the plot",
    "the acting",
    "the album",
    "the hotel",
    "the game",
    "the concert",
    "the show",
    "the meal",
    "the trip",
    "the course",
]
POSITIVE = [
    "good",
    "great",
    "wonderful",
    "excellent",
    "delightful",
    "charming",
    "brilliant",
    "enjoyable",
    "fantastic",
    "pleasant",
]
NEGATIVE = ["bad", "terrible", "awful", "boring", "dull", "disappointing", "mediocre", "painful", "weak", "annoying"]
VERBS = ["was", "is", "seemed", "felt"]
NEGATED_VERBS = ["was not", "is not", "was never", "did not seem", "never felt", "was hardly"]
INTENSIFIERS = ["", "", "", "very ", "really ", "extremely ", "truly ", "quite "]
NEGATION_RATE = 0.4
CONTRAST_RATE = 0.4


def sentiment_clause(rng: random.Random, label: int) -> str:
    """A clause whose sentiment is `label` (1 = positive): a plain or intensified adjective, or a negated opposite."""
    subject = rng.choice(SUBJECTS)
    if rng.random() < NEGATION_RATE:
        return f"{subject} {rng.choice(NEGATED_VERBS)} {rng.choice(NEGATIVE if label else POSITIVE)}"
    return f"{subject} {rng.choice(VERBS)} {rng.choice(INTENSIFIERS)}{rng.choice(POSITIVE if label else NEGATIVE)}"


def sentiment_row(rng: random.Random) -> Row:
    """One sentence; in a contrast ('X, but Y') the first clause has the opposite sentiment of Y, which decides."""
    label = rng.randrange(2)
    sentence = sentiment_clause(rng, label)
    if rng.random() < CONTRAST_RATE:
        sentence = f"{sentiment_clause(rng, 1 - label)}, but {sentence}"
    return {"sentence": sentence + ".", "label": label}


# ---- entailment: a fact, and a hypothesis that keeps it or changes one detail ------------------------

NAMES = ["Alice", "Bob", "Carla", "David", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kemal", "Lena"]
CITIES = ["Paris", "Lima", "Oslo", "Cairo", "Tokyo", "Quito", "Rome", "Delhi", "Accra", "Seoul"]
COLORS = ["red", "blue", "green", "yellow", "black", "white"]
THINGS = ["apples", "books", "chairs", "lamps", "shirts", "bottles", "tickets", "plates"]
COUNTS = ["two", "three", "four", "five", "six", "seven", "eight", "nine"]
SLOTS = {"name": NAMES, "city": CITIES, "color": COLORS, "thing": THINGS, "count": COUNTS}

PREMISES = [
    "{name} bought {count} {color} {thing} in {city} last week.",
    "Last week in {city}, {name} bought {count} {color} {thing}.",
]
HYPOTHESES = [
    "{name} bought {count} {color} {thing} in {city}.",
    "In {city}, {name} bought {count} {thing}.",
    "{name} bought some {color} {thing}.",
    "{count} {thing} were bought by {name}.",
    "{name} was in {city} last week.",
    "Someone bought {color} {thing} in {city}.",
]
# (entailed, not entailed): negation appears on both sides, so "not" alone does not give the label away
NEGATED_HYPOTHESES = [
    ("{name} did not leave {city} empty-handed.", "{name} left {city} empty-handed."),
    ("It is not true that {name} bought nothing.", "{name} did not buy any {thing}."),
    ("{name} did not buy fewer than {count} {thing}.", "{name} never went to {city}."),
]
NEGATED_RATE = 0.25


def entailment_row(rng: random.Random) -> Row:
    """An RTE-style pair; label 0 = entailment, 1 = not_entailment (GLUE order)."""
    fact = {slot: rng.choice(values) for slot, values in SLOTS.items()}
    premise = rng.choice(PREMISES).format(**fact)
    label = rng.randrange(2)
    if rng.random() < NEGATED_RATE:
        return {"sentence1": premise, "sentence2": rng.choice(NEGATED_HYPOTHESES)[label].format(**fact), "label": label}
    template = rng.choice(HYPOTHESES)
    if label:
        changed = rng.choice([slot for slot in SLOTS if "{" + slot + "}" in template])
        fact[changed] = rng.choice([v for v in SLOTS[changed] if v != fact[changed]])
    hypothesis = template.format(**fact)
    return {"sentence1": premise, "sentence2": hypothesis[0].upper() + hypothesis[1:], "label": label}


# ---- arithmetic: gsm8k-format word problems ------------------------------------------------------------

ITEMS = ["apples", "marbles", "stickers", "cookies", "pencils", "cards", "shells", "coins"]


def arithmetic_step(rng: random.Random, name: str, item: str, total: int) -> tuple[str, list[str], int]:
    """One event of a story: its sentence, its rationale lines (with <<expr=value>> annotations), the new total."""
    op = rng.choice(["gain", "lose", "double", "packs"] if total > 3 else ["gain", "double", "packs"])
    if op == "gain":
        more = rng.randint(2, 20)
        new = total + more
        line = f"{name} has {total} + {more} = <<{total}+{more}={new}>>{new} {item} after finding more."
        return f"{name} finds {more} more {item}.", [line], new
    if op == "lose":
        given = rng.randint(2, total - 1)
        new = total - given
        line = f"After giving some away, {name} has {total} - {given} = <<{total}-{given}={new}>>{new} {item}."
        return f"{name} gives {given} {item} to a friend.", [line], new
    if op == "double":
        new = total * 2
        line = f"Doubling gives {total} * 2 = <<{total}*2={new}>>{new} {item}."
        return f"Then {name} doubles the number of {item}.", [line], new
    packs, size = rng.randint(2, 5), rng.randint(2, 6)
    bought, new = packs * size, total + packs * size
    lines = [
        f"The packs hold {packs} * {size} = <<{packs}*{size}={bought}>>{bought} {item}.",
        f"{name} now has {total} + {bought} = <<{total}+{bought}={new}>>{new} {item}.",
    ]
    return f"{name} buys {packs} packs of {size} {item}.", lines, new


def arithmetic_row(rng: random.Random) -> Row:
    """A 1–3 step word problem; the answer is a gsm8k rationale ending in '#### N'."""
    name, item, total = rng.choice(NAMES), rng.choice(ITEMS), rng.randint(2, 30)
    sentences, lines = [f"{name} has {total} {item}."], []
    for _ in range(rng.randint(1, 3)):
        sentence, step_lines, total = arithmetic_step(rng, name, item, total)
        sentences.append(sentence)
        lines += step_lines
    sentences.append(f"How many {item} does {name} have now?")
    return {"question": " ".join(sentences), "answer": "\n".join([*lines, f"#### {total}"])}


# ---- generation ---------------------------------------------------------------------------------------

GENERATORS: dict[str, tuple[Callable[[random.Random], Row], str]] = {
    "synthetic/sentiment": (sentiment_row, "sentence"),
    "synthetic/entailment": (entailment_row, "sentence1"),
    "synthetic/arithmetic": (arithmetic_row, "question"),
}
EVAL_SHARE = 5  # one in EVAL_SHARE possible key texts belongs to the eval split


def split_of(key: str) -> str:
    """The split a key text belongs to, by a hash that is the same in every process."""
    return "eval" if zlib.crc32(key.encode()) % EVAL_SHARE == 0 else "train"


def generate(name: str, split: str, count: int) -> list[Row]:
    """The first `count` distinct rows of a synthetic task's 'train' or 'eval' split."""
    make_row, key = GENERATORS[name]
    rng = random.Random(f"{name}/{split}")
    rows: list[Row] = []
    seen: set[str] = set()
    for attempt in itertools.count():
        if len(rows) == count:
            return rows
        if attempt > 100 * count + 1000:
            raise DataError(f"{name} cannot produce {count} distinct {split} examples; ask for fewer")
        row = make_row(rng)
        identity = "\n".join(str(value) for value in row.values())
        if split_of(row[key]) == split and identity not in seen:
            seen.add(identity)
            rows.append(row)
