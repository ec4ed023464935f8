"""Models: the byte tokenizer, tiny presets (heads, determinism), local directories, MiniLM, load errors."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoTokenizer

from loralab.config.schema import ModelConfig
from loralab.errors import ModelError
from loralab.models import PRESETS, is_preset, load_model, load_tokenizer, model_family
from loralab.models.presets import minilm_directory
from loralab.models.tokenizer import SPECIALS, byte_tokenizer

BASE = ModelConfig(
    name="tiny-llama",
    kind="auto",
    dtype="float32",
    quantization="none",
    gradient_checkpointing=False,
    trust_remote_code=False,
    dropout=None,
)
TRICKY = [
    "1,234,567 apples",
    "#### -12",
    "It costs $3.50.\nThen $1,000!",
    "  leading and trailing  ",
    "line one\n\nline three\t tab",
    "héllo wörld — naïve café, 日本語, 😀",
    "",
]
PRESET_HEADS = [
    ("tiny-llama", "causal_lm"),
    ("tiny-llama", "seq_cls"),
    ("tiny-gpt2", "causal_lm"),
    ("tiny-gpt2", "seq_cls"),
    ("tiny-bert", "masked_lm"),
    ("tiny-bert", "seq_cls"),
    ("tiny-roberta", "masked_lm"),
    ("tiny-roberta", "seq_cls"),
]
SECOND_HEAD = {
    "tiny-llama": "causal_lm",
    "tiny-gpt2": "causal_lm",
    "tiny-bert": "masked_lm",
    "tiny-roberta": "masked_lm",
    "minilm": "masked_lm",
}


def config(name: str, **changes) -> ModelConfig:
    return dataclasses.replace(BASE, name=name, **changes)


def batch(tokenizer, texts=("a short one", "a somewhat longer sentence, with $3.50")):
    return tokenizer(list(texts), padding=True, return_tensors="pt")


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---- byte tokenizer -------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert", "roberta"])
def test_byte_tokenizer_round_trips_any_text(family):
    tokenizer = byte_tokenizer(family)
    for text in TRICKY:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == text
        assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text


def test_byte_tokenizer_special_tokens():
    tokenizer = byte_tokenizer("gpt2")
    ids = {name: getattr(tokenizer, f"{name}_id") for name in SPECIALS}
    assert None not in ids.values()
    assert len(set(ids.values())) == len(SPECIALS)
    assert tokenizer.pad_token == "<pad>" and tokenizer.pad_token_id == 0
    assert len(tokenizer) == len(SPECIALS) + 256


def test_byte_tokenizer_family_layouts():
    def ids(family, *texts):
        return byte_tokenizer(family)(*texts)

    probe = byte_tokenizer("gpt2")
    bos, cls, sep = probe.bos_token_id, probe.cls_token_id, probe.sep_token_id
    plain = ids("gpt2", "ab")["input_ids"]
    assert ids("llama", "ab")["input_ids"] == [bos, *plain]
    assert ids("bert", "ab")["input_ids"] == [cls, *plain, sep]
    pair = ids("bert", "ab", "c")
    assert pair["input_ids"] == [cls, *plain, sep, *ids("gpt2", "c")["input_ids"], sep]
    assert pair["token_type_ids"] == [0, 0, 0, 0, 1, 1]
    assert ids("roberta", "ab", "c")["input_ids"] == pair["input_ids"]
    assert "token_type_ids" not in ids("roberta", "ab", "c") and "token_type_ids" not in ids("gpt2", "ab")


def test_byte_tokenizer_save_load_round_trip(tmp_path):
    tokenizer = byte_tokenizer("bert")
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    for text in TRICKY:
        assert loaded(text, "pair") == tokenizer(text, "pair")
        assert loaded.decode(loaded(text, add_special_tokens=False)["input_ids"]) == text
    assert (loaded.pad_token_id, loaded.mask_token_id, loaded.model_max_length) == (
        tokenizer.pad_token_id,
        tokenizer.mask_token_id,
        tokenizer.model_max_length,
    )


# ---- presets --------------------------------------------------------------------------------------


def test_preset_names():
    assert set(PRESETS) == {"tiny-llama", "tiny-gpt2", "tiny-bert", "tiny-roberta", "minilm"}
    assert is_preset("tiny-bert") and not is_preset("bert-base-uncased")


@pytest.mark.parametrize(("name", "head"), PRESET_HEADS)
def test_preset_heads_forward(name, head):
    model, tokenizer = load_model(config(name), head, num_labels=3 if head == "seq_cls" else None)
    inputs = batch(tokenizer)
    with torch.no_grad():
        logits = model(**inputs).logits
    expected = (2, 3) if head == "seq_cls" else (*inputs["input_ids"].shape, len(tokenizer))
    assert tuple(logits.shape) == expected
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert model_family(model) == name.removeprefix("tiny-")


def test_regression_head():
    model, tokenizer = load_model(config("tiny-gpt2"), "seq_cls", num_labels=1)
    assert model.config.problem_type == "regression"
    loss = model(**batch(tokenizer), labels=torch.tensor([0.5, -1.0])).loss
    assert loss.ndim == 0


@pytest.mark.parametrize("name", PRESETS)
def test_presets_are_deterministic_and_share_the_backbone(name):
    torch.manual_seed(0)
    first, _ = load_model(config(name), "seq_cls", num_labels=2)
    torch.manual_seed(12345)
    torch.rand(7)
    second, _ = load_model(config(name), "seq_cls", num_labels=2)
    assert same_state(first, second)

    other, _ = load_model(config(name), SECOND_HEAD[name])
    shared, backbone = other.base_model.state_dict(), first.base_model.state_dict()
    assert len(shared) > 10
    for key, value in shared.items():
        assert torch.equal(value, backbone[key]), key


def test_preset_leaves_the_global_rng_alone():
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    load_model(config("tiny-llama"), "causal_lm")
    assert torch.equal(torch.rand(3), expected)


def test_bfloat16_weights():
    model, _ = load_model(config("tiny-llama", dtype="bfloat16"), "causal_lm")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    full, _ = load_model(config("tiny-llama"), "causal_lm")
    assert torch.equal(model.lm_head.weight, full.lm_head.weight.to(torch.bfloat16))


def test_gradient_checkpointing_trains():
    model, tokenizer = load_model(config("tiny-llama", gradient_checkpointing=True), "causal_lm")
    assert any(getattr(module, "gradient_checkpointing", False) for module in model.modules())
    assert model.config.use_cache is False
    model.train()
    inputs = batch(tokenizer)
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    assert model.lm_head.weight.grad is not None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
@pytest.mark.parametrize("name", ["tiny-bert", "tiny-gpt2", "minilm"])
def test_dropout_override_makes_training_mode_deterministic(name, tmp_path):
    """model.dropout=0 zeroes every dropout probability, so two training-mode passes agree exactly."""
    model, tokenizer = load_model(dataclasses.replace(BASE, name=name, dropout=0.0), "seq_cls", 2)
    probabilities = [v for k, v in model.config.to_dict().items() if "dropout" in k or "pdrop" in k]
    assert probabilities and all(v in (0.0, None) for v in probabilities)
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    batch = tokenizer(["a short sentence", "another one"], return_tensors="pt", padding=True)
    model.train()
    torch.testing.assert_close(model(**batch).logits, model(**batch).logits, rtol=0, atol=0)
    kept, _ = load_model(dataclasses.replace(BASE, name=name), "seq_cls", 2)
    assert any(m.p > 0 for m in kept.modules() if isinstance(m, torch.nn.Dropout))


def test_nf4_needs_cuda():
    with pytest.raises(ModelError, match="nf4 needs a CUDA GPU"):
        load_model(config("tiny-llama", quantization="nf4"), "causal_lm")


# ---- local directories and the bundled MiniLM -----------------------------------------------------


@pytest.mark.parametrize(("name", "head"), [("tiny-llama", "causal_lm"), ("tiny-bert", "seq_cls")])
def test_local_directory_round_trip(tmp_path, name, head):
    model, tokenizer = load_model(config(name), head)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tokenizer = load_model(config(str(tmp_path)), head)
    inputs, reloaded = batch(tokenizer), batch(loaded_tokenizer)
    assert reloaded.keys() == inputs.keys() and all(torch.equal(reloaded[key], inputs[key]) for key in inputs)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, rtol=0, atol=1e-6)


def test_minilm_matches_sentence_transformers():
    sentence_transformers = pytest.importorskip("sentence_transformers")
    sentences = ["A man is playing a guitar.", "The quarterly report shows revenue of $3.5 million."]
    model, tokenizer = load_model(config("minilm"), "seq_cls", num_labels=2)
    assert model_family(model) == "bert" and load_tokenizer("minilm").vocab_size == tokenizer.vocab_size
    inputs = tokenizer(sentences, padding=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        hidden = model.base_model(**inputs).last_hidden_state
    mask = inputs["attention_mask"].unsqueeze(-1).float()
    ours = (hidden * mask).sum(1) / mask.sum(1)
    reference = sentence_transformers.SentenceTransformer(str(minilm_directory()), device="cpu")
    theirs = reference.encode(sentences, convert_to_tensor=True)
    assert torch.nn.functional.cosine_similarity(ours, theirs.cpu()).min() > 0.99


# ---- errors ---------------------------------------------------------------------------------------


def test_unknown_preset_suggests_the_closest():
    with pytest.raises(ModelError, match=r"unknown model 'tiny-lama' \(did you mean 'tiny-llama'\?\)"):
        load_model(config("tiny-lama"), "causal_lm")


def test_missing_and_incomplete_directories(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_model(config(str(tmp_path / "nope")), "seq_cls")
    with pytest.raises(ModelError, match=r"no config\.json"):
        load_model(config(str(tmp_path)), "seq_cls")


def test_offline_unknown_hub_id_fails_fast(tmp_path):
    script = (
        "import json, time\n"
        "from loralab.config.schema import ModelConfig\n"
        "from loralab.errors import ModelError\n"
        "from loralab.models import load_model\n"
        f"cfg = ModelConfig(**{dataclasses.asdict(config('loralab-test/does-not-exist'))!r})\n"
        "start = time.perf_counter()\n"
        "try:\n"
        "    load_model(cfg, 'seq_cls', 2)\n"
        "except ModelError as exc:\n"
        "    print(json.dumps({'error': str(exc), 'seconds': time.perf_counter() - start}))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["seconds"] < 10
    assert "unreachable" in result["error"] and "local directory" in result["error"]
    assert "\n" not in result["error"]
