#!/usr/bin/env python
"""Generate the small, synthetic example data sets used by the README.

Everything here is composed from templates and word lists in this file with a
seeded ``random.Random`` -- no downloads, no third-party text. Re-running the
script reproduces the committed files byte for byte.

Files written next to this script:

* ``tickets.csv`` / ``tickets_eval.csv`` -- columns ``id,message,team``;
  ``team`` is one of ``billing``, ``shipping``, ``technical``.
* ``alpaca_small.json`` -- JSON array of ``{"instruction", "input", "output"}``.
* ``chat_sharegpt.jsonl`` -- one ``{"conversations": [{"from", "value"}, ...]}``
  per line; ``from`` is ``system``, ``human`` or ``gpt``.

Usage: ``python examples/data/make_data.py``
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent

# ---------------------------------------------------------------------------
# 1. Support tickets (3-class text classification)
# ---------------------------------------------------------------------------

TEAMS = ("billing", "shipping", "technical")

PRODUCTS = [
    "blender",
    "headphones",
    "desk lamp",
    "router",
    "smart speaker",
    "coffee maker",
    "backpack",
    "phone case",
    "keyboard",
    "monitor",
    "thermostat",
    "camera",
    "air purifier",
    "fitness tracker",
    "kettle",
    "webcam",
    "printer",
    "vacuum",
]
ORDER_WORDS = ["order", "purchase", "package", "account", "subscription", "plan"]
GREETINGS = [
    "",
    "",
    "",
    "Hi,",
    "Hello,",
    "Hi there,",
    "Good morning,",
    "Hey team,",
    "Hello support,",
    "Dear support team,",
]
SIGNOFFS = [
    "",
    "",
    "",
    "Thanks.",
    "Thank you!",
    "Please help.",
    "Any update would be great.",
    "Regards, a frustrated customer.",
    "Thanks in advance.",
    "Let me know, thanks.",
    "This is urgent.",
    "Appreciate it.",
]
# Phrases that carry no label information but share vocabulary across classes.
DISTRACTORS = [
    "I already contacted you last week about my {order}.",
    "My {order} number is {num}.",
    "I ordered the {product} on {day}.",
    "This is the second time this has happened with my {order}.",
    "I have been a customer for {years} years.",
    "Your website says to contact support.",
    "I tried the chat but nobody answered.",
    "The {product} itself looks fine.",
    "I need this sorted before {day}.",
    "Please check my {order} and get back to me.",
    "I was charged and the app said it was shipped, but something is wrong.",
    "I reset my password yesterday, not sure if that matters.",
    "My friend had the same problem with her {product}.",
    "The email I got was confusing.",
]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "the weekend"]

TEMPLATES = {
    "billing": [
        "I was charged twice for my {order} of the {product}.",
        "Why is there an extra {amount} on my statement?",
        "My card was billed {amount} but I cancelled the {order}.",
        "I want a refund for the {product}, it has been {n} days.",
        "The invoice for my {order} shows the wrong amount.",
        "Can you explain this {amount} fee on my {order}?",
        "My {order} renewed automatically and I was not expecting the payment.",
        "The discount code did not apply and I paid full price for the {product}.",
        "I still have not received the money back for the returned {product}.",
        "Please update the card on file, the old one expired.",
        "I see a pending payment of {amount} that I do not recognise.",
        "How do I get a copy of the receipt for my {product}?",
        "The price went up without notice, I was billed {amount} instead of the usual.",
        "The {product} arrived but I was charged for two of them.",
        "Your app says my payment failed but my bank shows it went through.",
        "I returned the {product} weeks ago, where is my credit?",
    ],
    "shipping": [
        "My {product} has not arrived and it has been {n} days.",
        "The tracking number for my {order} does not work.",
        "The {product} was delivered to the wrong address.",
        "The box was crushed and the {product} inside was damaged in transit.",
        "Can I change the delivery address for my {order}?",
        "Tracking says delivered but there is no {product} at my door.",
        "Why is my {order} stuck at the warehouse since {day}?",
        "I paid for express delivery but the {product} is still not here.",
        "Only half of my {order} arrived, the {product} is missing.",
        "The courier left the {product} outside in the rain.",
        "When will the {product} be shipped? It says processing for {n} days.",
        "I need to send the {product} back, how do I get a return label?",
        "The parcel with my {product} was returned to sender by mistake.",
        "Can you ship the {product} to a pickup point instead?",
        "The delivery driver never came even though I was home on {day}.",
        "My {order} shows it left the depot {n} days ago and nothing since.",
    ],
    "technical": [
        "My {product} will not turn on after the update.",
        "The app keeps crashing when I try to pair the {product}.",
        "I cannot log in to my account, it says the password is wrong.",
        "The {product} disconnects from wifi every few minutes.",
        "How do I reset the {product} to factory settings?",
        "The {product} makes a strange noise and then shuts off.",
        "The firmware update failed and now the {product} shows an error code {num}.",
        "Bluetooth pairing with the {product} does not work on my phone.",
        "The screen on the {product} flickers since {day}.",
        "The battery on my {product} drains in {n} hours.",
        "I get an error when I try to open the app on my {order}.",
        "The {product} is not recognised when I plug it into my laptop.",
        "The setup guide for the {product} skips a step and I am stuck.",
        "Two-factor codes never reach my phone so I cannot sign in.",
        "The {product} stopped syncing with the app after {n} days.",
        "The website shows a blank page when I open my {order} settings.",
    ],
}


def _fill(rng: random.Random, text: str) -> str:
    return text.format(
        product=rng.choice(PRODUCTS),
        order=rng.choice(ORDER_WORDS),
        amount=f"${rng.randint(3, 250)}.{rng.randint(0, 99):02d}",
        n=rng.randint(2, 21),
        num=rng.randint(10000, 99999),
        day=rng.choice(DAYS),
        years=rng.randint(1, 12),
    )


def make_ticket(rng: random.Random, team: str) -> str:
    parts = []
    greeting = rng.choice(GREETINGS)
    if greeting:
        parts.append(greeting)
    body = [_fill(rng, rng.choice(TEMPLATES[team]))]
    # 0-2 label-free distractor sentences, shared by all classes.
    for _ in range(rng.choice((0, 1, 1, 2))):
        body.insert(rng.randint(0, len(body)), _fill(rng, rng.choice(DISTRACTORS)))
    # Occasionally mention a secondary issue from another team (the main
    # complaint still decides the label, but the words overlap).
    if rng.random() < 0.15:
        other = rng.choice([t for t in TEAMS if t != team])
        side = _fill(rng, rng.choice(TEMPLATES[other]))
        side = side[0].lower() + side[1:]
        body.append(rng.choice(["Also, ", "Not the main issue, but ", "Minor thing: "]) + side)
    parts.extend(body)
    signoff = rng.choice(SIGNOFFS)
    if signoff:
        parts.append(signoff)
    text = " ".join(parts)
    if rng.random() < 0.15:
        text = text.lower()
    return text


def make_tickets(seed: int, n: int, label_noise: float, exclude: set[str]) -> list[dict]:
    rng = random.Random(seed)
    rows, seen = [], set(exclude)
    while len(rows) < n:
        team = TEAMS[len(rows) % len(TEAMS)]  # balanced before shuffling
        msg = make_ticket(rng, team)
        if msg in seen:
            continue
        seen.add(msg)
        label = team
        if rng.random() < label_noise:  # a few mis-routed tickets
            label = rng.choice([t for t in TEAMS if t != team])
        rows.append({"message": msg, "team": label})
    rng.shuffle(rows)
    return rows


def write_csv(path: Path, rows: list[dict], start_id: int) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["id", "message", "team"])
        for i, row in enumerate(rows):
            w.writerow([start_id + i, row["message"], row["team"]])


# ---------------------------------------------------------------------------
# 2./3. Tiny deterministic instruction tasks (for a small byte-level model)
# ---------------------------------------------------------------------------

WORDS = [
    "cat",
    "dog",
    "sun",
    "tree",
    "book",
    "lamp",
    "fish",
    "bird",
    "cake",
    "rain",
    "star",
    "moon",
    "boat",
    "milk",
    "door",
    "frog",
    "leaf",
    "rock",
    "ship",
    "wind",
    "apple",
    "house",
    "river",
    "green",
    "light",
    "stone",
    "cloud",
    "bread",
    "chair",
    "plant",
    "table",
    "water",
    "music",
    "horse",
    "tiger",
    "lemon",
    "grape",
    "train",
    "snow",
    "fire",
]


def task_reverse(rng):
    w = rng.choice(WORDS)
    return rng.choice(["Reverse the word.", "Write the word backwards."]), w, w[::-1]


def task_upper(rng):
    w = rng.choice(WORDS)
    return rng.choice(["Uppercase the word.", "Write the word in capital letters."]), w, w.upper()


def task_add(rng):
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    return rng.choice(["Add the two numbers.", "What is the sum?"]), f"{a} {b}", str(a + b)


def task_repeat(rng):
    w = rng.choice(WORDS)
    return rng.choice(["Repeat the word twice.", "Say the word two times."]), w, f"{w} {w}"


def task_first(rng):
    w = rng.choice(WORDS)
    return rng.choice(["Give the first letter.", "What letter does it start with?"]), w, w[0]


def task_length(rng):
    w = rng.choice(WORDS)
    return "Count the letters.", w, str(len(w))


TASKS = [task_reverse, task_upper, task_add, task_repeat, task_first, task_length]


def make_alpaca(seed: int, n: int) -> list[dict]:
    rng = random.Random(seed)
    out, seen = [], set()
    while len(out) < n:
        instr, inp, resp = TASKS[len(out) % len(TASKS)](rng)
        if rng.random() < 0.25:  # sometimes fold the input into the instruction
            instr, inp = f"{instr[:-1]}: {inp}", ""
        key = (instr, inp)
        if key in seen:
            continue
        seen.add(key)
        assert len(resp) <= 20
        out.append({"instruction": instr, "input": inp, "output": resp})
    rng.shuffle(out)
    return out


SYSTEM_PROMPTS = [
    "You are a helpful assistant. Answer briefly.",
    "You are a tiny word helper. Reply with the answer only.",
]


def make_sharegpt(seed: int, n: int) -> list[dict]:
    rng = random.Random(seed)
    convs, seen = [], set()
    while len(convs) < n:
        turns = []
        if rng.random() < 0.4:
            turns.append({"from": "system", "value": rng.choice(SYSTEM_PROMPTS)})
        for _ in range(rng.choice((1, 1, 2, 3))):
            instr, inp, resp = rng.choice(TASKS)(rng)
            turns.append({"from": "human", "value": f"{instr} {inp}"})
            turns.append({"from": "gpt", "value": resp})
        key = json.dumps(turns)
        if key in seen:
            continue
        seen.add(key)
        convs.append({"conversations": turns})
    return convs


def main() -> None:
    train = make_tickets(seed=1234, n=900, label_noise=0.04, exclude=set())
    evalr = make_tickets(seed=5678, n=150, label_noise=0.04, exclude={r["message"] for r in train})
    write_csv(HERE / "tickets.csv", train, start_id=1)
    write_csv(HERE / "tickets_eval.csv", evalr, start_id=len(train) + 1)

    with (HERE / "alpaca_small.json").open("w", encoding="utf-8") as f:
        json.dump(make_alpaca(seed=42, n=400), f, indent=1)
        f.write("\n")

    with (HERE / "chat_sharegpt.jsonl").open("w", encoding="utf-8") as f:
        for conv in make_sharegpt(seed=7, n=400):
            f.write(json.dumps(conv) + "\n")


if __name__ == "__main__":
    main()
