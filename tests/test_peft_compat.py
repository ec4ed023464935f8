"""The quickstart's adapter is a standard PEFT adapter: plain PeftModel.from_pretrained reproduces loralab's logits."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from loralab.adapters import build_adapter
from loralab.config import load_config
from loralab.config.load import packaged_experiment
from loralab.data import load_task
from loralab.models import load_model
from loralab.models.presets import minilm_directory
from loralab.training.checkpoint import list_checkpoints
from loralab.training.recipe import run_training

pytestmark = pytest.mark.slow


def test_quickstart_adapter_loads_with_plain_peft(tmp_path):
    config = load_config(
        [str(packaged_experiment("quickstart"))],
        [f"io.root={tmp_path}", "task.train_samples=64", "task.eval_samples=16", "train.max_steps=4"],
    )
    outcome = run_training(config, show_progress=False)
    adapter_dir = outcome.directory / "adapter"
    saved = load_file(str(adapter_dir / "adapter_model.safetensors"))
    assert any("lora_B" in name and tensor.abs().max() > 0 for name, tensor in saved.items())

    # loralab's trained model: built as the recipe builds it, with the final checkpoint's trainable weights
    ours, _ = load_model(config.model, "seq_cls", 2)
    ours = build_adapter(config.method.adapter, "seq_cls").apply(ours)
    final = list_checkpoints(outcome.directory / "checkpoints")[-1]
    missing, unexpected = ours.load_state_dict(load_file(str(final / "trainable.safetensors")), strict=False)
    assert not unexpected and all(p.requires_grad is False for n, p in ours.named_parameters() if n in missing)

    # plain transformers + PEFT, nothing of loralab
    base = AutoModelForSequenceClassification.from_pretrained(minilm_directory(), num_labels=2)
    theirs = PeftModel.from_pretrained(base, adapter_dir)
    tokenizer = AutoTokenizer.from_pretrained(minilm_directory())
    texts = [example.text for example in load_task(config.task).eval]
    batch = tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    ours.eval(), theirs.eval()
    with torch.no_grad():
        difference = (ours(**batch).logits - theirs(**batch).logits).abs().max().item()
    assert difference <= 1e-5
