"""Parts of the loop against transformers and hand computations: schedules, decay groups, collation, evaluation
cadence, checkpoint retention, fail-open trackers, the `ask` policy and bf16 autocast."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import get_scheduler

from conftest import tiny
from loralab.data import get_task
from loralab.data.collate import IGNORE_INDEX, collate, left_pad_prompts
from loralab.data.encode import encode_examples
from loralab.data.tasks import Example
from loralab.errors import DataError, RunError
from loralab.models.presets import tiny_tokenizer
from loralab.tracking import read_metrics
from loralab.training.optim import build_optimizer, build_scheduler
from loralab.training.recipe import run_training
from loralab.training.rundir import plan_run


def lrs(scheduler, optimizer, steps: int) -> list[float]:
    values = []
    for _ in range(steps):
        values.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return values


@pytest.mark.parametrize(
    ("ours", "theirs"), [("linear", "linear"), ("cosine", "cosine"), ("constant", "constant_with_warmup")]
)
def test_schedules_equal_transformers(ours, theirs, tmp_path):
    config = tiny(tmp_path, f"train.scheduler={ours}", "train.warmup_ratio=0.25", "train.lr=0.1")
    model = torch.nn.Linear(2, 2)
    optimizer = build_optimizer(model, config.train)
    reference_optimizer = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    expected = lrs(
        get_scheduler(theirs, reference_optimizer, num_warmup_steps=5, num_training_steps=18), reference_optimizer, 18
    )
    got = lrs(build_scheduler(optimizer, config.train, 18), optimizer, 18)  # ceil(0.25 * 18) = 5 warm-up steps
    assert got == pytest.approx(expected) and got[0] == 0.0 and max(got) == pytest.approx(0.1)


def test_no_weight_decay_on_biases_and_norms(tmp_path):
    config = tiny(tmp_path, "train.weight_decay=0.1")
    model = torch.nn.Sequential()
    model.add_module("dense", torch.nn.Linear(3, 3))
    model.add_module("LayerNorm", torch.nn.LayerNorm(3))
    groups = build_optimizer(model, config.train).param_groups
    decayed = {id(p) for g in groups if g["weight_decay"] == 0.1 for p in g["params"]}
    assert decayed == {id(model.dense.weight)}


def test_encode_sft_masks_the_prompt_and_collate_pads():
    tokenizer = tiny_tokenizer("tiny-llama")
    examples = [Example(id="a", text="Q: 2+2?\nA:", target=" 4"), Example(id="b", text="Q: 10+5?\nA:", target=" 15")]
    features = encode_examples(get_task("gsm8k"), examples, tokenizer, 64)
    for example, feature in zip(examples, features, strict=True):
        prompt = tokenizer(example.text)["input_ids"]
        target = tokenizer(example.target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert feature["input_ids"] == prompt + target
        assert feature["labels"] == [IGNORE_INDEX] * len(prompt) + target
    batch = collate(features, tokenizer.pad_token_id)
    short, width = len(features[0]["input_ids"]), len(features[1]["input_ids"])
    assert batch["input_ids"].shape == (2, width) and width > short
    assert batch["input_ids"][0, short:].tolist() == [tokenizer.pad_token_id] * (width - short)
    assert batch["attention_mask"][0].tolist() == [1] * short + [0] * (width - short)
    assert batch["labels"][0, short:].tolist() == [IGNORE_INDEX] * (width - short)
    left = left_pad_prompts([[7, 8], [5, 6, 7, 8]], pad_token_id=0)
    assert left["input_ids"].tolist() == [[0, 0, 7, 8], [5, 6, 7, 8]]
    assert left["attention_mask"].tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]


def test_truncation_keeps_the_start_or_the_end_or_refuses_and_drops_examples_without_answer_tokens(caplog):
    tokenizer = tiny_tokenizer("tiny-llama")
    spec = get_task("gsm8k")
    example = Example(id="long", text="x" * 40, target="yy")
    whole = encode_examples(spec, [example], tokenizer, 100)[0]
    (left,) = encode_examples(spec, [example], tokenizer, 20, "left")
    assert {k: v[-20:] for k, v in whole.items()} == left and left["labels"].count(IGNORE_INDEX) == 20 - 3
    short = Example(id="short", text="q", target="a")
    (right,) = encode_examples(spec, [example, short], tokenizer, 20, "right")  # "long" keeps no answer token
    assert right == encode_examples(spec, [short], tokenizer, 100)[0]
    assert "1 of 2 examples have no answer token within task.max_length=20" in caplog.text
    with pytest.raises(
        DataError,
        match=r"^task\.truncation=error: 1 example\(s\) exceed task\.max_length=20; the longest, id long, has 44 tok",
    ):
        encode_examples(spec, [short, example], tokenizer, 20, "error")
    with pytest.raises(DataError, match=r"no example keeps a loss token within task\.max_length=20"):
        encode_examples(spec, [example], tokenizer, 20, "right")


@pytest.mark.slow
def test_evaluation_cadence_and_checkpoint_retention(tmp_path):
    per_epoch = run_training(
        tiny(tmp_path / "a", "task.train_samples=32", "train.max_steps=null", "train.epochs=2"), False
    )
    rows = read_metrics(per_epoch.directory / "metrics.csv")
    assert [r["step"] for r in rows if r["split"] == "eval" and r["metric"] == "accuracy"] == [4, 8]
    every = tiny(
        tmp_path / "b",
        "train.max_steps=8",
        "train.eval_every=3",
        "train.eval_each_epoch=false",
        "train.checkpoint_every=1",
        "train.keep_last=2",
    )
    outcome = run_training(every, False)
    rows = read_metrics(outcome.directory / "metrics.csv")
    assert [r["step"] for r in rows if r["split"] == "eval" and r["metric"] == "accuracy"] == [3, 6, 8]
    assert sorted(p.name for p in (outcome.directory / "checkpoints").iterdir()) == ["step-7", "step-8"]


@pytest.mark.slow
def test_a_failing_tracker_is_dropped_and_the_run_completes(tmp_path, monkeypatch, caplog):
    from loralab import tracking

    def broken(self, *args):
        raise RuntimeError("no server")

    monkeypatch.setattr(tracking.TensorBoardTracker, "start", broken)
    with caplog.at_level(logging.WARNING, logger="loralab"):
        outcome = run_training(tiny(tmp_path, "log.trackers=[tensorboard]"), False)
    warnings = [r for r in caplog.records if "tracker tensorboard failed" in r.getMessage()]
    assert len(warnings) == 1
    losses = [r["step"] for r in read_metrics(outcome.directory / "metrics.csv") if r["metric"] == "loss"]
    assert losses == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_ask_policy(tmp_path, monkeypatch):
    config = tiny(tmp_path, "train.max_steps=2", "io.overwrite=ask")
    first = run_training(config, False)
    marker = (first.directory / "adapter" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(RunError, match="already exists"):
        plan_run(config, interactive=False)
    answers = iter(["r", "a", "f"])
    monkeypatch.setattr("builtins.input", lambda prompt: next(answers))
    assert plan_run(config, interactive=True).action == "skip"  # resume of a completed run reuses it
    with pytest.raises(RunError):
        plan_run(config, interactive=True)
    forced = plan_run(config, interactive=True)
    assert forced.action == "new" and first.directory.exists()  # nothing moves until the run opens
    forced.open()
    (aside,) = [p for p in first.directory.parent.iterdir() if p.name.startswith("seed42.old-")]
    assert (aside / "adapter" / "adapter_model.safetensors").read_bytes() == marker
    assert list(first.directory.iterdir()) == []


@pytest.mark.slow
def test_bf16_autocast_on_cpu_stays_close_to_fp32(tmp_path):
    common = ("model.dropout=0", "method.adapter.dropout=0", "train.max_steps=3")
    fp32 = run_training(tiny(tmp_path / "fp32", *common), False)
    bf16 = run_training(tiny(tmp_path / "bf16", *common, "train.mixed_precision=bf16"), False)
    loss = {
        name: [r["value"] for r in read_metrics(o.directory / "metrics.csv") if r["metric"] == "loss"]
        for name, o in (("fp32", fp32), ("bf16", bf16))
    }
    assert loss["fp32"] != loss["bf16"]  # autocast really ran in bf16
    assert loss["bf16"] == pytest.approx(loss["fp32"], rel=2e-2)


def test_an_epoch_whose_last_batch_is_non_finite_is_still_evaluated(tmp_path, monkeypatch):
    """64 examples in batches of 8: 8 batches an epoch, 16 steps in 2 epochs. The 8th batch's loss is made NaN, so
    the first epoch ends on a skipped batch at step 7: it is evaluated there; the 16-step budget then runs one batch
    into a third epoch (the second ends at step 15), and the run's last step is evaluated too."""
    import loralab.training.loop as loop

    calls, real_loss = [], loop.model_loss

    def nan_on_the_eighth_batch(model, batch):
        calls.append(1)
        loss = real_loss(model, batch)
        return loss * float("nan") if len(calls) == 8 else loss

    monkeypatch.setattr(loop, "model_loss", nan_on_the_eighth_batch)
    config = tiny(tmp_path, "train.max_steps=null", "train.epochs=2", "train.eval_each_epoch=true")
    outcome = run_training(config, show_progress=False)
    rows = read_metrics(outcome.directory / "metrics.csv")
    assert [r["step"] for r in rows if r["metric"] == "bad_step"] == [7]
    assert [r["step"] for r in rows if r["split"] == "eval" and r["metric"] == "accuracy"] == [7, 15, 16]
    assert len(calls) == 17  # 16 optimizer steps and the skipped batch
