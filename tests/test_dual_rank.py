"""Dual-rank LoRA: zero-contribution init, scaling conventions, the core view, and core/full export as plain PEFT."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import PeftModel

from loralab.adapters.dual_rank import adapter_view, dual_rank_scaling, export_view
from loralab.cli import main
from loralab.config import load_config
from loralab.config.schema import DualRankOptions
from loralab.data.collate import collate
from loralab.errors import AdapterError
from loralab.models import load_model
from loralab.seeding import seed_everything
from loralab.training.recipe import prepare, run_training

pytestmark = pytest.mark.slow

ARGS = [
    "model.name=tiny-roberta",
    "task.name=synthetic/entailment",
    "task.train_samples=64",
    "task.eval_samples=16",
    "method.name=ours",
    "method.adapter.r=2",
    "method.adapter.R=6",
    "train.batch_size=16",
    "train.lr=1e-2",
]


def batch_of(parts, count: int = 8) -> dict:
    return collate(parts.features[:count], parts.tokenizer.pad_token_id)


@pytest.mark.parametrize(("scaling", "expected"), [("core", 16 / 2), ("full", 16 / 6), ("rslora", 16 / math.sqrt(6))])
def test_scaling_conventions_map_onto_peft(tmp_path, scaling, expected):
    options = DualRankOptions(r=2, R=6, scaling=scaling)
    assert dual_rank_scaling(options) == pytest.approx(expected)
    parts = prepare(load_config([], [*ARGS, f"method.adapter.scaling={scaling}", f"io.root={tmp_path}"]))
    views = parts.adapter.lora_modules(parts.model)
    assert {round(v.scaling, 12) for v in views.values()} == {round(expected, 12)}
    assert {v.split for v in views.values()} == {2} and {v.A.shape[0] for v in views.values()} == {6}


def test_zero_contribution_init(tmp_path):
    """Step 0: the adapted model's outputs are the base model's; A gets no gradient, B does (core and extension)."""
    config = load_config([], [*ARGS, "model.dropout=0", f"io.root={tmp_path}"])
    parts = prepare(config)
    seed_everything(config.seed)
    base, _ = load_model(config.model, "seq_cls", 2)
    batch = batch_of(parts)
    parts.model.eval(), base.eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    assert torch.equal(parts.model(**inputs).logits, base(**inputs).logits)

    views = parts.adapter.lora_modules(parts.model)
    for view in views.values():
        assert float(view.A[2:].detach().std()) == pytest.approx(0.02, rel=0.2) and torch.all(view.B == 0)
    parts.model.train()
    parts.model(**batch).loss.backward()
    for name, view in views.items():
        assert torch.all(view.A.grad == 0), name
        assert view.B.grad[:, :2].abs().sum() > 0 and view.B.grad[:, 2:].abs().sum() > 0, name


def test_core_view_switches_the_extension_off_and_restores_it(tmp_path):
    parts = prepare(load_config([], [*ARGS, f"io.root={tmp_path}"]))
    views = parts.adapter.lora_modules(parts.model)
    with torch.no_grad():
        for view in views.values():
            view.B.normal_(0, 0.1)
    before = {n: v.B.clone() for n, v in views.items()}
    inputs = {k: v for k, v in batch_of(parts).items() if k != "labels"}
    parts.model.eval()
    with torch.no_grad():
        full = parts.model(**inputs).logits
        with adapter_view(parts.model, "core", 2):
            core = parts.model(**inputs).logits
            assert all(torch.all(v.B[:, 2:] == 0) for v in views.values())
        # reference: the same model with the extension's A rows zeroed instead (B A = B_r A_r)
        for view in views.values():
            view.A[2:] = 0
        reference = parts.model(**inputs).logits
        for name, view in views.items():
            assert torch.equal(view.B, before[name])
    torch.testing.assert_close(core, reference, rtol=0, atol=1e-6)
    assert (core - full).abs().max() > 1e-3


def test_exported_views_load_with_plain_peft(tmp_path):
    """core export (rank r, alpha = s·r) reproduces the core view; full export reproduces the trained model."""
    config = load_config([], [*ARGS, "train.max_steps=6", f"io.root={tmp_path / 'runs'}"])
    outcome = run_training(config, show_progress=False)
    parts = prepare(config)
    trained = PeftModel.from_pretrained(load_model(config.model, "seq_cls", 2)[0], outcome.directory / "adapter")
    inputs = {k: v for k, v in batch_of(parts).items() if k != "labels"}
    trained.eval()
    with torch.no_grad():
        full = trained(**inputs).logits
        with adapter_view(trained, "core", 2):
            core = trained(**inputs).logits
    assert (full - core).abs().max() > 1e-4

    out = tmp_path / "eval"
    assert main(["eval", "--run", str(outcome.directory), "--out", str(out), "eval.views=[core, full]"]) == 0
    metrics = json.loads((out / "eval.json").read_text())["metrics"]
    assert metrics["full/accuracy"] == outcome.metrics["accuracy"] and 0 <= metrics["core/accuracy"] <= 1

    assert main(["export", str(outcome.directory), "--view", "core", "--out", str(tmp_path / "core")]) == 0
    export_view(outcome.directory / "adapter", tmp_path / "full", "full")
    for name, expected in (("core", core), ("full", full)):
        model = PeftModel.from_pretrained(load_model(config.model, "seq_cls", 2)[0], tmp_path / name).eval()
        with torch.no_grad():
            torch.testing.assert_close(model(**inputs).logits, expected, rtol=0, atol=1e-5)
    assert (
        PeftModel.from_pretrained(load_model(config.model, "seq_cls", 2)[0], tmp_path / "core").peft_config["default"].r
        == 2
    )


def test_export_refuses_plain_lora(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(AdapterError, match="not a dual-rank LoRA adapter"):
        export_view(plain, tmp_path / "out", "core")
