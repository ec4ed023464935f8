"""LoRA Spectral Edit: thin SVD round trip, ∂L/∂σ from hooks against autograd, the edit rules by hand, the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file
from torch.func import functional_call

from loralab.cli import main
from loralab.config.load import load_task_config
from loralab.config.schema import ModelConfig
from loralab.data import load_task
from loralab.data.collate import collate
from loralab.data.encode import encode_examples
from loralab.edit import EditRule, SpectralEdit, edit_sigma
from loralab.edit.rules import gd_step, normalize, preserve, selection_counts
from loralab.edit.sensitivity import SpectralBasis
from loralab.edit.spectral import calibrate, calibration_features, require_finite, select_modules, spectral_bases
from loralab.edit.spectral import calibration_task as spectral_calibration_task
from loralab.errors import ConfigError
from loralab.evaluation.gsm8k import get_profile
from loralab.lowrank import rebuild_factors, thin_svd
from loralab.models import load_model

TARGETS = ["q_proj", "o_proj", "down_proj"]


def tiny_llama():
    return load_model(ModelConfig("tiny-llama", "causal_lm", "float32", "none", False, False, None), "causal_lm")


def make_adapter(directory, **lora):
    """A tiny-llama LoRA with random A and B (no training needed for the algebra) saved as a PEFT adapter."""
    model, _ = tiny_llama()
    config = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False, **lora)
    torch.manual_seed(0)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    peft_model.save_pretrained(str(directory))
    return directory


def calibration_task(n=4):
    return load_task(load_task_config(name="synthetic/arithmetic", max_length=512, train_samples=n, eval_samples=1))


def tensors(directory):
    return load_file(str(directory / "adapter_model.safetensors"))


def delta(weights, prefix):
    return weights[f"{prefix}.lora_B.weight"].double() @ weights[f"{prefix}.lora_A.weight"].double()


# ---- §1 the thin SVD ------------------------------------------------------------------------------


def test_thin_svd_round_trip_and_dense_singular_values():
    torch.manual_seed(1)
    B, A = torch.randn(96, 12), torch.randn(12, 80)
    U, S, Vh = thin_svd(B, A)
    B2, A2 = rebuild_factors(U, S, Vh)
    dense = B.double() @ A.double()
    assert torch.linalg.norm(B2.double() @ A2.double() - dense) / torch.linalg.norm(dense) < 1e-5
    assert torch.allclose(S.double(), torch.linalg.svdvals(dense)[:12], rtol=1e-5)
    assert torch.allclose(U.T @ U, torch.eye(12), atol=1e-5) and torch.allclose(Vh @ Vh.T, torch.eye(12), atol=1e-5)
    assert bool((S[:-1] >= S[1:]).all())


# ---- §2 sensitivity: hooks against autograd through an explicit σ leaf ------------------------------


def autograd_sigma_gradients(model, bases, batches) -> list[torch.Tensor]:
    """∂(Σ_batches loss)/∂σ per module by autograd, with each LoRA written as B = U, A = diag(σ) Vᵀ (float64)."""
    sigmas = {p: b.S.clone().requires_grad_() for p, b in bases.items()}
    total = 0.0
    for batch in batches:
        replaced = {}
        for prefix, basis in bases.items():
            replaced[f"{prefix}.lora_A.default.weight"] = sigmas[prefix][:, None] * basis.Vh
            replaced[f"{prefix}.lora_B.default.weight"] = basis.U
        total = total + functional_call(model, replaced, args=(), kwargs={**batch, "use_cache": False}).loss
    return [g.double() for g in torch.autograd.grad(total, list(sigmas.values()))]


@pytest.mark.parametrize(
    "lora",
    [
        {},
        {"use_rslora": True},
        {"rank_pattern": {"down_proj": 4}, "alpha_pattern": {"o_proj": 3}},
    ],
    ids=["alpha_over_r", "rslora", "rank_and_alpha_patterns"],
)
def test_sigma_gradient_from_hooks_equals_autograd(tmp_path, lora):
    directory = make_adapter(tmp_path / "adapter", **lora)
    weights = tensors(directory)
    model, tokenizer = tiny_llama()
    model = PeftModel.from_pretrained(model, str(directory)).eval()
    prefixes = select_modules(list(weights), ("o_proj", "down_proj"), None, None)
    bases = spectral_bases(model, prefixes, weights, torch.device("cpu"))
    task = calibration_task(4)
    calibrate(model, tokenizer, task, bases, batch_size=2, max_length=512, samples=4)

    features = encode_examples(task.spec, task.train, tokenizer, 512)
    batches = [collate(features[start : start + 2], tokenizer.pad_token_id) for start in (0, 2)]
    assert any(bool((batch["attention_mask"] == 0).any()) for batch in batches)  # padding rows are exercised
    for (prefix, basis), expected in zip(bases.items(), autograd_sigma_gradients(model, bases, batches), strict=True):
        error = torch.linalg.norm(basis.g - expected) / torch.linalg.norm(expected)
        assert error < 1e-4, prefix
    if "rank_pattern" in lora:
        assert next(b for p, b in bases.items() if p.endswith("down_proj")).S.numel() == 4
        scale = next(b.scaling for p, b in bases.items() if p.endswith("o_proj"))
        assert scale == pytest.approx(3 / 8)
    if "use_rslora" in lora:
        assert next(iter(bases.values())).scaling == pytest.approx(16 / math.sqrt(8))


def published_calibration_batch(tokenizer, examples) -> dict:
    """The published tool's make_calib_batch, written out: prompt + ' answer' + EOS text without special tokens,
    labels -100 over the prompt's own token count, right padding with the pad id, attention = (id != pad)."""
    rows, labels = [], []
    for example in examples:
        full = example.text + example.target + tokenizer.eos_token  # the target already starts with ' '
        prompt_ids = tokenizer(example.text, add_special_tokens=False).input_ids
        full_ids = tokenizer(full, add_special_tokens=False).input_ids
        cut = min(len(prompt_ids), len(full_ids))
        rows.append(full_ids)
        labels.append([-100] * cut + full_ids[cut:])
    width = max(len(row) for row in rows)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([row + [pad] * (width - len(row)) for row in rows])
    labels = torch.tensor([row + [-100] * (width - len(row)) for row in labels])
    return {"input_ids": ids, "attention_mask": (ids != pad).long(), "labels": labels}


def test_published_calibration_tokens_and_their_sigma_gradient(tmp_path):
    directory = make_adapter(tmp_path / "adapter")
    weights = tensors(directory)
    model, tokenizer = tiny_llama()
    model = PeftModel.from_pretrained(model, str(directory)).eval()
    prefixes = select_modules(list(weights), ("o_proj", "down_proj"), None, None)
    task = calibration_task(4)
    assert tokenizer("x")["input_ids"][0] == tokenizer.bos_token_id  # this tokenizer adds BOS

    published = calibration_features(task, tokenizer, 512, 4, "published")
    loralab = calibration_features(task, tokenizer, 512, 4, "loralab")
    for example, feature, ours in zip(task.train, published, loralab, strict=True):
        prompt = tokenizer(example.text, add_special_tokens=False)["input_ids"]
        assert feature["input_ids"][: len(prompt)] == prompt and feature["labels"][: len(prompt)] == [-100] * len(
            prompt
        )
        assert ours["input_ids"][0] == tokenizer.bos_token_id and ours["input_ids"][1 : len(prompt) + 1] == prompt
    expected_batches = [published_calibration_batch(tokenizer, task.train[start : start + 2]) for start in (0, 2)]
    for start, expected in zip((0, 2), expected_batches, strict=True):
        batch = collate(published[start : start + 2], tokenizer.pad_token_id)
        assert all(torch.equal(batch[key], expected[key]) for key in ("input_ids", "attention_mask", "labels"))

    sides = {}
    for tokenization in ("published", "loralab"):
        bases = spectral_bases(model, prefixes, weights, torch.device("cpu"))
        calibrate(model, tokenizer, task, bases, 2, 512, 4, tokenization)
        sides[tokenization] = bases
    hand = autograd_sigma_gradients(model, sides["published"], expected_batches)
    for (prefix, basis), expected in zip(sides["published"].items(), hand, strict=True):
        assert torch.linalg.norm(basis.g - expected) / torch.linalg.norm(expected) < 1e-4, prefix
    moved = max(
        float((sides["loralab"][p].g - sides["published"][p].g).abs().max() / sides["published"][p].g.abs().max())
        for p in prefixes
    )
    assert moved > 1e-2  # BOS moves g well beyond rounding on this model


def test_published_tokenization_needs_an_sft_task(tmp_path):
    messages = [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"}]
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": messages}) + "\n")
    task = tmp_path / "chat.yaml"
    task.write_text(f"task:\n  name: my_chat\n  format: chat\n  path: {tmp_path / 'chat.jsonl'}\n")
    edit = SpectralEdit("tiny-llama", "x", tmp_path / "out", calib_task=str(task), calib_tokenization="published")
    with pytest.raises(ConfigError, match="needs an sft calibration task"):
        spectral_calibration_task(edit)
    with pytest.raises(ConfigError, match="calib_tokenization must be"):
        SpectralEdit("tiny-llama", "x", tmp_path, calib_tokenization="bos")


def test_calibration_dtype_defaults_and_a_non_finite_sensitivity_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the choice of dtype, not a GPU, is under test
    assert SpectralEdit("tiny-llama", "x", tmp_path, device="cuda").model_config().dtype == "float16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"device cuda:1: torch .* sees no CUDA device"):
        SpectralEdit("tiny-llama", "x", tmp_path, device="cuda:1")
    monkeypatch.undo()
    assert SpectralEdit("tiny-llama", "x", tmp_path, device="cpu").model_config().dtype == "float32"
    assert SpectralEdit("tiny-llama", "x", tmp_path, dtype="bfloat16").model_config().dtype == "bfloat16"
    finite = SpectralBasis.of(torch.nn.Identity(), torch.eye(2), torch.ones(2), torch.eye(2), 1.0)
    broken = SpectralBasis.of(torch.nn.Identity(), torch.eye(2), torch.ones(2), torch.eye(2), 1.0)
    broken.g[1] = math.inf
    require_finite({"a": finite}, "float16")
    with pytest.raises(ConfigError, match=r"calibration in float16 gave non-finite .* module\(s\) \(first: b\)"):
        require_finite({"a": finite, "b": broken}, "float16")


# ---- §3 the edit rules by hand --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("r", "core", "noise", "expected"),
    [(8, 0.2, 0.2, (2, 2)), (4, 0.2, 0.2, (1, 1)), (2, 0.2, 0.2, (1, 0)), (10, 0.25, 0.25, (2, 2)),
     (10, 0.35, 0.35, (4, 4)), (1, 0.2, 0.2, (1, 0)), (10, 0.7, 0.5, (7, 3)), (5, 0.0, 1.0, (1, 4))],
)  # fmt: skip
def test_selection_counts_follow_pythons_round(r, core, noise, expected):
    assert selection_counts(r, core, noise) == expected


SIGMA0 = torch.tensor([6.0, 5.0, 4.0, 3.0, 2.0, 1.0])
G = torch.tensor([0.1, -3.0, 0.5, 2.0, -0.05, 1.0])


def test_abs_select_amplifies_the_largest_and_suppresses_the_smallest_sensitivity():
    sigma, stats = edit_sigma(SIGMA0, G, EditRule(preserve_energy="none"), torch.Generator())
    assert sigma.tolist() == pytest.approx([6.0, 6.25, 4.0, 3.0, 1.6, 1.0])
    assert (stats["k_core"], stats["k_noise"]) == (1, 1)
    assert stats["factors"] == pytest.approx([1.0, 1.25, 1.0, 1.0, 0.8, 1.0])
    assert stats["g_abs_mean"] == pytest.approx(6.65 / 6) and stats["g_abs_max"] == 3.0
    l1, _ = edit_sigma(SIGMA0, G, EditRule(), torch.Generator())
    assert l1.tolist() == pytest.approx([v * 21 / 21.85 for v in [6.0, 6.25, 4.0, 3.0, 1.6, 1.0]])
    l2, _ = edit_sigma(SIGMA0, G, EditRule(preserve_energy="l2"), torch.Generator())
    norm0 = math.sqrt(sum(v * v for v in SIGMA0.tolist()))
    norm1 = math.sqrt(sum(v * v for v in [6.0, 6.25, 4.0, 3.0, 1.6, 1.0]))
    assert l2.tolist() == pytest.approx([v * norm0 / norm1 for v in [6.0, 6.25, 4.0, 3.0, 1.6, 1.0]])


def test_random_index_is_a_seeded_permutation_advancing_module_by_module():
    rule = EditRule(mode="random_index", preserve_energy="none", core_frac=0.34, noise_frac=0.34)
    generator = torch.Generator().manual_seed(7)
    first, _ = edit_sigma(SIGMA0, G, rule, generator)
    second, _ = edit_sigma(SIGMA0, G, rule, generator)
    reference = torch.Generator().manual_seed(7)
    for sigma in (first, second):
        order = torch.randperm(6, generator=reference)
        expected = SIGMA0.double().clone()
        expected[order[:2]] *= 1.25
        expected[order[2:4]] *= 0.8
        assert torch.allclose(sigma, expected)
    again, _ = edit_sigma(SIGMA0, G, rule, torch.Generator().manual_seed(7))
    assert torch.equal(again, first)


def test_gd_updates_clipping_and_normalisations_by_hand():
    g = G.double() / G.abs().mean().double()
    multiplicative, _ = edit_sigma(SIGMA0, G, EditRule(mode="gd", preserve_energy="none"), torch.Generator())
    assert multiplicative.tolist() == pytest.approx((SIGMA0.double() * torch.exp(-0.2 * g)).tolist())
    rule = EditRule(mode="gd", update_mode="additive", eta=1.5, preserve_energy="none", sigma_clip_min=0.1)
    additive, _ = edit_sigma(SIGMA0, G, rule, torch.Generator())
    assert additive.tolist() == pytest.approx((SIGMA0.double() - 1.5 * g).clamp_min(0.1).tolist())
    assert additive.min() == pytest.approx(0.1)  # 2 − 1.5·2.71 is clipped
    step = 2.0 * torch.relu(g).pow(2.0) - 0.2 * torch.relu(-g)
    asymmetric = gd_step(SIGMA0.double(), g, EditRule(mode="gd", asymmetric_update=True, pos_power=2.0))
    assert asymmetric.tolist() == pytest.approx((SIGMA0.double() * torch.exp(-step)).tolist())
    assert normalize(G, "l2").tolist() == pytest.approx((G / torch.linalg.norm(G)).tolist())
    assert torch.equal(normalize(G, "none"), G)
    scaled = preserve(SIGMA0.double(), SIGMA0.double() * 2, "l1")
    assert scaled.sum().item() == pytest.approx(21.0)


def test_unit_factors_leave_sigma_unchanged_and_bad_rules_are_refused():
    rule = EditRule(amp_factor=1.0, sup_factor=1.0, mid_factor=1.0)
    sigma, stats = edit_sigma(SIGMA0, G, rule, torch.Generator())
    assert torch.allclose(sigma, SIGMA0.double()) and stats["factors"] == [1.0] * 6
    with pytest.raises(ConfigError, match="core_frac must lie in"):
        EditRule(core_frac=1.5)
    with pytest.raises(ConfigError, match="mode must be one of"):
        EditRule(mode="abs")
    with pytest.raises(ConfigError, match="layer_min"):
        SpectralEdit("tiny-llama", "x", "y", layer_min=3, layer_max=1)


# ---- §4 selection, §5 outputs: the CLI --------------------------------------------------------------


def test_selection_by_last_name_and_inclusive_layer_range():
    keys = [
        f"base_model.model.model.layers.{i}.{part}.lora_{f}.weight"
        for i in range(3)
        for part in ("self_attn.o_proj", "mlp.down_proj", "self_attn.q_proj")
        for f in "AB"
    ] + ["base_model.model.lm_head.lora_A.weight"]
    chosen = select_modules(keys, ("down_proj",), 1, 2)
    assert chosen == [f"base_model.model.model.layers.{i}.mlp.down_proj" for i in (1, 2)]
    assert select_modules(keys, ("lm_head",), 0, 0) == []  # no B factor: not a module to edit
    assert len(select_modules(keys, ("o_proj", "q_proj"), None, None)) == 6


def edit_argv(source, out, *extra):
    return [
        "edit", "spectral", "--base_model", "tiny-llama", "--lora_path", str(source), "--out_dir", str(out),
        "--calib_task", "synthetic/arithmetic", "--calib_samples", "4", *extra,
    ]  # fmt: skip


def test_cli_edit_writes_a_peft_adapter_meta_and_keeps_untouched_modules(tmp_path, capsys):
    source = make_adapter(tmp_path / "adapter")
    out = tmp_path / "edited"
    assert main(edit_argv(source, out, "--layer_min", "1", "--layer_max", "1")) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "spectral_edit_meta.json",
    ]  # fmt: skip
    assert (out / "adapter_config.json").read_bytes() == (source / "adapter_config.json").read_bytes()
    before, after = tensors(source), tensors(out)
    edited = {"base_model.model.model.layers.1.self_attn.o_proj", "base_model.model.model.layers.1.mlp.down_proj"}
    with (
        safe_open(str(source / "adapter_model.safetensors"), "pt") as a,
        safe_open(str(out / "adapter_model.safetensors"), "pt") as b,
    ):
        for key in before:
            same = a.get_tensor(key).numpy().tobytes() == b.get_tensor(key).numpy().tobytes()
            assert same == (key.rsplit(".lora_", 1)[0] not in edited), key
    meta = json.loads((out / "spectral_edit_meta.json").read_text())
    assert meta["meta"]["mode"] == "abs_select" and meta["meta"]["eta"] == 0.2 and meta["meta"]["seed"] == 0
    assert meta["meta"]["layer_min"] == 1 and meta["meta"]["calib_samples"] == 4 and "loralab_version" in meta["meta"]
    assert sorted(meta["sigma_stats"]) == sorted(p.removeprefix("base_model.model.") for p in edited)
    for prefix in edited:
        stats = meta["sigma_stats"][prefix.removeprefix("base_model.model.")]
        U, S, Vh = thin_svd(before[f"{prefix}.lora_B.weight"], before[f"{prefix}.lora_A.weight"])
        expected = U.double() @ torch.diag(S.double() * torch.tensor(stats["factors"]).double()) @ Vh.double()
        assert torch.allclose(delta(after, prefix), expected, atol=1e-5)
        assert stats["sigma_new_sum"] == pytest.approx(stats["sigma0_sum"], rel=1e-6)  # l1 energy kept
        assert (stats["r"], stats["k_core"], stats["k_noise"]) == (8, 2, 2)
    model, _ = tiny_llama()
    loaded = PeftModel.from_pretrained(model, str(out))  # plain PEFT
    layer = loaded.base_model.model.model.layers[1].mlp.down_proj
    assert torch.equal(
        layer.lora_A["default"].weight, after["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"]
    )


def test_cli_edit_with_unit_factors_keeps_delta_w_and_refuses_a_non_empty_out_dir(tmp_path, capsys):
    source = make_adapter(tmp_path / "adapter", rank_pattern={"o_proj": 4})
    out = tmp_path / "edited"
    unit = ("--amp_factor", "1", "--sup_factor", "1", "--mode", "gd", "--eta", "1e-12")
    assert main(edit_argv(source, out, *unit[:4])) == 0
    before, after = tensors(source), tensors(out)
    for key in [k for k in before if k.endswith("lora_A.weight")]:
        prefix = key.removesuffix(".lora_A.weight")
        error = torch.linalg.norm(delta(after, prefix) - delta(before, prefix)) / torch.linalg.norm(
            delta(before, prefix)
        )
        assert error < 1e-5
    capsys.readouterr()
    assert main(edit_argv(source, out)) == 2
    assert "is not empty; pass --overwrite" in capsys.readouterr().err
    assert main(edit_argv(source, out, *unit[4:], "--overwrite", "--calib_tokenization", "published")) == 0
    meta = json.loads((out / "spectral_edit_meta.json").read_text())["meta"]
    assert meta["mode"] == "gd" and meta["calib_tokenization"] == "published"


# ---- §6 evaluation before and after, and the same prompts through `loralab eval` ------------------------


def test_edit_eval_writes_baseline_and_edited_metrics_matching_loralab_eval(tmp_path, capsys):
    source = make_adapter(tmp_path / "adapter")
    out = tmp_path / "edited"
    evaluation = ("--eval_task", "synthetic/arithmetic", "--eval_max_samples", "3", "--eval_fewshot", "1")
    argv = edit_argv(
        source, out, "--eval", "gsm8k", *evaluation, "--eval_max_new_tokens", "12", "--eval_batch_size", "2"
    )
    assert main(argv) == 0
    document = json.loads((out / "metrics_gsm8k.json").read_text())
    assert set(document["results"]) == {"baseline", "edited"}
    assert document["meta"]["eval.profile"] == "lm-eval" and document["meta"]["n"] == 3
    assert document["meta"]["max_new_tokens"] == 12 and document["meta"]["eval.fewshot"] == 1
    baseline = [json.loads(line) for line in (out / "predictions_gsm8k_baseline.jsonl").read_text().splitlines()]
    assert [r["input"].count("Question:") for r in baseline] == [2, 2, 2]  # one shot, then the question

    eval_out = tmp_path / "eval"
    flags = ["--fewshot", "1", "--max_samples", "3", "--max_new_tokens", "12", "--batch_size", "2"]
    argv = ["eval", "--base", "tiny-llama", "--adapter", str(source), "--task", "synthetic/arithmetic", *flags]
    assert main([*argv, "--out", str(eval_out)]) == 0
    alone = [json.loads(line) for line in (eval_out / "predictions.jsonl").read_text().splitlines()]
    assert [r["output"] for r in alone] == [r["output"] for r in baseline]
    assert json.loads((eval_out / "eval.json").read_text())["metrics"] == document["results"]["baseline"]

    for side in ("baseline", "edited"):
        capsys.readouterr()
        predictions = str(out / f"predictions_gsm8k_{side}.jsonl")
        assert main(["score", "--task", "synthetic/arithmetic", "--predictions", predictions]) == 0
        assert json.loads(capsys.readouterr().out) == document["results"][side]
        assert main(["score", "--task", "gsm8k", "--predictions", predictions, "--profile", "paper_math"]) == 0
        records = [json.loads(line) for line in (out / f"predictions_gsm8k_{side}.jsonl").read_text().splitlines()]
        expected = sum(
            get_profile("paper_math").score(r["output"], r["reference"])["correct"]["accuracy"] for r in records
        )
        assert json.loads(capsys.readouterr().out) == {"accuracy": pytest.approx(expected / 3)}
