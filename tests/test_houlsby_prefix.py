"""Houlsby adapters and prefix tuning against hand computations: identity, placement, counts, dense attention."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import DistilBertConfig, DistilBertForSequenceClassification
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from conftest import one_line, perturb
from loralab.adapters import build_adapter, load_adapter
from loralab.adapters.houlsby import Bottleneck, HoulsbyAdapter, bottleneck_parameters
from loralab.adapters.prefix import ENCODER, PrefixAdapter, PrefixEncoder, extend_mask
from loralab.config import load_config
from loralab.config.schema import HoulsbyOptions, ModelConfig, PrefixOptions
from loralab.errors import AdapterError, ConfigError
from loralab.models import load_model
from loralab.models.presets import build_tiny, tiny_tokenizer

BASE = ModelConfig("tiny-bert", "auto", "float32", "none", False, False, None)
TEXTS = ["a short one", "a somewhat longer sentence, with $3.50"]
OWNER = {"bert": "bert", "roberta": "roberta", "llama": "model", "gpt2": "transformer"}
ENCODERS = [
    ("tiny-bert", "seq_cls"),
    ("tiny-bert", "masked_lm"),
    ("tiny-roberta", "seq_cls"),
    ("tiny-roberta", "masked_lm"),
]
ALL_HEADS = [*ENCODERS, ("tiny-llama", "causal_lm"), ("tiny-llama", "seq_cls"), ("tiny-gpt2", "causal_lm")]


def build(name, head="seq_cls"):
    """A fresh model (bit-identical in every call for tiny presets) and its tokenizer."""
    if name == "minilm":
        return load_model(dataclasses.replace(BASE, name="minilm"), head, 2 if head == "seq_cls" else None)
    return build_tiny(name, head, 2 if head == "seq_cls" else None), tiny_tokenizer(name)


def encode(tokenizer, texts=TEXTS):
    return tokenizer(list(texts), padding=True, return_tensors="pt")


def logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def trainable(model):
    return {name for name, parameter in model.named_parameters() if parameter.requires_grad}


def head_names(model):
    return {name for name, _ in model.named_parameters() if name.split(".")[0] in ("classifier", "score")}


def tiny_distilbert():
    config = DistilBertConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, hidden_dim=64, max_position_embeddings=32)
    return DistilBertForSequenceClassification(config)


def gelu(z):
    return 0.5 * z * (1 + torch.erf(z / math.sqrt(2)))


def round_trip(tmp_path, options, name, head, weights):
    """Apply, perturb what trains, save, load onto a fresh base; the logits must agree. (model, loaded, saved, side)"""
    model, tokenizer = build(name, head)
    adapter = build_adapter(options, head)
    adapter.apply(model)
    names = trainable(model)
    perturb(model, lambda n: n in names, scale=0.2)
    adapter.save(model, tmp_path)
    loaded = load_adapter(build(name, head)[0], tmp_path)
    batch = encode(tokenizer)
    assert torch.allclose(logits(loaded, batch), logits(model, batch), atol=1e-6, rtol=0)
    saved = load_file(str(tmp_path / f"{weights}.safetensors"))
    return model, loaded, saved, json.loads((tmp_path / "loralab.json").read_text())


# ---- Houlsby adapters -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "head"), [*ALL_HEADS, ("minilm", "seq_cls")])
def test_houlsby_is_the_identity_at_init(name, head):
    model, tokenizer = build(name, head)
    batch = encode(tokenizer)
    before = logits(model, batch)
    HoulsbyAdapter(bottleneck=16).apply(model)
    wrapped = [m for m in model.modules() if isinstance(m, Bottleneck)]
    assert wrapped and all(not m.up.weight.any() and not m.up.bias.any() and not m.down.bias.any() for m in wrapped)
    assert 0 < wrapped[0].down.weight.std().item() < 2e-3
    assert torch.allclose(logits(model, batch), before, atol=1e-6, rtol=0)


@pytest.mark.parametrize(("name", "head"), [*ALL_HEADS, ("tiny-gpt2", "seq_cls")])
def test_houlsby_wraps_exactly_the_attention_and_ffn_output_projections(name, head):
    model, _ = build(name, head)
    HoulsbyAdapter(bottleneck=8).apply(model)
    family = model.config.model_type
    layers = range(model.config.num_hidden_layers)
    owner = OWNER[family]
    leaves = {
        "bert": ("encoder.layer.{}.attention.output.dense", "encoder.layer.{}.output.dense"),
        "roberta": ("encoder.layer.{}.attention.output.dense", "encoder.layer.{}.output.dense"),
        "llama": ("layers.{}.self_attn.o_proj", "layers.{}.mlp.down_proj"),
        "gpt2": ("h.{}.attn.c_proj", "h.{}.mlp.c_proj"),
    }[family]
    expected = {f"{owner}.{leaf.format(i)}" for i in layers for leaf in leaves}
    assert {n for n, m in model.named_modules() if isinstance(m, Bottleneck)} == expected
    assert len(expected) == 2 * model.config.num_hidden_layers
    HoulsbyAdapter(bottleneck=8).apply(model)  # applying again wraps nothing twice
    assert sum(isinstance(m, Bottleneck) for m in model.modules()) == len(expected)
    assert not any(isinstance(m.base, Bottleneck) for m in model.modules() if isinstance(m, Bottleneck))


@pytest.mark.parametrize(("name", "head"), ALL_HEADS)
def test_houlsby_trainable_parameters_are_the_bottlenecks_and_the_head(name, head):
    model, _ = build(name, head)
    bottleneck = 8
    HoulsbyAdapter(bottleneck).apply(model)
    d, layers = model.config.hidden_size, model.config.num_hidden_layers
    head_count = {  # classifier/score by hand: BERT Linear(d, 2); RoBERTa dense d×d + out_proj; Llama no bias
        ("bert", "seq_cls"): d * 2 + 2,
        ("roberta", "seq_cls"): d * d + d + d * 2 + 2,
        ("llama", "seq_cls"): d * 2,
    }.get((model.config.model_type, head), 0)
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert count == 2 * layers * (2 * d * bottleneck + bottleneck + d) + head_count
    assert trainable(model) == bottleneck_parameters(model) | head_names(model)


@pytest.mark.parametrize(("name", "index", "which"), [("tiny-bert", 0, "attention"), ("tiny-gpt2", 1, "ffn")])
def test_houlsby_module_output_is_y_plus_up_gelu_down_y(name, index, which):
    model, tokenizer = build(name, "seq_cls")
    HoulsbyAdapter(bottleneck=8).apply(model)
    perturb(model, lambda n: ".down." in n or ".up." in n, scale=0.5)
    wrapped = [m for m in model.modules() if isinstance(m, Bottleneck)][2 * index + (which == "ffn")]
    seen = {}
    wrapped.register_forward_hook(lambda module, args, out: seen.update(x=args[0], out=out))
    logits(model, encode(tokenizer))
    x, base = seen["x"], wrapped.base
    y = x @ base.weight.T + base.bias if isinstance(base, torch.nn.Linear) else x @ base.weight + base.bias  # Conv1D
    down, up = wrapped.down, wrapped.up
    expected = y + gelu(y @ down.weight.T + down.bias) @ up.weight.T + up.bias
    assert (expected - y).abs().max() > 1e-2  # the bottleneck really adds something
    assert torch.allclose(seen["out"], expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("name", "head"), [("tiny-bert", "seq_cls"), ("tiny-bert", "masked_lm"), ("tiny-llama", "causal_lm")]
)
def test_houlsby_save_then_load_on_a_fresh_base_gives_the_same_logits(tmp_path, name, head):
    model, loaded, saved, side = round_trip(tmp_path, HoulsbyOptions(bottleneck=8), name, head, "houlsby")
    assert saved.keys() == trainable(model) == trainable(loaded)
    assert side == {"adapter": "houlsby", "bottleneck": 8, "modules": HoulsbyAdapter().targets(model)}


def test_houlsby_training_changes_only_bottleneck_and_head_tensors():
    model, tokenizer = build("tiny-bert", "seq_cls")
    HoulsbyAdapter(bottleneck=8).apply(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)  # every parameter: freezing must hold them
    batch = encode(tokenizer)
    model.train()
    for _ in range(3):
        loss = model(**batch, labels=torch.tensor([0, 1])).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == bottleneck_parameters(model) | head_names(model)


# ---- prefix tuning: dense references ----------------------------------------------------------------------


def dense_attention(q, k, v, prefix_k, prefix_v, allowed):
    """softmax(q·[Pk;k]ᵀ/√d + mask)·[Pv;v] per head; `allowed` (batch × q × kv) over the real keys only."""
    batch, heads = q.shape[:2]
    groups = heads // k.shape[1]
    keys = torch.cat([prefix_k.expand(batch, -1, -1, -1), k], dim=2).repeat_interleave(groups, dim=1)
    values = torch.cat([prefix_v.expand(batch, -1, -1, -1), v], dim=2).repeat_interleave(groups, dim=1)
    scores = q @ keys.transpose(-1, -2) / math.sqrt(q.shape[-1])
    visible = torch.cat([torch.ones(*allowed.shape[:2], prefix_k.shape[1], dtype=torch.bool), allowed], dim=-1)
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    out = torch.softmax(scores, dim=-1) @ values  # batch × heads × q × head_dim
    return out.transpose(1, 2).reshape(batch, q.shape[2], -1)


def heads_of(tensor, head_dim):
    return tensor.view(*tensor.shape[:2], -1, head_dim).transpose(1, 2)


def encoder_attention(model):
    return model.base_model.encoder.layer


@pytest.mark.parametrize(
    ("name", "head", "implementation", "layers"),
    [
        ("tiny-bert", "seq_cls", "sdpa", [0, 1]),
        ("tiny-bert", "seq_cls", "eager", [0, 1]),
        ("tiny-bert", "masked_lm", "sdpa", [0, 1]),
        ("tiny-roberta", "seq_cls", "sdpa", [1]),
        ("tiny-roberta", "masked_lm", "eager", [1]),
        ("minilm", "seq_cls", "sdpa", [2]),
    ],
)
def test_prefix_encoder_attention_matches_a_dense_reference(name, head, implementation, layers):
    model, tokenizer = build(name, head)
    model.config._attn_implementation = implementation
    batch = encode(tokenizer)
    base_logits = logits(model, batch)
    PrefixAdapter(num_virtual_tokens=8).apply(model)
    assert model.config._attn_implementation == f"loralab_prefix_{implementation}"
    seen = {}
    for index in layers:
        attention = encoder_attention(model)[index].attention.self
        for part in ("query", "key", "value"):
            hook = lambda module, args, out, key=(index, part): seen.update({key: out})  # noqa: E731
            getattr(attention, part).register_forward_hook(hook)
        attention.register_forward_hook(lambda module, args, out, key=(index, "out"): seen.update({key: out[0]}))
    assert not torch.allclose(logits(model, batch), base_logits, atol=1e-6)
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    allowed = batch["attention_mask"].bool()[:, None, :].expand(-1, batch["input_ids"].shape[1], -1)
    for index in layers:
        q, k, v = (heads_of(seen[index, part], head_dim) for part in ("query", "key", "value"))
        prefix_k, prefix_v = (t.detach() for t in getattr(model, ENCODER).layer(index))
        assert prefix_k.shape == (model.config.num_attention_heads, 8, head_dim)
        expected = dense_attention(q, k, v, prefix_k, prefix_v, allowed)
        assert torch.allclose(seen[index, "out"], expected, atol=1e-5, rtol=0)
        without = dense_attention(q, k, v, prefix_k[:, :0], prefix_v[:, :0], allowed)
        assert (seen[index, "out"] - without).abs().max() > 1e-3  # the prefix changes what attention returns


@pytest.mark.parametrize(("implementation", "padded"), [("sdpa", True), ("sdpa", False), ("eager", True)])
def test_prefix_llama_gqa_attention_matches_a_dense_causal_reference(implementation, padded):
    model, tokenizer = build("tiny-llama", "causal_lm")
    model.config._attn_implementation = implementation
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    PrefixAdapter(num_virtual_tokens=5, projection_hidden=32).apply(model)
    batch = encode(tokenizer, TEXTS if padded else TEXTS[1:])
    attention = model.model.layers[1].self_attn
    seen = {}
    for part in ("q_proj", "k_proj", "v_proj"):
        getattr(attention, part).register_forward_hook(lambda module, args, out, key=part: seen.update({key: out}))
    attention.register_forward_pre_hook(
        lambda m, args, kwargs: seen.update(rope=kwargs["position_embeddings"]), with_kwargs=True
    )
    attention.o_proj.register_forward_pre_hook(lambda module, args: seen.update(out=args[0]))
    logits(model, batch)
    head_dim = attention.head_dim
    q, k, v = (heads_of(seen[part], head_dim) for part in ("q_proj", "k_proj", "v_proj"))
    q, k = apply_rotary_pos_emb(q, k, *seen["rope"])
    prefix_k, prefix_v = (t.detach() for t in model.loralab_prefix.layer(1))
    assert prefix_k.shape == (model.config.num_key_value_heads, 5, head_dim)
    length = batch["input_ids"].shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    allowed = causal[None] & batch["attention_mask"].bool()[:, None, :]
    assert torch.allclose(seen["out"], dense_attention(q, k, v, prefix_k, prefix_v, allowed), atol=1e-5, rtol=0)


def test_extend_mask_shows_every_prefix_to_every_query():
    query, key = torch.zeros(2, 4, 3, 8), torch.zeros(2, 2, 5, 8)  # 3 queries, 5 keys (2 cached), GQA 4 over 2
    assert extend_mask(None, query, key, 2, False, "sdpa") is None  # encoder: full attention stays full
    assert extend_mask(None, query[:, :, :1], key, 2, True, "sdpa") is None  # one decoding query sees all
    causal = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(extend_mask(None, query, key, 2, True, "sdpa"), causal[None, None])  # aligned at the last key
    additive = extend_mask(None, query, key, 2, True, "eager")
    assert additive.dtype == torch.float32 and torch.equal(additive == 0, causal[None, None])
    assert torch.all(additive[~causal[None, None]] == torch.finfo(torch.float32).min)
    padding = torch.tensor([[1, 1, 1, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)[:, None, None, :].expand(-1, 1, 3, -1)
    extended = extend_mask(padding, query, key, 2, False, "sdpa")
    assert extended.shape == (2, 1, 3, 7) and extended[..., :2].all() and torch.equal(extended[..., 2:], padding)
    floats = torch.zeros(2, 1, 3, 5).masked_fill(~padding, -1e9)
    extended = extend_mask(floats, query, key, 2, False, "eager")
    assert torch.equal(extended[..., :2], torch.zeros(2, 1, 3, 2)) and torch.equal(extended[..., 2:], floats)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize(("name", "head"), [*ALL_HEADS, ("tiny-gpt2", "seq_cls")])
def test_prefix_padded_batch_matches_each_example_alone(name, head, implementation):
    model, tokenizer = build(name, head)
    model.config._attn_implementation = implementation
    PrefixAdapter(num_virtual_tokens=6).apply(model)
    perturb(model, lambda n: n.startswith(ENCODER + "."), scale=0.3)
    together = logits(model, encode(tokenizer))
    for row, text in enumerate(TEXTS):
        alone = logits(model, encode(tokenizer, [text]))
        got = together[row] if head == "seq_cls" else together[row, : alone.shape[1]]
        assert torch.allclose(got, alone[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("projection", [True, False])
@pytest.mark.parametrize(
    ("name", "head"), [("tiny-bert", "seq_cls"), ("tiny-roberta", "masked_lm"), ("tiny-llama", "causal_lm")]
)
def test_prefix_gradient_reaches_the_prefix_parameters(name, head, projection):
    model, tokenizer = build(name, head)
    PrefixAdapter(num_virtual_tokens=4, projection=projection).apply(model)
    encoder = getattr(model, ENCODER)
    names = {f"{ENCODER}.{n}" for n, _ in encoder.named_parameters()}
    assert trainable(model) == names | head_names(model)
    assert names == (
        {f"{ENCODER}.{n}" for n in ("embedding", "mlp_in.weight", "mlp_in.bias", "mlp_out.weight", "mlp_out.bias")}
        if projection
        else {f"{ENCODER}.prefix"}
    )
    batch = encode(tokenizer)
    model.train()
    out = model(**batch, labels=torch.tensor([0, 1]) if head == "seq_cls" else batch["input_ids"])
    out.loss.backward()
    for n, parameter in model.named_parameters():
        if n in names:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, n
        elif n not in head_names(model):
            assert parameter.grad is None, n


@pytest.mark.parametrize(
    ("name", "head"),
    [("tiny-bert", "seq_cls"), ("tiny-bert", "masked_lm"), ("tiny-roberta", "masked_lm"), ("tiny-llama", "causal_lm")],
)
def test_prefix_save_then_load_on_a_fresh_base_gives_the_same_logits(tmp_path, name, head):
    model, loaded, saved, side = round_trip(tmp_path, PrefixOptions(num_virtual_tokens=7), name, head, "prefix")
    assert saved.keys() == {f"{ENCODER}.prefix"} | head_names(model)
    config = model.config
    kv_heads = getattr(config, "num_key_value_heads", config.num_attention_heads)
    head_dim = config.hidden_size // config.num_attention_heads
    assert saved[f"{ENCODER}.prefix"].shape == (config.num_hidden_layers, 2, kv_heads, 7, head_dim)
    keys, values = model.loralab_prefix.layer(1)
    assert torch.equal(saved[f"{ENCODER}.prefix"][1, 0], keys.detach())
    assert torch.equal(saved[f"{ENCODER}.prefix"][1, 1], values.detach())
    assert side["adapter"] == "prefix" and (side["num_virtual_tokens"], side["layers"]) == (7, config.num_hidden_layers)
    assert not loaded.loralab_prefix.projection  # the fixed prefixes, no MLP
    assert trainable(loaded) == {f"{ENCODER}.prefix"} | head_names(loaded)
    again = tmp_path / "again"
    PrefixAdapter().save(loaded, again)  # a loaded adapter saves the same prefixes again
    assert torch.equal(load_file(str(again / "prefix.safetensors"))[f"{ENCODER}.prefix"], saved[f"{ENCODER}.prefix"])


def test_prefix_generation_with_a_cache_matches_full_recomputation():
    model, tokenizer = build("tiny-llama", "causal_lm")
    PrefixAdapter(num_virtual_tokens=4).apply(model)
    perturb(model, lambda n: n.startswith(ENCODER + "."), scale=0.3)
    prompt = tokenizer(["a prompt"], return_tensors="pt")
    model.eval()
    with torch.no_grad():
        generated = model.generate(**prompt, max_new_tokens=5, do_sample=False, use_cache=True)
        ids = prompt["input_ids"]
        for _ in range(5):  # greedy without a cache: the whole sequence each step
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated[:, : ids.shape[1]], ids)


# ---- configuration and bad input ----------------------------------------------------------------------------


def test_method_presets_adapters_and_prefix():
    houlsby = load_config([], ["method.name=adapters"]).method
    assert houlsby.adapter == HoulsbyOptions(bottleneck=64) and houlsby.gradient.kind == "none"
    assert isinstance(build_adapter(houlsby.adapter, "seq_cls"), HoulsbyAdapter)
    prefix = load_config([], ["method.name=prefix"]).method.adapter
    assert prefix == PrefixOptions(num_virtual_tokens=32, projection=True, projection_hidden=None)
    assert isinstance(build_adapter(prefix, "seq_cls"), PrefixAdapter)
    with pytest.raises(ConfigError, match="bottleneck"):
        load_config([], ["method.name=adapters", "method.adapter.bottleneck=0"])


@pytest.mark.parametrize("adapter", [HoulsbyAdapter(), PrefixAdapter()])
def test_unknown_family_is_a_one_line_config_error(adapter):
    with pytest.raises(ConfigError) as error:
        adapter.apply(tiny_distilbert())
    assert "'distilbert'" in one_line(error) and "bert, gpt2, llama, roberta" in one_line(error)


def test_prefix_needs_sdpa_or_eager_attention():
    model, _ = build("tiny-bert")
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(ConfigError) as error:
        PrefixAdapter().apply(model)
    assert "sdpa" in one_line(error) and "flex_attention" in one_line(error)


def saved_adapter(tmp_path, kind):
    model, _ = build("tiny-bert")
    adapter = HoulsbyAdapter(4) if kind == "houlsby" else PrefixAdapter(3)
    adapter.apply(model)
    directory = tmp_path / kind
    adapter.save(model, directory)
    return directory, f"{kind}.safetensors"


def corrupt(directory, weights):
    (directory / weights).write_bytes(b"\x00garbage")


def drop_a_tensor(directory, weights):
    tensors = load_file(str(directory / weights))
    tensors.pop(sorted(tensors)[0])
    save_file(tensors, str(directory / weights))


def edit_side(**changes):
    def edit(directory, weights):
        side = json.loads((directory / "loralab.json").read_text())
        (directory / "loralab.json").write_text(json.dumps({**side, **changes}))

    return edit


@pytest.mark.parametrize("kind", ["houlsby", "prefix"])
@pytest.mark.parametrize(
    ("damage", "base", "message"),
    [
        (lambda d, w: (d / w).unlink(), "tiny-bert", "adapter weights missing"),
        (corrupt, "tiny-bert", "corrupt safetensors file"),
        (lambda d, w: (d / "loralab.json").write_text("{not json"), "tiny-bert", "malformed JSON"),
        (drop_a_tensor, "tiny-bert", "is missing"),
        (edit_side(adapter="bitfit"), "tiny-bert", "holds a 'bitfit' adapter"),
        (lambda d, w: None, "tiny-llama", "not fit|other modules"),
    ],
)
def test_bad_adapter_files_are_one_line_adapter_errors(tmp_path, kind, damage, base, message):
    directory, weights = saved_adapter(tmp_path, kind)
    damage(directory, weights)
    model, _ = build(base)
    with pytest.raises(AdapterError, match=message) as error:
        (HoulsbyAdapter() if kind == "houlsby" else PrefixAdapter()).load(model, directory)
    one_line(error)


@pytest.mark.parametrize(
    ("kind", "field"), [("houlsby", {"bottleneck": "wide"}), ("prefix", {"num_virtual_tokens": 0})]
)
def test_bad_side_file_values_are_adapter_errors(tmp_path, kind, field):
    directory, weights = saved_adapter(tmp_path, kind)
    edit_side(**field)(directory, weights)
    with pytest.raises(AdapterError, match="positive integer") as error:
        load_adapter(build("tiny-bert")[0], directory)
    one_line(error)


def test_missing_directory_is_an_adapter_error(tmp_path):
    with pytest.raises(AdapterError, match="not found"):
        HoulsbyAdapter().load(build("tiny-bert")[0], tmp_path / "nowhere")
    with pytest.raises(AdapterError, match="not found"):
        PrefixAdapter().load(build("tiny-bert")[0], tmp_path / "nowhere")


def test_prefix_encoder_is_a_plain_module_of_the_model():
    model, _ = build("tiny-bert", "masked_lm")
    PrefixAdapter(num_virtual_tokens=3).apply(model)
    assert isinstance(model.loralab_prefix, PrefixEncoder)
    attention = [m for n, m in model.named_modules() if n.endswith("attention.self")]
    # the link to the encoder is not a submodule: parameters are listed once, under loralab_prefix
    assert all(not any(isinstance(c, PrefixEncoder) for c in m.children()) for m in attention)
    assert [n for n in model.state_dict() if "loralab_prefix" in n] == [
        f"{ENCODER}.{n}" for n in model.loralab_prefix.state_dict()
    ]
