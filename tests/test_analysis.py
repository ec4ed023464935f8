"""`loralab merge` and `loralab analyze` on tiny models: merge exactness and reload, refusals, frozen-base hashes,
per-module statistics against dense references and hand counts, figures that are looked at, the CLI end to end."""

from __future__ import annotations

import json
import math

import matplotlib.image
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from conftest import batch_for, build, logits, perturb, tiny
from loralab.adapters import build_adapter, load_adapter, load_peft_adapter
from loralab.adapters.lora import peft_lora_views
from loralab.adapters.params import (
    adapter_parameter_names,
    canonical_names,
    frozen_hash,
    parameter_efficiency,
    verify_frozen_base,
)
from loralab.analysis import plots
from loralab.analysis.merge import merge_adapter, mergeable_source
from loralab.analysis.source import resolve_source
from loralab.analysis.spectra import entropy_effective_rank, lora_statistics
from loralab.cli import main
from loralab.config.schema import BitfitOptions, HoulsbyOptions, LoraOptions

TOL = 1e-5
SETUPS = {  # name: (preset, head, LoRA targets with distinct shapes, PEFT task type's Auto class)
    "bert": ("tiny-bert", "seq_cls", ["query", "value", "intermediate.dense"], AutoModelForSequenceClassification),
    "llama": ("tiny-llama", "causal_lm", ["q_proj", "v_proj", "down_proj"], AutoModelForCausalLM),
}
FAST = {"probe": 4, "rounds": 2, "repeats": 2, "warmup": 1}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny forward passes on a shared 2-core machine: one intra-op thread is ~100× faster than two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def base(setup: str):
    preset, head, _, _ = SETUPS[setup]
    return build(preset, head)[0]


def probe(setup: str):
    preset, head, _, _ = SETUPS[setup]
    return batch_for(build(preset, head)[1])


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Saved LoRA adapters (r 4, α 12: scaling 3) with random non-zero B and head, plus a BitFit and a Houlsby one."""
    root = tmp_path_factory.mktemp("adapters")
    for setup, (_, head, targets, _) in SETUPS.items():
        adapter = build_adapter(LoraOptions(r=4, alpha=12.0, dropout=0.0, target_modules=targets), head)
        model = adapter.apply(base(setup))
        perturb(model, lambda n: "lora_B" in n or "modules_to_save" in n)
        adapter.save(model, root / setup)
    for options in (BitfitOptions(), HoulsbyOptions(bottleneck=8)):
        adapter = build_adapter(options, "seq_cls")
        model = adapter.apply(base("bert"))
        perturb(model, lambda n, m=model: dict(m.named_parameters())[n].requires_grad, scale=0.01)
        adapter.save(model, root / options.kind)
    return root


# ---- merge ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("setup", list(SETUPS))
def test_merge_is_exact_and_the_saved_model_reloads(adapters, tmp_path, setup):
    """fp32: merged and reloaded logits within 1e-5 of the adapter model's, which differ from the base's."""
    preset, _, _, auto_class = SETUPS[setup]
    outcome = merge_adapter(mergeable_source(adapters / setup, preset), tmp_path / "merged", check=True, **FAST)
    check = outcome.check
    assert outcome.ok and check["max_abs_diff"] <= TOL and check["reload_max_abs_diff"] <= TOL
    assert json.loads((tmp_path / "merged" / "merge_check.json").read_text()) == check

    batch = probe(setup)
    adapted = logits(load_adapter(base(setup), adapters / setup), batch)
    assert (adapted - logits(base(setup), batch)).abs().max() > 1e-3  # the adapter does something
    reloaded = auto_class.from_pretrained(tmp_path / "merged")
    assert not any("lora" in name for name in reloaded.state_dict())
    torch.testing.assert_close(logits(reloaded, batch), adapted, rtol=0, atol=TOL)

    assert list(check["latency"]) == ["adapter", "merged", "base"]
    for side in check["latency"].values():
        assert 0 < side["min_ms"] <= side["median_ms"] <= side["max_ms"] and side["ratio_to_base"] > 0
        assert side["passes"] == FAST["rounds"] * FAST["repeats"]
    assert check["latency"]["base"]["ratio_to_base"] == 1.0
    assert check["probe"]["source"] == "synthetic sentences" and check["probe"]["texts"] == 4


@pytest.mark.parametrize("kind", ["bitfit", "houlsby"])
def test_non_mergeable_adapters_are_refused(adapters, tmp_path, capsys, kind):
    code = main(["merge", str(adapters / kind), "--base", "tiny-bert", "--out", str(tmp_path / "m")])
    error = capsys.readouterr().err
    assert code == 2 and error.count("\n") == 1
    assert f"is a '{kind}' adapter, not a PEFT adapter" in error
    assert not (tmp_path / "m").exists()


# ---- frozen base --------------------------------------------------------------------------------------------------


def verification(fresh, adapted):
    names = adapter_parameter_names(adapted, (n for n, _ in fresh.named_parameters()))
    return verify_frozen_base(fresh, adapted, names)


def test_frozen_base_verification_catches_a_changed_weight(adapters):
    fresh = base("bert")
    assert frozen_hash(fresh, exclude=lambda n: False) == frozen_hash(base("bert"), exclude=lambda n: False)
    intact = verification(fresh, load_peft_adapter(base("bert"), adapters / "bert", is_trainable=True))
    assert intact["frozen_base_ok"] is True and intact["changed"] == [] and intact["missing"] == []
    assert intact["sha256_fresh_base"] == intact["sha256_adapted_base"]
    assert intact["no_base_requires_grad"] and intact["frozen_tensors"] == len(list(fresh.parameters()))

    modified = base("bert")
    with torch.no_grad():
        modified.bert.encoder.layer[1].intermediate.dense.weight[3, 5] += 1e-3  # a LoRA-wrapped layer's base
    assert frozen_hash(modified, exclude=lambda n: False) != frozen_hash(fresh, exclude=lambda n: False)
    changed = verification(fresh, load_adapter(modified, adapters / "bert"))
    assert changed["frozen_base_ok"] is False and changed["sha256_fresh_base"] == intact["sha256_fresh_base"]
    assert changed["changed"] == ["bert.encoder.layer.1.intermediate.dense.weight"]

    leaking = load_peft_adapter(base("bert"), adapters / "bert", is_trainable=True)
    leaking.base_model.model.bert.embeddings.word_embeddings.weight.requires_grad_(True)
    report = verification(fresh, leaking)
    assert report["frozen_base_ok"] is True  # unchanged values, but
    assert report["base_requires_grad"] == ["bert.embeddings.word_embeddings.weight"]


def test_canonical_names_are_the_base_names(adapters):
    """Inside a PEFT model the base parameters keep their plain names (base_model.model, base_layer,
    original_module removed); only adapter tensors have names the base lacks."""
    fresh_names = {n for n, _ in base("bert").named_parameters()}
    adapted = load_adapter(base("bert"), adapters / "bert")
    names = canonical_names(adapted)
    assert fresh_names <= set(names.values())
    extra = {raw for raw, plain in names.items() if plain not in fresh_names}
    assert extra and all("lora_" in n or "modules_to_save" in n for n in extra)


def test_status_hash_is_the_frozen_hash_by_requires_grad(adapters):
    """frozen_hash(model) leaves out exactly the parameters that require grad (what a run records)."""
    model = load_peft_adapter(base("bert"), adapters / "bert", is_trainable=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and frozen_hash(model) == frozen_hash(model, exclude=trainable.__contains__)
    before = frozen_hash(model)
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_A" in n).add_(1.0)
    assert frozen_hash(model) == before  # training the adapter leaves the frozen hash alone


# ---- statistics ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sigma", "expected"),
    [([1.0, 1.0, 0.0, 0.0], 2.0), ([3.0], 1.0), ([0.0, 0.0], 0.0), ([0.5] * 8, 8.0)],
)
def test_entropy_effective_rank_of_known_spectra(sigma, expected):
    assert entropy_effective_rank(torch.tensor(sigma)) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("setup", list(SETUPS))
def test_module_statistics_equal_a_dense_reference(adapters, setup):
    model = load_adapter(base(setup), adapters / setup)
    tau = 0.8
    stats = {m["module"]: m for m in lora_statistics(model, tau)}
    views = peft_lora_views(model)
    assert len(stats) == len(views) == 6  # three targets, two layers
    shapes = {(v.B.shape[0], v.A.shape[1]) for v in views.values()}
    assert shapes == ({(64, 64), (128, 64)} if setup == "bert" else {(64, 64), (32, 64), (64, 128)})
    for name, view in views.items():
        module = stats[name.removeprefix("base_model.model.")]
        dense = view.scaling * view.B.detach().double() @ view.A.detach().double()
        reference = torch.linalg.svdvals(dense)[:4]
        assert view.scaling == module["scaling"] == 3.0 and module["r"] == 4
        torch.testing.assert_close(
            torch.tensor(module["singular_values"], dtype=torch.float64), reference, rtol=1e-5, atol=0
        )
        assert module["norm_delta"] == pytest.approx(float(torch.linalg.matrix_norm(dense)), rel=1e-5)
        assert module["norm_A"] == pytest.approx(float(view.A.detach().double().norm()), rel=1e-12)
        assert module["norm_B"] == pytest.approx(float(view.B.detach().double().norm()), rel=1e-12)
        sigma = [float(s) for s in reference]
        p = [s / sum(sigma) for s in sigma]
        effective = math.exp(-sum(q * math.log(q) for q in p if q > 0))
        assert module["effective_rank"] == pytest.approx(effective, rel=1e-5)
        assert module["rank_utilisation"] == pytest.approx(effective / 4, rel=1e-5)
        energy = [s * s for s in sigma]
        shares = [sum(energy[: k + 1]) / sum(energy) for k in range(4)]
        assert module["energy_rank"] == next(k + 1 for k, share in enumerate(shares) if share >= tau)


def test_parameter_counts_equal_the_adapter_tensors(adapters):
    for kind, file in (("bert", "adapter_model.safetensors"), ("bitfit", "weights.safetensors")):
        source = resolve_source(adapters / kind, "tiny-bert", "synthetic/sentiment")
        fresh, _, _ = source.load_base()
        adapted, _ = source.load_adapted(trainable=True)
        saved = load_file(str(adapters / kind / file))
        names = adapter_parameter_names(
            adapted, (n for n, _ in fresh.named_parameters()), saved if kind == "bitfit" else ()
        )
        counts = parameter_efficiency(adapted, names, {n for n, _ in fresh.named_modules()})
        assert counts["trainable"] == sum(t.numel() for t in saved.values())
        assert counts["adapter_tensors"] == len(saved)
        assert counts["total"] == sum(p.numel() for p in adapted.parameters())
        assert counts["trainable_percent"] == pytest.approx(100 * counts["trainable"] / counts["total"])
        assert sum(counts["by_module_type"].values()) == counts["trainable"]
        if kind == "bert":  # LoRA on query, value, intermediate.dense (64×4 + 4×64, 128×4 + 4×64) + the head
            assert counts["by_module_type"] == {"dense": 2 * 768, "query": 2 * 512, "value": 2 * 512, "classifier": 130}


# ---- figures ------------------------------------------------------------------------------------------------------


def test_figures_are_drawn(adapters, tmp_path):
    modules = lora_statistics(load_adapter(base("llama"), adapters / "llama"))
    layers = [{"layer": i, "cosine": 1 - 0.1 * i, "cka": 1 - 0.05 * i} for i in range(3)]
    figures = {
        "spectra": (plots.spectra_figure(modules), "lines", len(modules)),
        "ranks": (plots.rank_figure(modules, 0.9), "patches", 2 * len(modules)),
        "layers": (plots.representation_figure(layers), "lines", 2),
    }
    for stem, (figure, artists, count) in figures.items():
        png, pdf = plots.save_figure(figure, tmp_path, stem)
        assert pdf.stat().st_size > 0
        pixels = matplotlib.image.imread(png)
        assert pixels.ndim == 3 and pixels.var() > 0
        axes = figure.axes[0]
        assert len(getattr(axes, artists)) == count
        for labels in (axes.get_xticklabels(), axes.get_yticklabels()):
            assert any(label.get_text() for label in labels)
    rank_axes = figures["ranks"][0].axes[0]
    assert [label.get_text() for label in rank_axes.get_xticklabels()] == [m["label"] for m in modules]
    assert modules[0]["label"] == "L0.q_proj"


# ---- CLI ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from loralab.training.recipe import run_training

    root = tmp_path_factory.mktemp("runs")
    config = tiny(root, "task.train_samples=32", "task.eval_samples=16", "train.max_steps=4", "method.adapter.r=4")
    return run_training(config, show_progress=False).directory


@pytest.mark.slow
def test_cli_analyze_and_merge_a_run(run_dir, tmp_path, capsys):
    status = json.loads((run_dir / "status.json").read_text())
    assert status["frozen_sha256_start"] == status["frozen_sha256_end"]

    assert main(["analyze", str(run_dir), "--representations", "4"]) == 0
    assert "frozen base unchanged: True" in capsys.readouterr().out
    document = json.loads((run_dir / "analysis" / "analysis.json").read_text())
    assert document["frozen_base_ok"] is True and document["frozen_base"]["run"]["unchanged_in_training"] is True
    assert document["parameters"]["trainable"] == status["trainable_params"]
    assert document["lora"]["summary"]["modules"] == 4 and document["head"] == "seq_cls"
    assert len(document["representations"]["layers"]) == 3  # embeddings + 2 layers
    assert document["representations"]["probe"] == "synthetic/sentiment (eval split)"
    for stem in ("spectra", "effective_rank", "representations"):
        assert (run_dir / "analysis" / f"{stem}.png").is_file() and (run_dir / "analysis" / f"{stem}.pdf").is_file()

    out = tmp_path / "merged"
    flags = ["--probe-batch", "4", "--rounds", "2", "--repeats", "2"]
    assert main(["merge", str(run_dir), "--out", str(out), "--check", *flags]) == 0
    printed = capsys.readouterr().out
    assert "max |Δ| logits" in printed and all(f"| {side} " in printed for side in ("adapter", "merged", "base"))
    check = json.loads((out / "merge_check.json").read_text())
    assert check["ok"] and check["probe"]["source"] == "synthetic/sentiment (eval split)"


def test_cli_merge_check_fails_above_the_tolerance(adapters, tmp_path, capsys):
    out = tmp_path / "merged"
    flags = ["--probe-batch", "2", "--rounds", "1", "--repeats", "1", "--tol", "1e-12"]
    code = main(["merge", str(adapters / "llama"), "--base", "tiny-llama", "--out", str(out), "--check", *flags])
    check = json.loads((out / "merge_check.json").read_text())
    assert check["max_abs_diff"] > 1e-12  # fp32 rounding: merging is exact only to ~1e-7 here
    assert code == 1 and not check["ok"] and "merge check failed" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["analyze", "{tmp}/nowhere", "--base", "tiny-bert"], "adapter or run directory not found"),
        (["merge", "{tmp}/nowhere", "--base", "tiny-bert", "--out", "{tmp}/m"], "adapter or run directory not found"),
        (["analyze", "{tmp}"], "adapter without adapter_config.json"),
        (["analyze", "{adapters}/bert"], "pass --base MODEL"),
        (["merge", "{adapters}/bert", "--base", "tiny-bert", "--out", "{adapters}/bert"], "--out must be a new"),
        (["analyze", "{adapters}/bert", "--base", "tiny-bert", "--tau", "1.5"], "--tau must be in (0, 1]"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(adapters, tmp_path, capsys, argv, message):
    argv = [a.format(tmp=tmp_path, adapters=adapters) for a in argv]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and message in error


def test_analyze_a_bare_adapter(adapters, tmp_path):
    source = resolve_source(adapters / "llama", "tiny-llama")
    assert source.head == "causal_lm" and source.config is None
    assert main(["analyze", str(adapters / "llama"), "--base", "tiny-llama", "--out", str(tmp_path / "a")]) == 0
    document = json.loads((tmp_path / "a" / "analysis.json").read_text())
    assert (document["adapter_kind"], document["peft_type"], document["frozen_base_ok"]) == ("lora", "LORA", True)
    assert {m["type"] for m in document["lora"]["modules"]} == {"q_proj", "v_proj", "down_proj"}
