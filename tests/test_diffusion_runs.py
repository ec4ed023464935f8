"""LoRA-Diffusion and its five baselines end to end on a tiny diffusion LM: runs, files, re-evaluation, pre-training."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from loralab.config import load_config
from loralab.data.collate import collate
from loralab.diffusion import load_diffusion_model
from loralab.errors import ConfigError, LoraLabError
from loralab.evaluation.standalone import evaluate_adapter
from loralab.models.presets import build_tiny
from loralab.training.optim import build_optimizer
from loralab.training.recipe import prepare, run_training
from loralab.training.rundir import read_status

pytestmark = pytest.mark.slow
METHODS = ["lora_diffusion", "weight_lora", "adapters", "prefix", "bitfit", "full_ft"]


def diffusion_run(tmp_path, *overrides: str):
    return load_config(
        [],
        [
            f"io.root={tmp_path / 'runs'}",
            "model.name=tiny-bert",
            "model.kind=masked_diffusion",
            "task.name=synthetic/sentiment",
            "task.train_samples=32",
            "task.eval_samples=8",
            "task.max_length=96",
            "diffusion.response_length=4",
            "diffusion.steps=4",
            "train.batch_size=8",
            "train.max_steps=4",
            "train.lr=1e-3",
            *overrides,
        ],
    )


@pytest.mark.parametrize("method", METHODS)
def test_each_method_trains_saves_and_re_evaluates_to_the_same_metrics(tmp_path, method):
    small_prefix = ["method.adapter.num_virtual_tokens=4"] if method == "prefix" else []
    config = diffusion_run(tmp_path, f"method.name={method}", *small_prefix)
    outcome = run_training(config, show_progress=False)
    status = read_status(outcome.directory)
    assert status["state"] == "completed" and status["step_time_s"] > 0
    assert set(outcome.metrics) == {"accuracy", "verbalizer_accuracy"}
    model, _ = load_diffusion_model(config.model, config.diffusion)
    total = sum(p.numel() for p in model.parameters())
    trainable, everything = status["trainable_params"], status["total_params"]
    assert (trainable == everything == total) if method == "full_ft" else 0 < trainable < everything
    again = evaluate_adapter(config, outcome.directory / "adapter", tmp_path / "eval")
    assert again == outcome.metrics  # the saved adapter is the one that was evaluated, applied in sampling


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_weight_lora_on_the_diffusion_backbone_is_a_plain_peft_adapter_of_the_masked_lm(tmp_path):
    config = diffusion_run(tmp_path, "method.name=weight_lora")
    adapter = run_training(config, show_progress=False).directory / "adapter"
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["task_type"] is None
    plain = PeftModel.from_pretrained(build_tiny("tiny-bert", "masked_lm", None), str(adapter)).eval()
    ours, tokenizer = load_diffusion_model(config.model, config.diffusion)
    from loralab.diffusion import load_diffusion_adapter

    ours = load_diffusion_adapter(ours, adapter).eval()
    ids = tokenizer(["the plot was dull.", "great"], padding=True, return_tensors="pt")
    expected = plain(**ids).logits
    expected[..., tokenizer.mask_token_id] = float("-inf")
    got = ours.denoise(ids["input_ids"], ids["attention_mask"], ids["attention_mask"].bool(), torch.ones(2))
    torch.testing.assert_close(got, expected)


def test_bitfit_on_the_diffusion_lm_changes_exactly_the_biases(tmp_path):
    config = diffusion_run(tmp_path, "method.name=bitfit", "train.lr=1e-2")
    parts = prepare(config)
    model = parts.model
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = build_optimizer(model, config.train)
    batch = collate(parts.features[:8], parts.tokenizer.pad_token_id)
    for _ in range(3):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])}
    biases = {name for name in before if name.endswith(".bias")}
    assert changed == biases  # every bias moved, nothing else did
    run = run_training(config, show_progress=False).directory
    assert set(load_file(str(run / "adapter" / "weights.safetensors"))) == {n.removeprefix("backbone.") for n in biases}


def test_continued_pretraining_on_text_writes_a_model_that_later_runs_start_from(tmp_path):
    pretrain = diffusion_run(tmp_path, "task.name=text/synthetic", "method.name=full_ft", "train.max_steps=3")
    outcome = run_training(pretrain, show_progress=False)
    assert set(outcome.metrics) == {"elbo"} and outcome.metrics["elbo"] < 0
    backbone = outcome.directory / "model"
    assert (backbone / "config.json").is_file() and (backbone / "tokenizer_config.json").is_file()
    trained = load_file(str(outcome.directory / "adapter" / "weights.safetensors"))
    follow = diffusion_run(tmp_path, f"model.name={backbone}", "method.name=lora_diffusion")
    model, _ = load_diffusion_model(follow.model, follow.diffusion)
    name = "bert.encoder.layer.0.attention.self.query.weight"
    torch.testing.assert_close(dict(model.backbone.named_parameters())[name].detach(), trained[name])
    assert not model.head_parameters  # a pre-trained diffusion LM has its head
    head = "cls.predictions.transform.dense.weight"
    torch.testing.assert_close(dict(model.backbone.named_parameters())[head].detach(), trained[head])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["method.name=lora_diffusion", "model.kind=auto"], "trajectory_lora needs model.kind=masked_diffusion"),
        (["diffusion.block_length=3"], "must divide diffusion.response_length"),
        (["diffusion.block_length=2", "diffusion.steps=3"], "must be a multiple of the number of blocks"),
        (["method.name=grit"], "not supported with model.kind=masked_diffusion"),
        (["method.name=lora_diffusion", "method.adapter.ranks=[8,4]"], "needs 3 values"),
        (["diffusion.sigma_max=1e-5"], "sigma_max must be larger"),
    ],
)
def test_impossible_diffusion_configs_are_refused_in_one_line(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        diffusion_run(tmp_path, *overrides)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["task.name=glue/stsb"], "cannot run a regression task"),
        (["task.name=text/synthetic", "model.kind=auto", "method.name=lora"], "or model.kind=masked_diffusion"),
    ],
)
def test_tasks_a_diffusion_lm_cannot_run_are_refused_before_loading(tmp_path, overrides, message):
    with pytest.raises(LoraLabError, match=message):  # text on an encoder: a causal LM, or the diffusion LM
        run_training(diffusion_run(tmp_path, *overrides), show_progress=False)
