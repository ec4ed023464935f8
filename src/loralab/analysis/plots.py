"""The figures of `loralab analyze`: singular-value spectra, effective ranks, representation similarity.

Figures are built as `matplotlib.figure.Figure` objects (no pyplot, no global backend state; PNG through Agg,
PDF through matplotlib's PDF backend) and returned, so callers and tests can inspect them before saving.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

FORMATS = ("png", "pdf")


def width_for(count: int) -> float:
    return min(max(6.0, 0.35 * count + 2.0), 24.0)


def spectra_figure(modules: list[dict]) -> Figure:
    """One line per module: its singular values σ_k of ΔW against k, on a log scale (zeros left out)."""
    figure = Figure(figsize=(7.0, 4.5), layout="constrained")
    axes = figure.add_subplot()
    for module in modules:
        points = [(k, s) for k, s in enumerate(module["singular_values"], start=1) if s > 0]
        axes.plot([k for k, _ in points], [s for _, s in points], marker=".", linewidth=1, label=module["label"])
    axes.set_yscale("log")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("component k")
    axes.set_ylabel("singular value σ_k of ΔW")
    axes.set_title(f"LoRA update spectra ({len(modules)} modules)")
    if len(modules) <= 16:
        axes.legend(fontsize="small", ncols=2)
    return figure


def rank_figure(modules: list[dict], tau: float) -> Figure:
    """Bars per module: the entropy effective rank and the energy rank at τ; a dashed line at the largest r."""
    figure = Figure(figsize=(width_for(len(modules)), 4.5), layout="constrained")
    axes = figure.add_subplot()
    positions = list(range(len(modules)))
    axes.bar([p - 0.2 for p in positions], [m["effective_rank"] for m in modules], width=0.4, label="entropy")
    axes.bar([p + 0.2 for p in positions], [m["energy_rank"] for m in modules], width=0.4, label=f"energy τ={tau:g}")
    if modules:
        axes.axhline(max(m["r"] for m in modules), color="grey", linestyle="--", linewidth=1, label="r")
    axes.set_xticks(positions, [m["label"] for m in modules], rotation=60, ha="right", fontsize="small")
    axes.set_ylabel("effective rank")
    axes.set_title("Effective rank per module")
    axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return figure


def representation_figure(layers: list[dict]) -> Figure:
    """Two lines over layers: the mean token cosine similarity and the linear CKA of base vs adapted."""
    figure = Figure(figsize=(6.0, 4.0), layout="constrained")
    axes = figure.add_subplot()
    index = [layer["layer"] for layer in layers]
    axes.plot(index, [layer["cosine"] for layer in layers], marker="o", label="cosine")
    axes.plot(index, [layer["cka"] for layer in layers], marker="s", label="linear CKA")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.ticklabel_format(axis="y", useOffset=False)
    axes.set_xlabel("layer (0 = embeddings)")
    axes.set_ylabel("similarity, base vs adapted")
    axes.set_title("Hidden-state similarity")
    axes.legend()
    return figure


def save_figure(figure: Figure, directory: Path, stem: str) -> list[Path]:
    """`stem.png` (150 dpi) and `stem.pdf` in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / f"{stem}.{fmt}" for fmt in FORMATS]
    for path in paths:
        figure.savefig(path, dpi=150)
    return paths
