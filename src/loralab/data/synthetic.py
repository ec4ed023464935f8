"""Offline synthetic tasks, generated deterministically, in the schema of their hub counterparts.

`sentiment` rows look like glue/sst2, `entailment` like glue/rte, `arithmetic` like gsm8k, `squad` like squad
(extractive QA over a templated passage) and `summarization` like xsum (one-sentence summaries), so the same
converters, templates and metrics serve both. Each split draws from its own seeded `random.Random`, and a
fixed hash of an example's key text (its sentence, question, context and question, or document) assigns every
possible example to exactly one split: train and eval never share a key text, and a split's first N rows are
the same whatever N the caller asks for.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import string
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, partial

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


# ---- graded sentiment: the same polarity rule made harder by knobs (docs/data.md, "Graded sentiment") ---------

NEGATION_FRAMES = [
    "it is not true that {}",
    "nobody would say that {}",
    "I would not claim that {}",
    "it is false that {}",
]
CONCESSIONS = ["{c}, but {d}", "although {c}, {d}", "{d}, although {c}", "{d}, even though {c}", "{c}; still, {d}"]
REPORTERS = ["a friend said that", "my neighbour thought that", "the critics wrote that", "a colleague claimed that"]


@dataclass(frozen=True)
class SentimentLevel:
    """The knobs of one graded sentiment task; the label is always the writer's own verdict in the main sentence."""

    negations: int  # each clause stacks 0..negations negations (a negated verb, then "it is not true that" frames)
    contrast: float  # chance of a concession: a clause of the opposite sentiment, before or after the deciding one
    distractors: int  # 0..distractors extra sentences reporting someone else's opinion, which never counts
    noise: float  # share of labels flipped, chosen by a hash of the passage (so the same passage keeps its label)
    lexicon: int = 0  # 0: common English adjectives; n: n made-up adjectives whose polarity only the data teaches
    adjectives: int = 1  # adjectives of one polarity in the deciding clause ("was duze and kapi")


SENTIMENT_LEVELS = {
    1: SentimentLevel(negations=2, contrast=0.5, distractors=1, noise=0.0),
    2: SentimentLevel(negations=2, contrast=0.5, distractors=1, noise=0.12),  # level 1's passages, 12 % flipped
    3: SentimentLevel(negations=3, contrast=0.7, distractors=2, noise=0.1),
}
# the other axis: no structure to learn, but 1,000 made-up polarity words, three of them in each deciding clause
SENTIMENT_WORDS = SentimentLevel(negations=0, contrast=0.0, distractors=1, noise=0.0, lexicon=1000, adjectives=3)
GRADED_SENTIMENT = {  # task name → knobs
    **{f"synthetic/sentiment-{n}": level for n, level in SENTIMENT_LEVELS.items()},
    "synthetic/sentiment-words": SENTIMENT_WORDS,
}


@cache
def made_up_adjectives(size: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """`size` pronounceable non-words (two or three consonant-vowel syllables), half positive and half negative,
    the same in every process: a model cannot know their polarity from pretraining, so it learns it word by
    word from the training split, and held-out accuracy grows smoothly with how many words it has learned."""
    rng, words = random.Random(f"made-up adjectives {size}"), {}  # a dict keeps the order
    while len(words) < size:
        word = "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(rng.randint(2, 3)))
        words[word] = None
    ordered = tuple(words)  # a tuple: the cached value is shared by every caller
    return ordered[: size // 2], ordered[size // 2 :]


def negated_clause(rng: random.Random, label: int, depth: int, lexicon: int = 0, adjectives: int = 1) -> str:
    """A clause whose sentiment is `label` under `depth` stacked negations: the adjectives' polarity is
    `label` flipped once per negation, the first negation on the verb and the rest as framing phrases."""
    subject, polarity = rng.choice(SUBJECTS), label ^ (depth % 2)
    positive, negative = made_up_adjectives(lexicon) if lexicon else (POSITIVE, NEGATIVE)
    pool = positive if polarity else negative
    if adjectives == 1:
        adjective = rng.choice(pool)  # one draw, as before the knob existed: levels 1-3 keep their passages
    else:
        *first, last = rng.sample(pool, adjectives)
        adjective = f"{', '.join(first)} and {last}"
    verb = rng.choice(NEGATED_VERBS if depth else VERBS)
    clause = f"{subject} {verb} {rng.choice(INTENSIFIERS)}{adjective}"
    for _ in range(depth - 1):
        clause = rng.choice(NEGATION_FRAMES).format(clause)
    return clause


def graded_sentiment_row(rng: random.Random, level: SentimentLevel) -> Row:
    """Distractor sentences around one main sentence whose deciding clause (maybe conceded against) sets the label."""
    label = rng.randrange(2)
    main = negated_clause(rng, label, rng.randint(0, level.negations), level.lexicon, level.adjectives)
    if rng.random() < level.contrast:
        conceded = negated_clause(rng, 1 - label, rng.randint(0, level.negations), level.lexicon)
        main = rng.choice(CONCESSIONS).format(c=conceded, d=main)
    sentences = [main]
    for _ in range(rng.randint(0, level.distractors)):
        reported = negated_clause(rng, rng.randrange(2), rng.randint(0, 1), level.lexicon)
        sentences.insert(rng.randint(0, len(sentences)), f"{rng.choice(REPORTERS)} {reported}")
    passage = " ".join(sentence[0].upper() + sentence[1:] + "." for sentence in sentences)
    return {"sentence": passage, "label": label ^ flipped(passage, level.noise)}


def flipped(text: str, rate: float) -> int:
    """1 for a `rate` share of texts, by a hash that is the same in every process (independent of the split's rng)."""
    return int(int(digest("noise\n" + text)[:8], 16) < rate * 16**8)


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


# ---- one-step arithmetic: a single addition or subtraction, small enough for a tiny model trained from scratch ----

# (sentence stating the start, sentence adding, sentence removing, question); {a} starts, {b} changes it
PHRASINGS = {
    "has": (
        "{name} has {a} {item}.",
        "{name} finds {b} more.",
        "{name} gives {b} away.",
        "How many now?",
    ),
    "box": (
        "A box holds {a} {item}.",
        "{name} puts in {b} more.",
        "{name} takes out {b}.",
        "How many are in the box?",
    ),
}


@dataclass(frozen=True)
class OneStepArithmetic:
    """GSM8K-format problems of one addition or subtraction of two numbers in [low, high] under a phrasing.

    The answer is one rationale line and the '#### N' line; a subtraction never goes below zero.
    """

    low: int
    high: int
    phrasing: str

    def __call__(self, rng: random.Random) -> Row:
        """One problem: 'start', 'add' or 'remove' sentence, question; answer 'a + b = c' or 'a - b = c'."""
        start, add, remove, question = PHRASINGS[self.phrasing]
        name, item = rng.choice(NAMES), rng.choice(ITEMS)
        a, b = rng.randint(self.low, self.high), rng.randint(self.low, self.high)
        subtract = rng.random() < 0.5
        if subtract and b > a:
            a, b = b, a
        change, sign, result = (remove, "-", a - b) if subtract else (add, "+", a + b)
        text = " ".join(s.format(name=name, item=item, a=a, b=b) for s in (start, change, question))
        return {"question": text, "answer": f"{a} {sign} {b} = {result}\n#### {result}"}


# ---- squad: a passage about two people, a question about one fact, the answer a span of the passage ----

HOMES = ["{name} lives in {city}.", "These days {name} lives in {city}.", "{name} has lived in {city} for years."]
PURCHASES = [
    "{name} bought {count} {color} {thing} at a market.",
    "On Monday, {name} bought {count} {color} {thing}.",
    "Last week {name} bought {count} {color} {thing} for a friend.",
]
# (question, first slot of the answer span, last slot of it); 'home' questions need the person's home sentence
PURCHASE_QUESTIONS = [
    ("Who bought the {color} {thing}?", "name", "name"),
    ("How many {thing} did {name} buy?", "count", "count"),
    ("What colour were the {thing} that {name} bought?", "color", "color"),
    ("What did {name} buy?", "count", "thing"),
]
HOME_QUESTIONS = [("Where does {name} live?", "city", "city"), ("Who lives in {city}?", "name", "name")]
HOME_RATE = 0.6


def render(template: str, fact: dict[str, str]) -> tuple[str, dict[str, int]]:
    """The template filled with the fact, and the offset in it where each slot's value starts."""
    text, starts = "", {}
    for literal, slot, _, _ in string.Formatter().parse(template):
        text += literal
        if slot is not None:
            starts.setdefault(slot, len(text))
            text += fact[slot]
    return text, starts


def squad_row(rng: random.Random) -> Row:
    """A SQuAD v1.1 row: 2–4 sentences (a purchase each, maybe a home each) about two people, one question.

    The people differ in name, city and thing, so every question has exactly one answer in the passage.
    """
    names, cities, things = rng.sample(NAMES, 2), rng.sample(CITIES, 2), rng.sample(THINGS, 2)
    people = [
        {"name": n, "city": c, "thing": t, "count": rng.choice(COUNTS), "color": rng.choice(COLORS)}
        for n, c, t in zip(names, cities, things, strict=True)
    ]
    sentences = [(person, rng.choice(PURCHASES), PURCHASE_QUESTIONS) for person in people]
    sentences += [(person, rng.choice(HOMES), HOME_QUESTIONS) for person in people if rng.random() < HOME_RATE]
    rng.shuffle(sentences)
    rendered = [render(template, person) for person, template, _ in sentences]
    target = rng.randrange(len(sentences))
    person, _, questions = sentences[target]
    question, first, last = rng.choice(questions)
    offset = sum(len(text) + 1 for text, _ in rendered[:target])  # the sentences are joined by single spaces
    context, starts = " ".join(text for text, _ in rendered), rendered[target][1]
    answer_start = offset + starts[first]
    answer = context[answer_start : offset + starts[last] + len(person[last])]
    question = question.format(**person)
    key = context + "\n" + question
    return {
        "id": digest(key)[:24],
        "title": sentences[0][0]["name"],
        "context": context,
        "question": question,
        "answers": {"text": [answer], "answer_start": [answer_start]},
    }


# ---- summarization: an event story with distractor details, summarised in one sentence ------------------

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
CONTESTS = ["chess tournament", "marathon", "baking contest", "spelling bee", "cycling race", "piano competition"]
SHOPS = ["bakery", "bookshop", "cafe", "flower shop", "bike shop", "toy shop"]
# (summary, sentences that state the event, distractor details: other people, places and numbers)
STORIES = [
    (
        "{name} won the {contest} in {city}.",
        [
            "{name} took first place at the {contest} in {city} on {day}.",
            "The {contest} in {city} ended on {day} with a victory for {name}.",
            "On {day}, {name} beat {count} other finalists to win the {contest} in {city}.",
        ],
        [
            "{other} finished second after a close final round.",
            "{other} from {other_city} had won the {contest} the year before.",
            "The organisers said next year's {contest} will be held in {other_city}.",
            "About {count} hundred people came to watch.",
            "The winner was given {count} {color} {thing} by the sponsors.",
        ],
    ),
    (
        "{name} opened a new {shop} in {city}.",
        [
            "{name} opened a new {shop} in {city} on {day}.",
            "On {day}, a new {shop} run by {name} opened its doors in {city}.",
            "After years of planning, {name} opened a {shop} in {city} on {day}.",
        ],
        [
            "{other} already runs a {shop} in {other_city}.",
            "{other} from {other_city} helped to paint the walls.",
            "On the first day, {count} {color} {thing} were sold.",
            "About {count} hundred people visited in the first week.",
            "The building was empty for {count} years before.",
        ],
    ),
    (
        "{name} moved from {other_city} to {city}.",
        [
            "{name} moved from {other_city} to {city} on {day}.",
            "On {day}, {name} left {other_city} for a new home in {city}.",
            "After {count} years in {other_city}, {name} moved to {city} on {day}.",
        ],
        [
            "{other} helped to carry {count} boxes of {thing}.",
            "{other} still lives in {other_city}.",
            "The trip from {other_city} took {count} hours.",
            "The new flat has {count} {color} walls.",
            "{other} plans to visit {city} in the summer.",
        ],
    ),
]


def summarization_row(rng: random.Random) -> Row:
    """An XSum row: 3–5 sentences, the event's among distractors, and a one-sentence summary of the event."""
    (name, other), (city, other_city) = rng.sample(NAMES, 2), rng.sample(CITIES, 2)
    fact = {"name": name, "other": other, "city": city, "other_city": other_city}
    for slot, values in [("day", DAYS), ("count", COUNTS), ("color", COLORS), ("thing", THINGS)]:
        fact[slot] = rng.choice(values)
    fact |= {"contest": rng.choice(CONTESTS), "shop": rng.choice(SHOPS)}
    summary, events, details = rng.choice(STORIES)
    sentences = rng.sample(details, rng.randint(2, 4))
    sentences.insert(rng.randint(0, len(sentences)), rng.choice(events))
    document = " ".join(sentence.format(**fact) for sentence in sentences)
    return {"id": str(int(digest(document)[:12], 16)), "document": document, "summary": summary.format(**fact)}


def digest(text: str) -> str:
    """A hex digest of a key text: the same in every process, so a row's id follows from its content."""
    return hashlib.sha1(text.encode()).hexdigest()


# ---- generation ---------------------------------------------------------------------------------------


def text_row(rng: random.Random) -> Row:
    """Unlabelled text for continued pre-training: a sentence, a premise, a passage or a document of the tasks above."""
    kind = rng.randrange(4)
    if kind == 0:
        return {"text": sentiment_row(rng)["sentence"]}
    if kind == 1:
        return {"text": entailment_row(rng)["sentence1"]}
    if kind == 2:
        return {"text": squad_row(rng)["context"]}
    return {"text": summarization_row(rng)["document"]}


GENERATORS: dict[str, tuple[Callable[[random.Random], Row], tuple[str, ...]]] = {  # (row maker, key columns)
    "synthetic/sentiment": (sentiment_row, ("sentence",)),
    **{name: (partial(graded_sentiment_row, level=level), ("sentence",)) for name, level in GRADED_SENTIMENT.items()},
    "synthetic/entailment": (entailment_row, ("sentence1",)),
    "synthetic/arithmetic": (arithmetic_row, ("question",)),
    "synthetic/arithmetic_simple": (OneStepArithmetic(low=1, high=20, phrasing="has"), ("question",)),
    "synthetic/arithmetic_shifted": (OneStepArithmetic(low=5, high=25, phrasing="box"), ("question",)),
    "synthetic/squad": (squad_row, ("context", "question")),
    "synthetic/summarization": (summarization_row, ("document",)),
    "text/synthetic": (text_row, ("text",)),
}
DEFAULT_SIZES: dict[str, tuple[int, int]] = {  # (train, eval) rows generated when task.*_samples is null
    "synthetic/sentiment": (2000, 500),
    **dict.fromkeys(GRADED_SENTIMENT, (2000, 500)),
    "synthetic/entailment": (2000, 500),
    "synthetic/arithmetic": (2000, 200),
    "synthetic/arithmetic_simple": (4000, 200),
    "synthetic/arithmetic_shifted": (2000, 200),
    "synthetic/squad": (2000, 200),
    "synthetic/summarization": (2000, 200),
    "text/synthetic": (4000, 200),
}
EVAL_SHARE = 5  # one in EVAL_SHARE possible key texts belongs to the eval split


def key_text(row: Row, columns: tuple[str, ...]) -> str:
    """The text that decides a row's split: its key columns, one a line."""
    return "\n".join(row[column] for column in columns)


def split_of(key: str) -> str:
    """The split a key text belongs to, by a hash that is the same in every process."""
    return "eval" if zlib.crc32(key.encode()) % EVAL_SHARE == 0 else "train"


def generate(name: str, split: str, count: int) -> list[Row]:
    """The first `count` distinct rows of a synthetic task's 'train' or 'eval' split."""
    make_row, columns = GENERATORS[name]
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
        if split_of(key_text(row, columns)) == split and identity not in seen:
            seen.add(identity)
            rows.append(row)
