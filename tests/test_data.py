"""Tasks: the registry, synthetic generators, local files in the hub's schema, and the errors users see."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys

import pytest
from datasets import Dataset

from conftest import task
from loralab.data import get_task, load_task, task_names
from loralab.data.synthetic import CITIES, NAMES, NEGATIVE, POSITIVE, THINGS, generate
from loralab.data.tasks import holdout_size
from loralab.data.templates import alpaca_prompt
from loralab.errors import DataError
from loralab.evaluation.metrics import compute_metrics, extract_answer

SYNTHETIC = [
    "synthetic/sentiment",
    "synthetic/entailment",
    "synthetic/arithmetic",
    "synthetic/squad",
    "synthetic/summarization",
    "synthetic/sentiment-1",
    "synthetic/sentiment-2",
    "synthetic/sentiment-3",
    "synthetic/sentiment-words",
    "synthetic/arithmetic_simple",
    "synthetic/arithmetic_shifted",
    "text/synthetic",
]
KEY = {  # the columns whose text decides a row's split
    "synthetic/sentiment": ("sentence",),
    "synthetic/entailment": ("sentence1",),
    "synthetic/arithmetic": ("question",),
    "synthetic/squad": ("context", "question"),
    "synthetic/summarization": ("document",),
    **{f"synthetic/sentiment-{n}": ("sentence",) for n in (1, 2, 3, "words")},
    "synthetic/arithmetic_simple": ("question",),
    "synthetic/arithmetic_shifted": ("question",),
    "text/synthetic": ("text",),
}
QUESTION_TYPES = ("Who ", "Where ", "How many ", "What colour ", "What did ")


def write_jsonl(path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


# ---- registry -------------------------------------------------------------------------------------


def test_registry_has_every_task_and_aliases():
    expected = {
        "glue/sst2", "glue/rte", "glue/mrpc", "glue/qnli", "glue/cola", "glue/stsb", "super_glue/boolq", "gsm8k",
        "tatsu-lab/alpaca", "databricks/databricks-dolly-15k", "squad", "squad_v2", "xsum", "text/wikitext",
        "glue/qnli_instruct", "super_glue/boolq_instruct",
        *SYNTHETIC,
    }  # fmt: skip
    assert set(task_names()) == expected
    assert get_task("databricks-dolly-15k").name == "databricks/databricks-dolly-15k"
    assert task("gsm8k").hub == "openai/gsm8k" and task("gsm8k").subset == "main"
    assert task("gsm8k").splits.eval == "test" and task("xsum").hub == "EdinburghNLP/xsum"
    assert task("openai/gsm8k").name == "gsm8k" and task("boolq").name == "super_glue/boolq"
    assert get_task("glue/rte").label_names == ("entailment", "not_entailment")
    assert get_task("glue/stsb").format == "regression" and get_task("gsm8k").answer == "gsm8k"


def test_unknown_task_suggests_the_closest_name():
    with pytest.raises(DataError, match=r"unknown task 'glue/sst3' \(did you mean 'glue/sst2'\?\)"):
        get_task("glue/sst3")


# ---- synthetic tasks ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SYNTHETIC)
def test_synthetic_splits_are_deterministic_prefix_stable_and_disjoint(name):
    train, evaluation = generate(name, "train", 1000), generate(name, "eval", 300)
    assert generate(name, "train", 1000) == train
    assert generate(name, "train", 100) == train[:100]
    assert train != evaluation[: len(train)]
    keys = [[tuple(row[c] for c in KEY[name]) for row in split] for split in (train, evaluation)]
    assert not set(keys[0]) & set(keys[1])
    texts = [set(json.dumps(row, sort_keys=True) for row in split) for split in (train, evaluation)]
    assert len(texts[0]) == 1000 and len(texts[1]) == 300 and not texts[0] & texts[1]


def test_synthetic_data_is_identical_in_another_process():
    code = (
        "import hashlib, json; from loralab.data.synthetic import generate; "
        f"print(hashlib.sha256(json.dumps([generate(n, s, 50) for n in {SYNTHETIC!r} for s in ('train', 'eval')])"
        ".encode()).hexdigest())"
    )
    runs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        ).stdout
        for seed in ("1", "2")
    }
    here = json.dumps([generate(n, s, 50) for n in SYNTHETIC for s in ("train", "eval")])
    assert runs == {hashlib.sha256(here.encode()).hexdigest() + "\n"}


def test_load_task_gives_default_sizes_and_first_n_examples():
    sizes = {name: (len(d.train), len(d.eval)) for name in SYNTHETIC for d in [load_task(task(name))]}
    assert sizes == {
        "synthetic/sentiment": (2000, 500),
        "synthetic/entailment": (2000, 500),
        "synthetic/arithmetic": (2000, 200),
        "synthetic/squad": (2000, 200),
        "synthetic/summarization": (2000, 200),
        **{f"synthetic/sentiment-{n}": (2000, 500) for n in (1, 2, 3, "words")},
        "synthetic/arithmetic_simple": (4000, 200),
        "synthetic/arithmetic_shifted": (2000, 200),
        "text/synthetic": (4000, 200),
    }
    small = load_task(task("synthetic/sentiment", train=40, evaluation=7))
    full = load_task(task("synthetic/sentiment"))
    assert (len(small.train), len(small.eval)) == (40, 7)
    assert small.train == full.train[:40] and small.eval == full.eval[:7]


@pytest.mark.parametrize("name", ["synthetic/sentiment", "synthetic/entailment"])
def test_synthetic_labels_are_balanced(name):
    data = load_task(task(name))
    for split in (data.train, data.eval):
        assert 0.45 < sum(e.label for e in split) / len(split) < 0.55
    first = data.train[0]
    assert first.reference == data.spec.label_names[first.label]


def adjective_polarity(sentence: str) -> int:
    """The bag-of-adjectives baseline: more positive than negative adjectives → positive (ties → positive)."""
    words = re.findall(r"[a-z]+", sentence)
    return int(sum(w in POSITIVE for w in words) >= sum(w in NEGATIVE for w in words))


def compositional_label(sentence: str) -> int:
    """The rule the generator follows: the clause after 'but' decides; a negation flips its adjective."""
    clause = re.findall(r"[a-z]+", sentence.split(", but ")[-1])
    polarity = int(any(w in POSITIVE for w in clause))
    return polarity ^ any(w in ("not", "never", "hardly") for w in clause)


def test_sentiment_needs_negation_and_contrast():
    examples = load_task(task("synthetic/sentiment")).train
    negated = [e for e in examples if re.search(r"\b(not|never|hardly)\b", e.text)]
    contrast = [e for e in examples if ", but " in e.text]
    assert len(negated) / len(examples) > 0.3 and len(contrast) / len(examples) > 0.3
    assert all(compositional_label(e.text) == e.label for e in examples)
    baseline = sum(adjective_polarity(e.text) == e.label for e in examples) / len(examples)
    assert baseline < 0.7
    flipped = [e for e in examples if ", but " not in e.text and re.search(r"\b(not|never|hardly)\b", e.text)]
    assert flipped and all(adjective_polarity(e.text) != e.label for e in flipped)


def test_entailment_negation_words_do_not_give_the_label_away():
    examples = load_task(task("synthetic/entailment")).train
    negated = [e for e in examples if re.search(r"\b(not|never)\b", e.text_pair)]
    assert len(negated) > 200 and 0.3 < sum(e.label for e in negated) / len(negated) < 0.7
    assert all(e.text.endswith(".") and e.text_pair.endswith(".") for e in examples)


def test_arithmetic_answers_are_gsm8k_format_and_correct():
    data = load_task(task("synthetic/arithmetic"))
    steps = set()
    for example in data.train + data.eval:
        assert example.text.startswith("Question: ") and example.text.endswith("\nAnswer:")
        assert example.target.startswith(" ") and re.search(r"\n#### -?\d+$", example.target)
        annotations = re.findall(r"<<([^=>]+)=([^>]+)>>", example.target)
        assert annotations
        for expression, value in annotations:
            assert re.fullmatch(r"[\d+\-*]+", expression) and eval(expression) == int(value)
        final = int(example.target.rsplit("#### ", 1)[1])
        assert final == int(annotations[-1][1]) and example.reference == str(final) and final > 0
        steps.add(example.text.count(".") - 1)
    assert steps == {1, 2, 3}


def words_of(text: str, vocabulary: list[str]) -> set[str]:
    return {word for word in vocabulary if re.search(rf"\b{word}\b", text)}


def test_synthetic_squad_rows_are_squad_with_answers_at_answer_start():
    rows = generate("synthetic/squad", "train", 300) + generate("synthetic/squad", "eval", 100)
    first_sentence = 0
    for row in rows:
        assert set(row) == {"id", "title", "context", "question", "answers"}
        assert set(row["answers"]) == {"text", "answer_start"} and len(row["answers"]["text"]) == 1
        (answer,), (start,) = row["answers"]["text"], row["answers"]["answer_start"]
        assert row["context"][start : start + len(answer)] == answer and 1 <= len(answer.split()) <= 3
        assert row["question"].startswith(QUESTION_TYPES) and row["question"].endswith("?")
        assert re.fullmatch(r"[0-9a-f]{24}", row["id"]) and row["title"] in row["context"]
        assert 2 <= row["context"].count(".") <= 4
        # two people, places or things to choose from: the answer cannot be read off the question alone
        assert len(words_of(row["context"], NAMES)) == 2 and len(words_of(row["context"], THINGS)) == 2
        first_sentence += start < row["context"].index(".")
    assert len({row["id"] for row in rows}) == len(rows)
    assert 0.15 < first_sentence / len(rows) < 0.6
    questions = [row["question"] for row in generate("synthetic/squad", "train", 200)]
    assert len({kind for q in questions for kind in QUESTION_TYPES if q.startswith(kind)}) >= 4


def test_synthetic_summaries_are_one_short_sentence_about_the_documents_event():
    rows = generate("synthetic/summarization", "train", 300) + generate("synthetic/summarization", "eval", 100)
    second_person = 0
    for row in rows:
        assert set(row) == {"id", "document", "summary"} and row["id"].isdigit()
        summary, document = row["summary"], row["document"]
        assert len(summary.split()) <= 12 and summary.endswith(".") and summary.count(".") == 1
        assert 3 <= document.count(".") <= 5 and summary not in document
        # the summary's person and city are those of the document's event sentence, not a distractor's
        (person,), cities = words_of(summary, NAMES), words_of(summary, CITIES)
        assert person in document and cities and cities <= words_of(document, CITIES)
        second_person += len(words_of(document, NAMES)) == 2
    assert second_person / len(rows) > 0.75
    assert {verb for row in rows for verb in ("won", "opened", "moved") if f" {verb} " in row["summary"]} == {
        "won",
        "opened",
        "moved",
    }


def test_synthetic_squad_and_summarization_load_through_their_hub_converters():
    squad = load_task(task("synthetic/squad", train=20, evaluation=5))
    assert squad.spec.metrics == ("squad_em", "squad_f1") and squad.spec.answer == "squad"
    for example, row in zip(squad.train, generate("synthetic/squad", "train", 20), strict=True):
        answer = row["answers"]["text"][0]
        assert example.id == row["id"] and example.reference == [answer] and example.target == " " + answer
        assert example.text == f"Context: {row['context']}\nQuestion: {row['question']}\nAnswer:"
    golds = [extract_answer("squad", e.target) for e in squad.eval]
    assert compute_metrics(squad.spec.metrics, golds, [e.reference for e in squad.eval]) == {
        "squad_em": 1.0,
        "squad_f1": 1.0,
    }
    xsum = load_task(task("synthetic/summarization", train=20, evaluation=5))
    assert xsum.spec.metrics[:4] == ("rouge1", "rouge2", "rougeL", "rougeLsum") and xsum.spec.answer == "text"
    for example, row in zip(xsum.eval, generate("synthetic/summarization", "eval", 5), strict=True):
        assert example.id == row["id"] and example.text == f"Document: {row['document']}\nSummary:"
        assert example.target == " " + row["summary"] and example.reference == row["summary"]


# ---- local files in the hub's schema --------------------------------------------------------------


def test_sst2_from_a_jsonl_directory(tmp_path):
    rows = [{"sentence": f"sentence {i}", "label": i % 2, "idx": i} for i in range(12)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "validation.jsonl", rows[:5])
    data = load_task(task("glue/sst2", tmp_path, train=10))
    assert (len(data.train), len(data.eval)) == (10, 5)
    assert data.train[3].id == "3" and data.train[3].text == "sentence 3" and data.train[3].label == 1
    assert data.train[3].reference == "positive" and data.train[3].text_pair is None


def test_rte_from_a_csv_directory(tmp_path):
    header = "idx,sentence1,sentence2,label\n"
    (tmp_path / "train.csv").write_text(header + "0,A cat sat.,An animal sat.,0\n1,A cat sat.,A dog sat.,1\n")
    (tmp_path / "validation.csv").write_text(header + "7,Rain fell.,It was dry.,1\n")
    data = load_task(task("glue/rte", tmp_path))
    assert [(e.text, e.text_pair, e.label, e.reference) for e in data.train] == [
        ("A cat sat.", "An animal sat.", 0, "entailment"),
        ("A cat sat.", "A dog sat.", 1, "not_entailment"),
    ]
    assert data.eval[0].id == "7"


def test_gsm8k_from_parquet(tmp_path):
    answer = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nShe sold 48+24 = <<48+24=72>>72 clips.\n#### 72"
    rows = [{"question": "How many clips did Natalia sell?", "answer": answer}]
    Dataset.from_list(rows * 3).to_parquet(str(tmp_path / "train.parquet"))
    Dataset.from_list(
        [{"question": "Big?", "answer": "It is 1000+234 = <<1000+234=1234>>1234.\n#### 1,234"}]
    ).to_parquet(str(tmp_path / "test.parquet"))
    data = load_task(task("gsm8k", tmp_path))
    assert len(data.train) == 3 and data.train[0].text == "Question: How many clips did Natalia sell?\nAnswer:"
    assert data.train[0].target == " " + answer and data.train[0].reference == "72"
    assert data.eval[0].reference == "1234"


def test_squad_and_squad_v2_from_json_with_nested_answers(tmp_path):
    rows = [
        {
            "id": "q1",
            "title": "Paris",
            "context": "Paris is the capital of France.",
            "question": "What is the capital of France?",
            "answers": {"text": ["Paris", "Paris "], "answer_start": [0, 0]},
        },
        {
            "id": "q2",
            "title": "Paris",
            "context": "Paris is the capital of France.",
            "question": "What is the capital of Mars?",
            "answers": {"text": [], "answer_start": []},
        },
    ]
    write_jsonl(tmp_path / "train.json", rows)
    write_jsonl(tmp_path / "validation.json", rows)
    data = load_task(task("squad_v2", tmp_path))
    answerable, unanswerable = data.eval
    assert answerable.id == "q1" and answerable.reference == ["Paris", "Paris "] and answerable.target == " Paris"
    assert (
        answerable.text == "Context: Paris is the capital of France.\nQuestion: What is the capital of France?\nAnswer:"
    )
    assert unanswerable.reference == [""] and unanswerable.target == " unanswerable"
    assert load_task(task("squad", tmp_path, train=1)).train[0].reference == ["Paris", "Paris "]


def test_train_only_file_holds_out_its_last_rows(tmp_path):
    rows = [
        {"instruction": f"Say {i}.", "context": "" if i % 2 else "ctx", "response": str(i), "category": "qa"}
        for i in range(30)
    ]
    write_jsonl(tmp_path / "dolly.jsonl", rows)
    data = load_task(task("databricks-dolly-15k", tmp_path / "dolly.jsonl"))
    assert holdout_size(30) == 3 and (len(data.train), len(data.eval)) == (27, 3)
    assert [e.reference for e in data.eval] == ["27", "28", "29"]
    assert data.train[0].text == alpaca_prompt("Say 0.", "ctx") and "### Input:\nctx" in data.train[0].text
    assert "### Input" not in data.train[1].text and data.train[1].target == "1"


def test_alpaca_directory_without_eval_file_holds_out(tmp_path):
    rows = [{"instruction": "Add.", "input": f"{i}+1", "output": str(i + 1), "text": ""} for i in range(20)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    data = load_task(task("tatsu-lab/alpaca", tmp_path, evaluation=1))
    assert (len(data.train), len(data.eval)) == (18, 1) and data.eval[0].reference == "19"


# ---- errors -----------------------------------------------------------------------------------------


def test_missing_path_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match=r"task\.path not found: .*nowhere"):
        load_task(task("glue/sst2", tmp_path / "nowhere"))


def test_missing_split_file_names_the_split(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"sentence": "a", "label": 0}])
    with pytest.raises(
        DataError, match=r"no validation\.\{json,jsonl,csv,tsv,parquet\} file .* in .*task.splits.eval=null"
    ):
        load_task(task("glue/sst2", tmp_path))


def test_missing_column_names_the_file_and_the_column(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": 0}])
    write_jsonl(tmp_path / "validation.jsonl", [{"text": "a", "label": 0}])
    with pytest.raises(
        DataError,
        match=r"train\.jsonl: missing column 'sentence' \(task.columns.text, format classification\); "
        r"the data has: text, label$",
    ):
        load_task(task("glue/sst2", tmp_path))


def test_unsupported_file_type(tmp_path):
    (tmp_path / "data.txt").write_text("hello\n")
    with pytest.raises(DataError, match=r"unsupported file type '\.txt'"):
        load_task(task("glue/sst2", tmp_path / "data.txt"))


def test_hub_failure_tells_the_user_to_pass_a_path(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"cannot load glue/sst2 from the hub \(Couldn't reach .*\); pass task.path="):
        load_task(task("glue/sst2"))


def test_offline_hub_fails_fast_with_a_data_error():
    code = (
        "from loralab.config.load import load_task_config; from loralab.data.sources import hub_splits\n"
        "from loralab.errors import DataError\n"
        "cfg = load_task_config(name='glue/sst2', hub='loralab-tests/does-not-exist')\n"
        "try:\n    hub_splits(cfg)\nexcept DataError as error:\n    print(error)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.stdout.startswith("cannot load glue/sst2 from the hub (") and "task.path=" in done.stdout


def test_text_tasks_are_unlabelled_text_from_the_generators_or_wikitext_files(tmp_path):
    spec = task("text/wikitext")
    assert (spec.format, spec.hub, spec.subset, spec.splits.eval) == (
        "text",
        "Salesforce/wikitext",
        "wikitext-2-raw-v1",
        "validation",
    )
    rows = [{"text": " = Valkyria Chronicles = \n"}, {"text": ""}, {"text": " The game began development in 2010 .\n"}]
    for split in ("train", "validation"):
        write_jsonl(tmp_path / f"{split}.jsonl", rows)
    data = load_task(task("text/wikitext", tmp_path))
    assert [e.text for e in data.train] == [r["text"] for r in rows] and data.train[0].target is None
    synthetic = load_task(task("text/synthetic", train=200, evaluation=10)).train
    sources = {"sentence": 0, "passage": 0}
    for example in synthetic:
        assert example.text and example.label is None and example.target is None
        sources["passage" if example.text.count(".") > 1 else "sentence"] += 1
    assert min(sources.values()) > 20  # single sentences and multi-sentence passages both occur
