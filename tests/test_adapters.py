"""Adapters against PEFT itself, dense references and hand counts: targets, LoRA options, views, subsets, save/load."""

from __future__ import annotations

import copy
import json
import math
import shutil

import peft
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS
from safetensors.torch import load_file
from torch import nn
from transformers import DistilBertConfig, DistilBertForSequenceClassification, OPTConfig, OPTForCausalLM
from transformers.pytorch_utils import Conv1D

from conftest import batch_for, build, logits, one_line, perturb
from loralab.adapters import build_adapter, load_adapter
from loralab.config.schema import BitfitOptions, FullOptions, LoraOptions, PeftOptions
from loralab.errors import AdapterError, ConfigError

FAMILY = {"tiny-llama": "llama", "tiny-bert": "bert", "tiny-gpt2": "gpt2", "tiny-roberta": "roberta"}
PREFIX = "base_model.model."
HEAD_MODULES = ("lm_head", "classifier", "score")


def lora_targets(model):
    """Backbone names of the modules that received a LoRA layer."""
    return {name.removeprefix(PREFIX) for name, module in model.named_modules() if hasattr(module, "lora_A")}


def modules_named(model, predicate):
    return {name for name, _ in model.named_modules() if name and predicate(name)}


def tiny_distilbert():
    config = DistilBertConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, hidden_dim=64, max_position_embeddings=32)
    return DistilBertForSequenceClassification(config)


def tiny_opt():
    config = OPTConfig(
        vocab_size=64,
        hidden_size=32,
        word_embed_proj_dim=32,
        num_hidden_layers=1,
        ffn_dim=64,
        num_attention_heads=2,
        max_position_embeddings=32,
    )
    return OPTForCausalLM(config)


# ---- 1. target_modules presets ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "head"), [("tiny-llama", "causal_lm"), ("tiny-bert", "seq_cls"), ("tiny-gpt2", "causal_lm")]
)
def test_standard_targets_are_peft_defaults(name, head):
    """`standard` wraps exactly the modules whose leaf name is in PEFT's default table for the family."""
    model, _ = build(name, head)
    leaves = set(PEFT_TARGETS[FAMILY[name]])
    expected = modules_named(model, lambda n: n.rsplit(".", 1)[-1] in leaves)
    targets = lora_targets(build_adapter(LoraOptions(), head).apply(model))
    assert targets == expected
    assert len(expected) == 2 * len(leaves)  # two layers, every default leaf in each


BERT_ATTENTION = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense")
EXTENDED = {
    "tiny-llama": (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"), 8),
    "tiny-bert": (BERT_ATTENTION, 8),
    "tiny-roberta": (BERT_ATTENTION, 8),
    "tiny-gpt2": (("attn.c_attn", "attn.c_proj"), 4),
}


@pytest.mark.parametrize("name", list(EXTENDED))
def test_extended_targets_are_attention_projections_only(name):
    """`extended` wraps q,k,v,o of every layer, no feed-forward layer (BERT's FFN output.dense, GPT-2's mlp.c_proj)."""
    head = "causal_lm" if name in ("tiny-llama", "tiny-gpt2") else "seq_cls"
    model, _ = build(name, head)
    suffixes, count = EXTENDED[name]
    expected = modules_named(model, lambda n: n.endswith(suffixes))
    targets = lora_targets(build_adapter(LoraOptions(target_modules="extended"), head).apply(model))
    assert targets == expected and len(targets) == count
    assert not {t for t in targets if t.endswith(("layer.0.output.dense", "mlp.c_proj", "mlp.down_proj"))}


@pytest.mark.parametrize(
    ("name", "head"),
    [("tiny-llama", "causal_lm"), ("tiny-bert", "seq_cls"), ("tiny-gpt2", "causal_lm"), ("tiny-roberta", "seq_cls")],
)
def test_all_linear_wraps_every_linear_but_the_head(name, head):
    model, _ = build(name, head)
    expected = {
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear | Conv1D) and n.split(".", 1)[0] not in HEAD_MODULES
    }
    targets = lora_targets(build_adapter(LoraOptions(target_modules="all-linear"), head).apply(model))
    assert targets == expected and len(expected) >= 8


@pytest.mark.parametrize(
    ("target_modules", "expected"),
    [
        (
            ["k_proj", "down_proj"],
            {f"model.layers.{i}.{m}" for i in (0, 1) for m in ("self_attn.k_proj", "mlp.down_proj")},
        ),
        (r".*layers\.1\.self_attn\.(q|o)_proj", {"model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.o_proj"}),
    ],
)
def test_list_and_regex_targets_pass_through(target_modules, expected):
    model, _ = build("tiny-llama")
    assert lora_targets(build_adapter(LoraOptions(target_modules=target_modules), "causal_lm").apply(model)) == expected


@pytest.mark.parametrize(
    ("make", "head", "preset", "family"),
    [
        (tiny_distilbert, "seq_cls", "standard", "distilbert"),
        (tiny_distilbert, "seq_cls", "extended", "distilbert"),
        (tiny_opt, "causal_lm", "extended", "opt"),  # in PEFT's table, not in loralab's extended one
    ],
)
def test_preset_without_an_entry_is_a_config_error(make, head, preset, family):
    assert family not in PEFT_TARGETS or preset == "extended"
    with pytest.raises(ConfigError) as error:
        build_adapter(LoraOptions(target_modules=preset), head).apply(make())
    assert f"target_modules={preset}" in one_line(error) and f"'{family}'" in str(error.value)


def test_lists_still_work_where_presets_do_not():
    model = tiny_distilbert()
    wrapped = build_adapter(LoraOptions(target_modules=["q_lin"]), "seq_cls").apply(model)
    assert lora_targets(wrapped) == {"distilbert.transformer.layer.0.attention.q_lin"}


def test_targets_matching_nothing_are_a_config_error():
    model, _ = build("tiny-llama")
    with pytest.raises(ConfigError) as error:
        build_adapter(LoraOptions(target_modules=["nonesuch"]), "causal_lm").apply(model)
    assert one_line(error).startswith("method.adapter: PEFT cannot apply lora")


# ---- 2. LoRA options equal plain PEFT -----------------------------------------------------------------------------

LLAMA_QV = ("tiny-llama", "causal_lm", ["q_proj", "v_proj"])
ROBERTA_QV = ("tiny-roberta", "seq_cls", ["query", "value"])


@pytest.mark.parametrize(
    ("setup", "options"),
    [
        (LLAMA_QV, {}),
        (LLAMA_QV, {"r": 4, "alpha": 32.0, "dropout": 0.0}),
        (LLAMA_QV, {"r": 16, "alpha": 8.0, "dropout": 0.2, "use_rslora": True}),
        (LLAMA_QV, {"r": 4, "alpha": 4.0, "layers_to_transform": [1]}),
        (LLAMA_QV, {"init_lora_weights": "gaussian"}),
        (LLAMA_QV, {"init_lora_weights": False}),
        (LLAMA_QV, {"init_lora_weights": "pissa"}),
        (LLAMA_QV, {"r": 4, "alpha": 8.0, "use_dora": True}),
        (ROBERTA_QV, {"r": 4, "bias": "all"}),
        (ROBERTA_QV, {"use_rslora": True, "use_dora": True}),
    ],
    ids=lambda value: value[0] if isinstance(value, tuple) else ",".join(f"{k}={v}" for k, v in value.items()),
)
def test_lora_options_equal_plain_peft(setup, options):
    """Same base, same seed: loralab's LoRA has PEFT's layers, parameters, scalings, dropouts and logits."""
    name, head, targets = setup
    model, tokenizer = build(name, head)
    reference, untouched = copy.deepcopy(model), copy.deepcopy(model)
    torch.manual_seed(0)
    ours = build_adapter(LoraOptions(target_modules="standard", **options), head).apply(model)
    r, alpha, dropout = options.get("r", 8), options.get("alpha", 16.0), options.get("dropout", 0.05)
    peft_options = {k: v for k, v in options.items() if k not in ("r", "alpha", "dropout")}
    torch.manual_seed(0)
    theirs = get_peft_model(
        reference,
        LoraConfig(
            task_type=head.upper(), r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, **peft_options
        ),
    )
    our_params, their_params = dict(ours.named_parameters()), dict(theirs.named_parameters())
    assert our_params.keys() == their_params.keys()
    for key, parameter in our_params.items():
        assert parameter.requires_grad == their_params[key].requires_grad, key
        torch.testing.assert_close(parameter, their_params[key], rtol=0, atol=0)
    assert sum(p.requires_grad for p in our_params.values()) > 0

    our_layers = {n: m for n, m in ours.named_modules() if hasattr(m, "lora_A")}
    their_layers = {n: m for n, m in theirs.named_modules() if hasattr(m, "lora_A")}
    assert our_layers.keys() == their_layers.keys() and our_layers
    scaling = alpha / math.sqrt(r) if options.get("use_rslora") else alpha / r
    for key, layer in our_layers.items():
        assert layer.scaling == their_layers[key].scaling == {"default": pytest.approx(scaling)}
        assert layer.lora_A["default"].weight.shape == (r, layer.in_features)
        assert layer.lora_B["default"].weight.shape == (layer.out_features, r)
        ours_dropout, theirs_dropout = layer.lora_dropout["default"], their_layers[key].lora_dropout["default"]
        assert type(ours_dropout) is type(theirs_dropout)
        assert getattr(ours_dropout, "p", 0.0) == getattr(theirs_dropout, "p", 0.0) == dropout
    if "layers_to_transform" in options:
        assert {key.split(".layers.")[1][0] for key in our_layers} == {"1"}

    batch = batch_for(tokenizer)
    torch.testing.assert_close(logits(ours, batch), logits(theirs, batch), rtol=0, atol=0)
    if options.get("init_lora_weights", True) in (True, "gaussian"):  # B = 0: exactly the base model
        assert all(not layer.lora_B["default"].weight.any() for layer in our_layers.values())
        if not options.get("use_dora"):
            torch.testing.assert_close(logits(ours, batch), logits(untouched, batch), rtol=0, atol=0)
    if options.get("init_lora_weights") is False:
        assert (logits(ours, batch) - logits(untouched, batch)).abs().max() > 1e-4


# ---- 3. LoraView deltas equal PEFT's merged weights ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "head", "options"),
    [
        ("tiny-llama", "causal_lm", {"r": 4, "alpha": 12.0, "target_modules": "extended"}),
        ("tiny-llama", "causal_lm", {"r": 4, "alpha": 8.0, "use_rslora": True, "target_modules": "all-linear"}),
        ("tiny-bert", "seq_cls", {"r": 2, "alpha": 5.0, "target_modules": "extended"}),
        ("tiny-gpt2", "causal_lm", {"r": 4, "alpha": 8.0, "target_modules": "extended"}),  # Conv1D: (in, out) weights
    ],
)
def test_lora_views_give_the_merged_weight_delta(name, head, options):
    """B @ A * scaling of every view equals PEFT's merge_and_unload weight minus the base weight."""
    model, _ = build(name, head)
    base = copy.deepcopy(model)
    adapter = build_adapter(LoraOptions(**options), head)
    wrapped = adapter.apply(model)
    perturb(wrapped, lambda n: "lora_B" in n)
    views = adapter.lora_modules(wrapped)
    layers = {n: m for n, m in wrapped.named_modules() if hasattr(m, "lora_A")}
    assert views.keys() == layers.keys() and views
    r, alpha = options["r"], options["alpha"]
    scaling = alpha / math.sqrt(r) if options.get("use_rslora") else alpha / r
    merged = copy.deepcopy(wrapped).merge_and_unload()
    for key, view in views.items():
        assert view.module is layers[key]
        assert view.A is layers[key].lora_A["default"].weight and view.B is layers[key].lora_B["default"].weight
        assert view.A.requires_grad and view.B.requires_grad and view.split is None
        assert view.scaling == pytest.approx(scaling)
        backbone = key.removeprefix(PREFIX)
        before = base.get_submodule(backbone)
        delta = (view.B @ view.A * view.scaling).detach()
        if isinstance(before, Conv1D):
            delta = delta.T
        assert delta.abs().max() > 1e-3
        torch.testing.assert_close(merged.get_submodule(backbone).weight - before.weight, delta, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "options", [FullOptions(), BitfitOptions(), PeftOptions(peft_type="IA3", kwargs={"target_modules": ["v_proj"]})]
)
def test_non_lora_adapters_expose_no_views(options):
    model, _ = build("tiny-llama")
    adapter = build_adapter(options, "causal_lm")
    assert adapter.lora_modules(adapter.apply(model)) == {}


# ---- 4, 5. full and BitFit ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "head"), [("tiny-bert", "seq_cls"), ("tiny-gpt2", "causal_lm")])
def test_full_trains_everything_and_round_trips(name, head, tmp_path):
    model, tokenizer = build(name, head)
    adapter = build_adapter(FullOptions(), head)
    trained = adapter.apply(model)
    parameters = dict(trained.named_parameters())
    assert all(p.requires_grad for p in parameters.values())
    assert sum(p.numel() for p in trained.parameters() if p.requires_grad) == sum(p.numel() for p in model.parameters())
    perturb(trained, lambda n: True, scale=0.05)
    adapter.save(trained, tmp_path / "full")

    saved = load_file(str(tmp_path / "full" / "weights.safetensors"))
    assert saved.keys() == parameters.keys()
    assert all(torch.equal(saved[k], parameters[k].detach()) for k in saved)
    assert json.loads((tmp_path / "full" / "loralab.json").read_text()) == {"adapter": "full", "tensors": len(saved)}

    batch = batch_for(tokenizer)
    fresh = build(name, head)[0]
    base_logits = logits(fresh, batch)
    loaded = load_adapter(fresh, tmp_path / "full")
    torch.testing.assert_close(logits(loaded, batch), logits(trained, batch), rtol=0, atol=0)
    assert (logits(trained, batch) - base_logits).abs().max() > 1e-3
    assert all(p.requires_grad for p in loaded.parameters())


def bitfit_reference(model, train_layernorm):
    """By module type, not by name: biases, the head, and norm weights when asked."""
    names = set()
    for module_name, module in model.named_modules():
        is_norm = isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")
        in_head = module_name.split(".", 1)[0] in HEAD_MODULES
        for parameter_name, _ in module.named_parameters(recurse=False):
            if parameter_name == "bias" or in_head or (train_layernorm and is_norm):
                names.add(f"{module_name}.{parameter_name}")
    return names


@pytest.mark.parametrize("train_layernorm", [False, True])
@pytest.mark.parametrize("name", list(FAMILY))
def test_bitfit_trains_biases_head_and_optionally_norms(name, train_layernorm, tmp_path):
    model, tokenizer = build(name, "seq_cls")
    expected = bitfit_reference(model, train_layernorm)
    adapter = build_adapter(BitfitOptions(train_layernorm=train_layernorm), "seq_cls")
    trained = adapter.apply(model)
    assert {n for n, p in trained.named_parameters() if p.requires_grad} == expected
    perturb(trained, lambda n: n in expected, scale=0.5)
    adapter.save(trained, tmp_path / "bitfit")

    saved = load_file(str(tmp_path / "bitfit" / "weights.safetensors"))
    assert saved.keys() == expected
    assert json.loads((tmp_path / "bitfit" / "loralab.json").read_text()) == {
        "adapter": "bitfit",
        "tensors": len(saved),
    }
    batch = batch_for(tokenizer)
    fresh = build(name, "seq_cls")[0]
    base_logits = logits(fresh, batch)
    loaded = load_adapter(fresh, tmp_path / "bitfit")
    torch.testing.assert_close(logits(loaded, batch), logits(trained, batch), rtol=0, atol=0)
    assert (logits(trained, batch) - base_logits).abs().max() > 1e-3


def test_bitfit_layernorm_sets_differ_by_exactly_the_norm_weights():
    model, _ = build("tiny-bert", "seq_cls")
    norms = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)}
    trainable = {}
    for flag in (False, True):
        build_adapter(BitfitOptions(train_layernorm=flag), "seq_cls").apply(model)
        trainable[flag] = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable[True] - trainable[False] == norms and len(norms) == 5  # embeddings + 2 per layer


# ---- 6. any PEFT type ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("peft_type", "kwargs", "config", "hand_count"),
    [
        # (IA)3: one vector per k/v output (32 wide) and per down_proj input (128 wide), two layers
        (
            "IA3",
            {"target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]},
            "IA3Config",
            2 * (32 + 32 + 128),
        ),
        # LoHa r=4: two (out×4, 4×in) pairs on q (64×64) and v (32×64)
        (
            "loha",
            {"r": 4, "target_modules": ["q_proj", "v_proj"]},
            "LoHaConfig",
            2 * 2 * (4 * 64 + 4 * 64 + 4 * 32 + 4 * 64),
        ),
        # VeRA r=4: lambda_b (out) + lambda_d (r) per module; the shared A/B are frozen buffers
        ("vera", {"r": 4, "target_modules": ["q_proj", "v_proj"]}, "VeraConfig", 2 * ((64 + 4) + (32 + 4))),
    ],
)
def test_any_peft_type_matches_peft(peft_type, kwargs, config, hand_count):
    model, tokenizer = build("tiny-llama")
    reference = copy.deepcopy(model)
    torch.manual_seed(0)
    ours = build_adapter(PeftOptions(peft_type=peft_type, kwargs=kwargs), "causal_lm").apply(model)
    torch.manual_seed(0)
    theirs = get_peft_model(reference, getattr(peft, config)(task_type="CAUSAL_LM", **kwargs))
    assert type(ours.peft_config["default"]) is type(theirs.peft_config["default"])

    def count(m):
        return sum(p.numel() for p in m.parameters() if p.requires_grad)

    assert count(ours) == count(theirs) == hand_count
    our_params, their_params = dict(ours.named_parameters()), dict(theirs.named_parameters())
    assert our_params.keys() == their_params.keys()
    assert all(
        torch.equal(p, their_params[k]) and p.requires_grad == their_params[k].requires_grad
        for k, p in our_params.items()
    )
    batch = batch_for(tokenizer)
    torch.testing.assert_close(logits(ours, batch), logits(theirs, batch), rtol=0, atol=0)


def test_peft_adapter_round_trip(tmp_path):
    """An IA3 adapter saved by loralab loads through load_adapter and plain PeftModel to the same logits."""
    model, tokenizer = build("tiny-llama")
    kwargs = {"target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]}
    adapter = build_adapter(PeftOptions(peft_type="ia3", kwargs=kwargs), "causal_lm")
    trained = adapter.apply(model)
    perturb(trained, lambda n: "ia3_l" in n, scale=1.0)
    adapter.save(trained, tmp_path / "ia3")
    assert json.loads((tmp_path / "ia3" / "loralab.json").read_text()) == {"adapter": "peft", "peft_type": "ia3"}
    assert json.loads((tmp_path / "ia3" / "adapter_config.json").read_text())["peft_type"] == "IA3"
    batch = batch_for(tokenizer)
    expected = logits(trained, batch)
    assert (expected - logits(build("tiny-llama")[0], batch)).abs().max() > 1e-3
    ours = load_adapter(build("tiny-llama")[0], tmp_path / "ia3")
    theirs = PeftModel.from_pretrained(build("tiny-llama")[0], tmp_path / "ia3")
    torch.testing.assert_close(logits(ours, batch), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(theirs, batch), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("peft_type", "hint"), [("LORAA", "LORA"), ("loraa", "LORA"), ("ia4", "IA3"), ("lohaa", "LOHA")]
)
def test_unknown_peft_type_suggests_the_closest(peft_type, hint):
    with pytest.raises(ConfigError) as error:
        build_adapter(PeftOptions(peft_type=peft_type), "causal_lm")
    message = one_line(error)
    assert message.startswith("method.adapter.peft_type: unknown PEFT type") and f"(did you mean '{hint}'?)" in message


@pytest.mark.parametrize(
    "kwargs",
    [
        {"not_an_option": 1},
        {"target_modules": ["k_proj"], "feedforward_modules": ["down_proj"]},  # PEFT: feedforward ⊄ targets
    ],
)
def test_bad_peft_kwargs_are_a_config_error(kwargs):
    """Refused when the adapter is built, before any model is loaded."""
    with pytest.raises(ConfigError) as error:
        build_adapter(PeftOptions(peft_type="IA3", kwargs=kwargs), "causal_lm")
    assert one_line(error).startswith("method.adapter.kwargs for PEFT type IA3: ")


# ---- 7. LoRA save/load --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "head", "options"),
    [
        ("tiny-bert", "seq_cls", {}),
        ("tiny-gpt2", "causal_lm", {"r": 4}),
        ("tiny-llama", "causal_lm", {"r": 4, "use_dora": True, "use_rslora": True, "target_modules": "extended"}),
    ],
)
def test_lora_round_trip_through_loralab_and_plain_peft(name, head, options, tmp_path):
    model, tokenizer = build(name, head)
    adapter = build_adapter(LoraOptions(**options), head)
    trained = adapter.apply(model)
    perturb(trained, lambda n: "lora_B" in n or "modules_to_save" in n)
    directory = tmp_path / "adapter"
    adapter.save(trained, directory)

    assert {p.name for p in directory.iterdir()} == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "loralab.json",
        "README.md",
    }
    assert json.loads((directory / "loralab.json").read_text()) == {"adapter": "lora"}
    config = json.loads((directory / "adapter_config.json").read_text())
    assert (config["peft_type"], config["task_type"], config["r"]) == ("LORA", head.upper(), options.get("r", 8))
    flags = (options.get("use_dora", False), options.get("use_rslora", False))
    assert (config["use_dora"], config["use_rslora"]) == flags
    saved = load_file(str(directory / "adapter_model.safetensors"))
    reference = get_peft_model_state_dict(trained)
    assert saved.keys() == reference.keys()
    assert all(torch.equal(saved[k], reference[k]) for k in saved)
    assert sum(t.numel() for t in saved.values()) == sum(p.numel() for p in trained.parameters() if p.requires_grad)

    batch = batch_for(tokenizer)
    expected = logits(trained, batch)
    assert (expected - logits(build(name, head)[0], batch)).abs().max() > 1e-3
    ours = load_adapter(build(name, head)[0], directory)
    theirs = PeftModel.from_pretrained(build(name, head)[0], directory)
    torch.testing.assert_close(logits(ours, batch), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(theirs, batch), expected, rtol=0, atol=1e-6)


# ---- 8. loading errors --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_adapters(tmp_path_factory):
    """A LoRA (BERT, seq_cls) and a full-fine-tuning (BERT, seq_cls) adapter directory, saved once."""
    root = tmp_path_factory.mktemp("adapters")
    for options in (LoraOptions(), FullOptions()):
        adapter = build_adapter(options, "seq_cls")
        adapter.save(adapter.apply(build("tiny-bert", "seq_cls")[0]), root / options.kind)
    return root


def damage(directory, file, how):
    path = directory / file
    if how == "delete":
        path.unlink()
    elif how == "truncate":
        path.write_bytes(path.read_bytes()[:-64])
    elif how == "empty":
        path.write_bytes(b"")
    else:
        path.write_bytes(how.encode())


LORA_DAMAGE = [
    ("adapter_model.safetensors", "truncate", "corrupt safetensors file"),
    ("adapter_model.safetensors", "empty", "corrupt safetensors file"),
    ("adapter_model.safetensors", "definitely not safetensors", "corrupt safetensors file"),
    ("adapter_model.safetensors", "delete", "adapter weights missing"),
    ("adapter_config.json", "{not json", "malformed JSON in"),
    ("adapter_config.json", "[1, 2]", "expected a JSON object"),
    ("adapter_config.json", "{}", "has no peft_type: not a PEFT adapter config"),
    ("adapter_config.json", '{"peft_type": "NOPE"}', "unknown PEFT type 'NOPE'"),
    ("adapter_config.json", "delete", "is not an adapter directory"),
    ("loralab.json", "{", "malformed JSON in"),
]


@pytest.mark.parametrize(("file", "how", "message"), LORA_DAMAGE, ids=[f"{f}-{h[:12]}" for f, h, _ in LORA_DAMAGE])
def test_damaged_lora_directory_is_an_adapter_error(saved_adapters, tmp_path, file, how, message):
    directory = shutil.copytree(saved_adapters / "lora", tmp_path / "lora")
    load_adapter(build("tiny-bert", "seq_cls")[0], directory)  # intact, it loads
    damage(directory, file, how)
    with pytest.raises(AdapterError) as error:
        load_adapter(build("tiny-bert", "seq_cls")[0], directory)
    assert message in one_line(error) and str(directory) in str(error.value)


@pytest.mark.parametrize(
    ("how", "message"), [("truncate", "corrupt safetensors file"), ("delete", "adapter weights missing")]
)
def test_damaged_full_directory_is_an_adapter_error(saved_adapters, tmp_path, how, message):
    directory = shutil.copytree(saved_adapters / "full", tmp_path / "full")
    damage(directory, "weights.safetensors", how)
    with pytest.raises(AdapterError) as error:
        load_adapter(build("tiny-bert", "seq_cls")[0], directory)
    assert message in one_line(error)


def test_missing_directory_is_an_adapter_error(tmp_path):
    with pytest.raises(AdapterError) as error:
        load_adapter(build("tiny-bert", "seq_cls")[0], tmp_path / "nowhere")
    assert one_line(error) == f"adapter directory not found: {tmp_path / 'nowhere'}"


@pytest.mark.parametrize(
    ("kind", "target", "message"),
    [
        ("lora", "tiny-llama", "No modules were targeted"),  # no module named query/value
        ("lora", "tiny-roberta", "classifier"),  # same LoRA targets, another classification head
        ("full", "tiny-roberta", "does not fit this base model"),  # parameters of another model
    ],
)
def test_adapter_for_another_architecture_is_refused(saved_adapters, kind, target, message):
    with pytest.raises(AdapterError) as error:
        load_adapter(build(target, "seq_cls")[0], saved_adapters / kind)
    assert message in one_line(error)


def test_same_target_names_on_another_architecture_are_refused(tmp_path):
    """A BERT LoRA on RoBERTa: PEFT finds query/value layers but none of their weights, and only warns."""
    adapter = build_adapter(LoraOptions(), "causal_lm")
    trained = adapter.apply(build("tiny-bert", "causal_lm")[0])
    perturb(trained, lambda n: "lora_B" in n)
    adapter.save(trained, tmp_path / "bert")
    with pytest.raises(AdapterError) as error:
        load_adapter(build("tiny-roberta", "causal_lm")[0], tmp_path / "bert")
    assert "another architecture" in one_line(error)
    # the reference: plain PEFT loads it, leaving the LoRA layers at their zero initialisation
    with pytest.warns(UserWarning, match="Found missing adapter keys"):
        theirs = PeftModel.from_pretrained(build("tiny-roberta", "causal_lm")[0], tmp_path / "bert")
    assert all(not p.any() for n, p in theirs.named_parameters() if "lora_B" in n)
