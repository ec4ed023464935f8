"""End-to-end runs on tiny models: the loop against a hand-written PEFT loop, outputs, policies, guards."""

from __future__ import annotations

import json

import accelerate
import peft
import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import get_scheduler

from conftest import tiny
from loralab.data import load_task
from loralab.data.collate import collate
from loralab.data.encode import encode_classification
from loralab.errors import LoraLabError, RunError
from loralab.models import load_model
from loralab.seeding import seed_everything
from loralab.tracking import read_metrics
from loralab.training.loop import BatchOrder
from loralab.training.recipe import run_training
from loralab.training.rundir import read_status

pytestmark = pytest.mark.slow


def adapter_tensors(run_dir):
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def test_loop_equals_a_hand_written_peft_loop(tmp_path):
    """Same init, data order, AdamW and schedule: loralab's adapter equals a plain PEFT loop's."""
    config = tiny(tmp_path, "method.adapter.dropout=0", "train.warmup_ratio=0.5", "train.max_grad_norm=0.5")
    assert config.model.dropout is None  # the model's own dropout stays on: same RNG stream in both loops
    outcome = run_training(config, show_progress=False)

    seed_everything(config.seed)
    model, tokenizer = load_model(config.model, "seq_cls", 2)
    lora = LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["query", "value"])
    model = get_peft_model(model, lora)
    features = encode_classification(load_task(config.task).train, tokenizer, config.task.max_length)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=3, num_training_steps=6)
    order = BatchOrder(len(features), 8, config.seed)
    model.train()
    for step in range(6):
        batch = collate([features[i] for i in order.batch(0, step)], tokenizer.pad_token_id)
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 0.5)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()

    ours = adapter_tensors(outcome.directory)
    reference = get_peft_model_state_dict(model)
    assert sorted(ours) == sorted(reference) and len(ours) > 0
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, reference[name], rtol=0, atol=1e-6)


def test_run_directory_contents(tmp_path):
    outcome = run_training(tiny(tmp_path, "train.eval_every=3"), show_progress=False)
    directory = outcome.directory
    parts = directory.relative_to(tmp_path / "runs").parts
    assert parts[:3] == ("synthetic-sentiment", "tiny-bert", "lora") and parts[4] == "seed42"
    status = read_status(directory)
    assert status["state"] == "completed" and status["step"] == 6
    # the versions of the libraries this process imported, as each reports itself
    assert {name: status["versions"][name] for name in ("torch", "transformers", "peft", "accelerate")} == {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "accelerate": accelerate.__version__,
    }
    assert 0 < status["trainable_params"] < status["total_params"]
    rows = read_metrics(directory / "metrics.csv")
    assert [r["step"] for r in rows if r["metric"] == "loss"] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in rows if r["split"] == "eval" and r["metric"] == "accuracy"] == [3, 6]
    predictions = [json.loads(line) for line in (directory / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 32
    accuracy = sum(p["prediction"] == p["reference"] for p in predictions) / len(predictions)
    assert outcome.metrics["accuracy"] == pytest.approx(accuracy)
    assert json.loads((directory / "eval.json").read_text())["metrics"] == outcome.metrics
    assert (directory / "adapter" / "adapter_config.json").is_file()


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    common = ("method.adapter.dropout=0", "model.dropout=0", "train.max_steps=4")
    one = run_training(tiny(tmp_path / "a", *common), show_progress=False)
    four = run_training(tiny(tmp_path / "b", *common, "train.grad_accum=4"), show_progress=False)
    first, second = adapter_tensors(one.directory), adapter_tensors(four.directory)
    for name in first:
        torch.testing.assert_close(first[name], second[name], rtol=0, atol=1e-6)


def test_overwrite_policies(tmp_path):
    config = tiny(tmp_path, "train.max_steps=2")
    first = run_training(config, show_progress=False)
    ended = read_status(first.directory)["ended"]
    with pytest.raises(RunError, match="already exists"):
        run_training(config, show_progress=False)

    skipped = run_training(tiny(tmp_path, "train.max_steps=2", "io.overwrite=skip"), show_progress=False)
    assert skipped.action == "skip" and skipped.metrics == first.metrics
    assert read_status(first.directory)["ended"] == ended

    forced = run_training(tiny(tmp_path, "train.max_steps=2", "io.overwrite=force"), show_progress=False)
    aside = [p for p in first.directory.parent.iterdir() if p.name.startswith("seed42.old-")]
    assert forced.action == "new" and len(aside) == 1
    assert (aside[0] / "adapter" / "adapter_model.safetensors").is_file()


def test_non_finite_loss_is_skipped_then_aborts(tmp_path):
    config = tiny(tmp_path, "train.lr=1e30", "train.max_grad_norm=null", "train.max_bad_steps=2", "train.max_steps=20")
    with pytest.raises(LoraLabError, match=r"training diverged: 3 steps"):
        run_training(config, show_progress=False)
    directory = next((tmp_path / "runs").rglob("seed42"))
    assert read_status(directory)["state"] == "failed"
    bad = [r for r in read_metrics(directory / "metrics.csv") if r["metric"] == "bad_step"]
    assert len(bad) == 3


def test_causal_lm_sft_generates_and_scores(tmp_path):
    config = tiny(
        tmp_path,
        "model.name=tiny-llama",
        "task.name=synthetic/arithmetic",
        "task.max_length=256",
        "task.eval_samples=4",
        "train.max_steps=2",
        "eval.max_new_tokens=8",
    )
    outcome = run_training(config, show_progress=False)
    predictions = [json.loads(line) for line in (outcome.directory / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 4
    assert all("output" in p and "prediction" in p for p in predictions)
    for metric in ("strict_match", "flexible_extract"):
        assert outcome.metrics[metric] == pytest.approx(sum(p["matches"][metric] for p in predictions) / 4)
    assert all(p["correct"] == p["matches"]["strict_match"] for p in predictions)
