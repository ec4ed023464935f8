"""`loralab analyze`: parameter efficiency, frozen-base verification, per-module LoRA statistics, optional
representation similarity, into `analysis.json` and figures (PNG and PDF)."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

from loralab.adapters.base import check_safetensors
from loralab.adapters.params import adapter_parameter_names, parameter_efficiency, verify_frozen_base
from loralab.analysis.source import AdapterSource
from loralab.analysis.spectra import lora_statistics, summarise
from loralab.errors import ConfigError
from loralab.training.rundir import read_status

RESULT = "analysis.json"
STATUS_KEYS = ("frozen_sha256_start", "frozen_sha256_end")


def default_out(source: AdapterSource) -> Path:
    """Beside the adapter: a run's `analysis/`, or `<adapter>/../analysis`."""
    return source.adapter.parent / "analysis"


def saved_names(source: AdapterSource) -> set[str]:
    """The tensor names a loralab-native adapter saved (the adapted model's parameter names); empty for PEFT."""
    path = source.native_weights()
    if path is None:
        return set()
    check_safetensors(path)
    with safe_open(str(path), framework="pt") as handle:
        return set(handle.keys())


def run_hashes(source: AdapterSource) -> dict:
    """The frozen-parameter hashes a run recorded before and after training, and whether they agree."""
    status = read_status(source.adapter.parent)
    hashes = {key: status[key] for key in STATUS_KEYS if key in status}
    if len(hashes) == len(STATUS_KEYS):
        hashes["unchanged_in_training"] = hashes["frozen_sha256_start"] == hashes["frozen_sha256_end"]
    return hashes


def analyze(source: AdapterSource, out: Path, tau: float = 0.9, representations: int | None = None) -> dict:
    """Analyse the adapter `source` names; write `out/analysis.json` and the figures; return the document."""
    from loralab.analysis import plots

    if not 0 < tau <= 1:
        raise ConfigError(f"--tau must be in (0, 1], got {tau}")
    if representations is not None and representations < 1:
        raise ConfigError(f"--representations needs at least one probe text, got {representations}")
    fresh, tokenizer, new = source.load_base()
    adapted, _ = source.load_adapted(trainable=True)
    base_modules = {name for name, _ in fresh.named_modules()}
    adapter_names = adapter_parameter_names(adapted, (n for n, _ in fresh.named_parameters()), saved_names(source))
    frozen = verify_frozen_base(fresh, adapted, adapter_names, new) | {"run": run_hashes(source)}
    modules = lora_statistics(adapted, tau)
    document = {
        "adapter": str(source.adapter),
        "base": source.model.name,
        "head": source.head,
        "adapter_kind": source.kind,  # loralab.json's (lora, dual_rank_lora, bitfit, ...), 'peft' without one
        "peft_type": source.peft_config.get("peft_type"),
        "tau": tau,
        "parameters": parameter_efficiency(adapted, adapter_names, base_modules),
        "frozen_base_ok": frozen["frozen_base_ok"],
        "frozen_base": frozen,
        "lora": {"summary": summarise(modules), "modules": modules},
    }
    figures = {}
    if modules:
        figures["spectra"] = plots.spectra_figure(modules)
        figures["effective_rank"] = plots.rank_figure(modules, tau)
    if representations:
        from loralab.analysis.representations import compare_representations

        batch, origin = source.probe_batch(tokenizer, representations)
        layers = compare_representations(fresh, adapted, batch)
        document["representations"] = {"probe": origin, "texts": representations, "layers": layers}
        figures["representations"] = plots.representation_figure(layers)
    out.mkdir(parents=True, exist_ok=True)
    document["figures"] = [str(p) for name, f in figures.items() for p in plots.save_figure(f, out, name)]
    (out / RESULT).write_text(json.dumps(document, indent=2) + "\n")
    return document
