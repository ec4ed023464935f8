"""Tasks of one's own: the README's three examples, label inference, file kinds, chat evaluation, causal text."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from loralab.config import load_config
from loralab.config.load import load_task_config
from loralab.config.tasks import builtin_task_names
from loralab.data import load_task, task_spec
from loralab.data.chat import chat_prompt, resolve_chat_template
from loralab.data.collate import collate
from loralab.data.encode import encode_examples
from loralab.errors import DataError
from loralab.evaluation.evaluate import evaluate
from loralab.models.presets import build_tiny, tiny_tokenizer

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def own(path, fmt: str, **keys):
    return load_task_config(name="my/data", format=fmt, path=str(path), **keys)


def test_the_three_readme_examples_load_as_documented():
    tickets = load_task(load_config([str(EXAMPLES / "configs/tickets.yaml")]).task)
    assert tickets.spec.label_names == ("billing", "shipping", "technical")  # inferred, sorted
    assert (len(tickets.train), len(tickets.eval)) == (900, 150) and tickets.spec.metrics == ("accuracy", "macro_f1")
    assert {e.reference for e in tickets.eval} == set(tickets.spec.label_names)
    alpaca = load_task(load_config([str(EXAMPLES / "configs/alpaca.yaml")]).task)
    rows = json.loads((EXAMPLES / "data/alpaca_small.json").read_text())
    assert (len(alpaca.train), len(alpaca.eval)) == (360, 40)  # one file: its last 10 % held out
    assert alpaca.train[0].target == rows[0]["output"] and rows[0]["instruction"] in alpaca.train[0].text
    chat = load_task(load_config([str(EXAMPLES / "configs/chat.yaml")]).task)
    first = json.loads((EXAMPLES / "data/chat_sharegpt.jsonl").read_text().splitlines()[0])["conversations"]
    roles = {"system": "system", "human": "user", "gpt": "assistant"}
    assert list(chat.train[0].messages) == [{"role": roles[t["from"]], "content": t["value"]} for t in first]
    assert chat.train[0].reference == first[-1]["value"]


def test_every_builtin_task_resolves_through_its_packaged_definition():
    for name in builtin_task_names():
        spec = task_spec(load_task_config(name=name))
        assert spec.name == name and spec.format in ("classification", "regression", "sft", "text")
        assert spec.metrics or spec.format == "text"


def test_label_names_are_inferred_sorted_numerically_or_mapped_by_value(tmp_path):
    (tmp_path / "stars.jsonl").write_text("".join(json.dumps({"text": f"t{i}", "label": v}) + "\n" for i, v in
                                                  enumerate([10, 2, 1, 2, 10, 1, 2, 2, 1, 10, 2])))  # fmt: skip
    data = load_task(own(tmp_path / "stars.jsonl", "classification"))
    assert data.spec.label_names == ("1", "2", "10") and [e.label for e in data.train[:3]] == [2, 1, 0]
    given = load_task(own(tmp_path / "stars.jsonl", "classification", label_names=[10, 2, 1]))
    assert [e.label for e in given.train[:3]] == [0, 1, 2] and given.train[0].reference == "10"


def test_tsv_globs_and_directory_splits_by_file_name(tmp_path):
    for part in ("a", "b"):
        (tmp_path / f"{part}.tsv").write_text(
            "review\tstars\n" + "".join(f"{part}{i}, fine\t{i % 2}\n" for i in range(10))
        )
    data = load_task(own(f"{tmp_path}/*.tsv", "classification", columns={"text": "review", "label": "stars"}))
    assert [e.text for e in data.train[:2]] == ["a0, fine", "a1, fine"] and len(data.train) + len(data.eval) == 20
    assert data.eval[-1].text == "b9, fine"  # files in name order, the end of the last held out
    split = load_task(own(tmp_path, "classification", columns={"text": "review", "label": "stars"},
                          splits={"train": "a.tsv", "eval": "b.tsv"}))  # fmt: skip
    assert {e.text[0] for e in split.train} == {"a"} and {e.text[0] for e in split.eval} == {"b"}


def test_qnli_instruction_form_is_the_published_prompt_and_the_label_word(tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps({"question": "Who?", "sentence": "Ann did.", "label": 1}) + "\n")
    (tmp_path / "validation.jsonl").write_text(json.dumps({"question": "Q", "sentence": "S", "label": 0}) + "\n")
    data = load_task(load_task_config(name="glue/qnli_instruct", path=str(tmp_path)))
    published = (  # the GRIT example's QNLI prompt, up to the label
        "### Instruction:\nDetermine if the sentence entails the question.\n\n"
        "### Input:\nQuestion: Who?\nSentence: Ann did.\n\n### Response:\n"
    )
    assert data.train[0].text == published and data.train[0].target == "not_entailment"
    assert data.eval[0].reference == "entailment" and data.spec.metrics == ("accuracy",)


def test_the_template_names_config_checks_are_the_templates_data_builds():
    from loralab.config.tasks import SFT_TEMPLATE_NAMES
    from loralab.data.tasks import SFT_TEMPLATES

    assert tuple(SFT_TEMPLATES) == SFT_TEMPLATE_NAMES


def test_sft_templates_plain_and_format_string(tmp_path):
    (tmp_path / "d.json").write_text(
        json.dumps([{"q": "2+2", "ctx": "", "a": "4"}, {"q": "3+3", "ctx": "x", "a": "6"}])
    )
    columns = {"prompt": "q", "input": "ctx", "completion": "a"}
    plain = load_task(own(tmp_path / "d.json", "sft", columns=columns, template="plain"))
    assert plain.train[0].text == "2+2\n" and plain.eval[0].text == "3+3\n\nx\n" and plain.eval[0].target == "6"
    custom = load_task(own(tmp_path / "d.json", "sft", columns=columns, template="Q: {prompt} ({input})\nA:"))
    assert custom.train[0].text == "Q: 2+2 ()\nA:" and custom.train[0].reference == "4"


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    return build_tiny("tiny-llama", "causal_lm", None).eval(), tiny_tokenizer("tiny-llama")


def test_chat_evaluation_generates_after_the_rendered_prompt_and_scores_the_last_reply(tmp_path, tiny_llama):
    model, tokenizer = tiny_llama
    chats = [[{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": w}] for w in ("hi", "yo", "ok")]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in chats))
    data = load_task(own(tmp_path / "c.jsonl", "chat"))
    result = evaluate(model, tokenizer, data.spec, data.train, batch_size=2, max_length=64, max_new_tokens=4)
    template = resolve_chat_template(tokenizer, None)
    for record, example in zip(result.predictions, data.train, strict=True):
        prompt, reply = chat_prompt(example.messages, tokenizer, template)
        ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])  # the template wrote BOS
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
        expected = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        assert record["input"] == prompt and record["reference"] == reply and record["output"] == expected
    assert result.metrics["exact_match"] == sum(r["output"].strip() == r["reference"] for r in result.predictions) / 3


def test_text_on_a_causal_lm_reports_the_token_mean_loss_and_perplexity(tmp_path, tiny_llama):
    model, tokenizer = tiny_llama
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": "ab " * n}) + "\n" for n in (3, 9, 5, 1)))
    data = load_task(own(tmp_path / "t.jsonl", "text", splits={"train": "train", "eval": None}))
    examples = data.train
    result = evaluate(model, tokenizer, data.spec, examples, batch_size=3, max_length=64)
    nll, count = 0.0, 0
    for feature in encode_examples(data.spec, examples, tokenizer, 64):  # one unpadded sequence at a time
        batch = collate([feature], tokenizer.pad_token_id)
        tokens = len(feature["input_ids"]) - 1
        with torch.no_grad():
            nll += float(model(**batch).loss) * tokens
        count += tokens
    assert result.metrics["loss"] == pytest.approx(nll / count, rel=1e-5)
    assert result.metrics["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)


def adapter_weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(directory / "adapter" / "adapter_model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["task.packing=true", "task.group_by_length=true"])
def test_packed_and_grouped_runs_resume_exactly(tmp_path, layout):
    """A run whose last checkpoint and outputs are lost resumes from the one before and ends bit-identical."""
    import shutil

    from loralab.training.recipe import run_training
    from loralab.training.rundir import write_status

    args = [
        f"io.root={tmp_path}",
        "model.name=tiny-llama",
        "task.name=synthetic/arithmetic",
        "task.train_samples=48",
        "task.eval_samples=4",
        "task.max_length=512",
        "train.batch_size=4",
        "train.max_steps=8",
        "train.checkpoint_every=4",
        "train.eval_each_epoch=false",
        "eval.max_new_tokens=4",
        layout,
    ]
    whole = run_training(load_config([], args), False).directory
    reference = adapter_weights(whole)
    shutil.copytree(whole, tmp_path / "copy")
    lost = tmp_path / "copy"
    shutil.rmtree(lost / "checkpoints" / "step-8")
    shutil.rmtree(lost / "adapter")
    write_status(lost, state="running")
    shutil.rmtree(whole)
    shutil.move(lost, whole)
    resumed = run_training(load_config([], [*args, "io.overwrite=resume"]), False)
    assert resumed.action == "resume"
    weights = adapter_weights(resumed.directory)
    assert weights.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(weights[name], reference[name], rtol=0, atol=0)


def test_csv_cells_are_read_as_written_and_an_empty_one_is_a_data_error(tmp_path):
    """A CSV completion '007' or '10' is text, not the float 7.0 or 10.0; integer labels still work as text."""
    (tmp_path / "bond.csv").write_text('instruction,output\n"Code for Bond",007\nTen,10\nHalf,0.5\n' + "x,1\n" * 7)
    data = load_task(own(tmp_path / "bond.csv", "sft", template="plain"))
    assert [e.target for e in data.train[:3]] == ["007", "10", "0.5"]
    (tmp_path / "labels.csv").write_text("text,label\n" + "".join(f"t{i},{i % 3 * 5}\n" for i in range(12)))
    labels = load_task(own(tmp_path / "labels.csv", "classification"))
    assert labels.spec.label_names == ("0", "5", "10") and [e.label for e in labels.train[:3]] == [0, 1, 2]
    (tmp_path / "gap.csv").write_text("instruction,output\na,1\nb,\n" + "c,2\n" * 8)
    with pytest.raises(DataError, match=r"gap\.csv, row 2: no completion in column 'output'"):
        load_task(own(tmp_path / "gap.csv", "sft", template="plain"))
    (tmp_path / "blank.csv").write_text("text,label\nfine,a\n,b\n" + "x,a\n" * 8)
    with pytest.raises(DataError, match=r"blank\.csv, row 2: no text in column 'text'"):
        load_task(own(tmp_path / "blank.csv", "classification"))


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (['{"text": "a", "label": 1.5}', '{"text": "b", "label": "high"}'], r"row 2: label 'high' is not a number"),
        (['{"text": "a", "label": 1.5}', '{"text": "b", "label": NaN}'], r"row 2: label nan is not a finite number"),
    ],
)
def test_a_regression_label_must_be_a_finite_number(tmp_path, rows, message):
    (tmp_path / "scores.jsonl").write_text("\n".join(rows + ['{"text": "c", "label": 2}'] * 8) + "\n")
    with pytest.raises(DataError, match=message):
        load_task(own(tmp_path / "scores.jsonl", "regression"))


def test_labels_the_names_do_not_hold_are_errors_not_silent_class_indices(tmp_path):
    """Labels named 1 and 2: an eval label 0 is an error (before, it became class '1'); word names keep GLUE's
    integer indices; a train split of one label cannot train a classifier."""
    (tmp_path / "stars").mkdir()
    (tmp_path / "stars/train.csv").write_text("text,stars\n" + "".join(f"t{i},{1 + i % 2}\n" for i in range(10)))
    (tmp_path / "stars/validation.csv").write_text("text,stars\nawful,0\ngreat,2\n")
    with pytest.raises(DataError, match=r"validation\.csv, row 1: label '0' is not in task\.label_names \(1, 2\)"):
        load_task(own(tmp_path / "stars", "classification", columns={"label": "stars"}))
    (tmp_path / "glue.jsonl").write_text(
        "".join(json.dumps({"text": f"t{i}", "label": i % 2}) + "\n" for i in range(10))
    )
    glue = load_task(own(tmp_path / "glue.jsonl", "classification", label_names=["neg", "pos"]))
    assert [e.reference for e in glue.train[:2]] == ["neg", "pos"]
    with pytest.raises(DataError, match=r"row 2: label 1 is not in task\.label_names \(0, yes\)"):
        load_task(own(tmp_path / "glue.jsonl", "classification", label_names=["0", "yes"]))  # "0" is a number too
    (tmp_path / "one.csv").write_text("text,label\n" + "x,pos\n" * 10)
    with pytest.raises(DataError, match=r"every label in column 'label' is 'pos'; a classifier needs two"):
        load_task(own(tmp_path / "one.csv", "classification"))


def test_unreadable_files_name_their_cause(tmp_path):
    (tmp_path / "broken.json").write_text('[{"text": "a", "label": "x"},\n{"text": "b" "label": "y"}]')
    with pytest.raises(DataError, match=r"cannot read .*broken\.json: (?!An error occurred).+"):
        load_task(own(tmp_path / "broken.json", "classification"))
    (tmp_path / "latin.csv").write_bytes("text,label\ncaf\xe9,a\n".encode("latin-1") + b"x,b\n" * 8)
    with pytest.raises(DataError, match=r"latin\.csv: not UTF-8 text"):
        load_task(own(tmp_path / "latin.csv", "classification"))
    (tmp_path / "d").mkdir()
    (tmp_path / "d/train.csv").write_text("text,label\n" + "x,a\ny,b\n" * 5)
    with pytest.raises(DataError, match=r"d/eval\.csv not found \(task\.splits\.eval\)"):
        load_task(own(tmp_path / "d", "classification", splits={"train": "train.csv", "eval": "eval.csv"}))
    with pytest.raises(DataError, match=r"missing column 'txt' .*\(did you mean 'text'\?\)"):
        load_task(own(tmp_path / "d", "classification", columns={"text": "txt"}, splits={"eval": None}))
