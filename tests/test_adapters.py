"""Adapters against PEFT itself and dense references: targets, LoRA options, views, subsets, save/load, errors."""

from __future__ import annotations

import copy
import dataclasses

import peft
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

from loralab.adapters import build_adapter, load_adapter
from loralab.config.schema import BitfitOptions, FullOptions, LoraOptions, ModelConfig, PeftOptions
from loralab.errors import AdapterError, ConfigError
from loralab.models import load_model

BASE = ModelConfig("tiny-llama", "auto", "float32", "none", False, False, None)
HEADS = {"tiny-llama": "causal_lm", "tiny-bert": "seq_cls", "tiny-gpt2": "causal_lm", "tiny-roberta": "seq_cls"}


def base_model(name: str):
    head = HEADS[name]
    model, tokenizer = load_model(dataclasses.replace(BASE, name=name), head, 2 if head == "seq_cls" else None)
    return model, tokenizer, head


def inputs(tokenizer):
    return tokenizer(["a first sentence", "and a second, longer one"], return_tensors="pt", padding=True)


def lora_targets(model) -> set[str]:
    """Module names (within the backbone) that received a LoRA layer."""
    return {name.split(".model.", 1)[-1] for name, module in model.named_modules() if hasattr(module, "lora_A")}


def perturb_lora_b(model, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)


def logits(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize(("name", "family"), [("tiny-llama", "llama"), ("tiny-bert", "bert"), ("tiny-gpt2", "gpt2")])
def test_standard_targets_are_peft_defaults(name, family):
    model, _, head = base_model(name)
    ours = build_adapter(LoraOptions(), head).apply(model)
    expected = set(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[family])
    assert lora_targets(ours) and {t.rsplit(".", 1)[-1] for t in lora_targets(ours)} == expected


@pytest.mark.parametrize(
    ("name", "leaves"),
    [
        ("tiny-llama", {"q_proj", "k_proj", "v_proj", "o_proj"}),
        ("tiny-bert", {"self.query", "self.key", "self.value", "attention.output.dense"}),
        ("tiny-gpt2", {"attn.c_attn", "attn.c_proj"}),
    ],
)
def test_extended_targets_cover_attention_only(name, leaves):
    model, _, head = base_model(name)
    targets = lora_targets(build_adapter(LoraOptions(target_modules="extended"), head).apply(model))
    assert len(targets) == 2 * len(leaves)  # two layers
    assert all(any(t.endswith(leaf) for leaf in leaves) for t in targets)
    assert not any(t.endswith(("intermediate.dense", "mlp.c_proj", "mlp.down_proj")) for t in targets)


def test_all_linear_wraps_every_linear_but_the_head():
    model, _, head = base_model("tiny-bert")
    linear = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.startswith("classifier")}
    targets = lora_targets(build_adapter(LoraOptions(target_modules="all-linear"), head).apply(model))
    assert {t.split("bert.", 1)[-1] for t in targets} == {n.split("bert.", 1)[-1] for n in linear}


@pytest.mark.parametrize(
    "options",
    [
        {"r": 4, "alpha": 32.0},
        {"r": 16, "alpha": 8.0, "use_rslora": True},
        {"r": 4, "alpha": 4.0, "layers_to_transform": [1]},
        {"r": 8, "alpha": 16.0, "init_lora_weights": "gaussian"},
        {"r": 4, "alpha": 8.0, "use_dora": True},
        {"r": 4, "alpha": 8.0, "target_modules": r".*\.(q_proj|down_proj)"},
    ],
)
def test_lora_options_equal_plain_peft(options):
    """Same base, same seed: loralab's LoRA has PEFT's targets, scalings, parameters and logits."""
    model, tokenizer, head = base_model("tiny-llama")
    reference_base = copy.deepcopy(model)
    torch.manual_seed(0)
    ours = build_adapter(LoraOptions(**options), head).apply(model)
    torch.manual_seed(0)
    peft_options = {k: v for k, v in options.items() if k not in ("alpha",)}
    peft_options.setdefault("target_modules", ["q_proj", "v_proj"])
    theirs = get_peft_model(
        reference_base,
        LoraConfig(task_type="CAUSAL_LM", lora_alpha=options["alpha"], lora_dropout=0.05, **peft_options),
    )
    our_params, their_params = dict(ours.named_parameters()), dict(theirs.named_parameters())
    assert our_params.keys() == their_params.keys()
    for key, parameter in our_params.items():
        assert parameter.requires_grad == their_params[key].requires_grad, key
        torch.testing.assert_close(parameter, their_params[key], rtol=0, atol=0)
    scalings = {n: m.scaling["default"] for n, m in ours.named_modules() if hasattr(m, "lora_A")}
    r, alpha = options["r"], options["alpha"]
    expected = alpha / r**0.5 if options.get("use_rslora") else alpha / r
    assert scalings and all(s == pytest.approx(expected) for s in scalings.values())
    if options.get("layers_to_transform"):
        assert all(".layers.1." in n for n in scalings)
    batch = inputs(tokenizer)
    torch.testing.assert_close(logits(ours, batch), logits(theirs, batch), rtol=0, atol=0)


def test_default_init_leaves_the_model_unchanged():
    model, tokenizer, head = base_model("tiny-bert")
    batch = inputs(tokenizer)
    before = logits(model, batch)
    after = logits(build_adapter(LoraOptions(), head).apply(model), batch)
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_lora_views_give_the_merged_weight_delta():
    """B @ A * scaling of every view equals PEFT's merged weight minus the base weight."""
    model, _, head = base_model("tiny-llama")
    adapter = build_adapter(LoraOptions(r=4, alpha=12.0, target_modules="extended"), head)
    wrapped = adapter.apply(model)
    perturb_lora_b(wrapped)
    views = adapter.lora_modules(wrapped)
    assert len(views) == 8
    deltas = {name: view.B @ view.A * view.scaling for name, view in views.items()}
    bases = {name: view.module.base_layer.weight.detach().clone() for name, view in views.items()}
    merged = copy.deepcopy(wrapped).merge_and_unload()
    merged_weights = dict(merged.named_modules())
    for name, delta in deltas.items():
        module = merged_weights[name.replace("base_model.model.", "")]
        torch.testing.assert_close(module.weight - bases[name], delta.detach(), rtol=0, atol=1e-6)
    assert all(view.scaling == 3.0 and view.A.shape[0] == view.B.shape[1] == 4 for view in views.values())


def test_lora_round_trip_through_loralab_and_plain_peft(tmp_path):
    model, tokenizer, head = base_model("tiny-bert")
    adapter = build_adapter(LoraOptions(), head)
    trained = adapter.apply(model)
    perturb_lora_b(trained)
    adapter.save(trained, tmp_path / "adapter")
    assert {p.name for p in (tmp_path / "adapter").iterdir()} >= {
        "adapter_config.json",
        "adapter_model.safetensors",
        "loralab.json",
    }
    batch = inputs(tokenizer)
    expected = logits(trained, batch)
    ours = load_adapter(base_model("tiny-bert")[0], tmp_path / "adapter")
    theirs = PeftModel.from_pretrained(base_model("tiny-bert")[0], tmp_path / "adapter")
    torch.testing.assert_close(logits(ours, batch), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(theirs, batch), expected, rtol=0, atol=1e-6)


def test_full_trains_everything_and_round_trips(tmp_path):
    model, tokenizer, head = base_model("tiny-bert")
    adapter = build_adapter(FullOptions(), head)
    trained = adapter.apply(model)
    assert all(p.requires_grad for p in trained.parameters())
    with torch.no_grad():
        for parameter in trained.parameters():
            parameter.add_(0.01)
    adapter.save(trained, tmp_path / "full")
    batch = inputs(tokenizer)
    loaded = load_adapter(base_model("tiny-bert")[0], tmp_path / "full")
    torch.testing.assert_close(logits(loaded, batch), logits(trained, batch), rtol=0, atol=0)


@pytest.mark.parametrize("train_layernorm", [False, True])
def test_bitfit_trains_biases_head_and_optionally_norms(train_layernorm, tmp_path):
    model, tokenizer, head = base_model("tiny-bert")
    adapter = build_adapter(BitfitOptions(train_layernorm=train_layernorm), head)
    trained = adapter.apply(model)
    expected = {
        n
        for n, _ in trained.named_parameters()
        if n.endswith(".bias") or n.startswith("classifier.") or (train_layernorm and "LayerNorm.weight" in n)
    }
    assert {n for n, p in trained.named_parameters() if p.requires_grad} == expected
    with torch.no_grad():
        for name, parameter in trained.named_parameters():
            if name in expected:
                parameter.add_(0.05)
    adapter.save(trained, tmp_path / "bitfit")
    batch = inputs(tokenizer)
    loaded = load_adapter(base_model("tiny-bert")[0], tmp_path / "bitfit")
    torch.testing.assert_close(logits(loaded, batch), logits(trained, batch), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("peft_type", "kwargs", "config"),
    [
        (
            "IA3",
            {"target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]},
            "IA3Config",
        ),
        ("loha", {"r": 4, "target_modules": ["q_proj", "v_proj"]}, "LoHaConfig"),
    ],
)
def test_any_peft_type_matches_peft(peft_type, kwargs, config):
    model, _, head = base_model("tiny-llama")
    reference_base = copy.deepcopy(model)
    ours = build_adapter(PeftOptions(peft_type=peft_type, kwargs=kwargs), head).apply(model)
    theirs = get_peft_model(reference_base, getattr(peft, config)(task_type="CAUSAL_LM", **kwargs))
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    assert count(ours) == count(theirs) > 0


def test_peft_type_and_kwargs_errors():
    with pytest.raises(ConfigError, match="did you mean 'LORA'"):
        build_adapter(PeftOptions(peft_type="LORAA"), "causal_lm")
    with pytest.raises(ConfigError, match=r"method\.adapter\.kwargs for PEFT type IA3"):
        build_adapter(PeftOptions(peft_type="IA3", kwargs={"not_an_option": 1}), "causal_lm")


def test_adapter_for_another_architecture_is_refused(tmp_path):
    model, _, head = base_model("tiny-bert")
    adapter = build_adapter(LoraOptions(), head)
    adapter.save(adapter.apply(model), tmp_path / "bert-adapter")
    with pytest.raises(AdapterError) as error:
        load_adapter(base_model("tiny-llama")[0], tmp_path / "bert-adapter")
    assert "\n" not in str(error.value)
