"""The configuration reference: every field has its help, the generated docs are current, `config explain` works."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
import yaml

from loralab.cli import main
from loralab.config import load_config
from loralab.config.load import read_packaged
from loralab.config.reference import (
    DOCS_FILE,
    README_FILE,
    core_keys,
    docs_markdown,
    kind_keys,
    readme_block,
    with_readme_block,
)
from loralab.config.registry import ADAPTER_OPTIONS, GRADIENT_OPTIONS
from loralab.config.schema import RunConfig

REPO = Path(__file__).resolve().parents[1]  # the checkout under test, wherever loralab is installed


def dataclasses_of(cls: type) -> list[type]:
    """`cls` and every dataclass nested in its fields."""
    hints = typing.get_type_hints(cls)
    nested = [hints[f.name] for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])]
    return [cls, *(inner for child in nested for inner in dataclasses_of(child))]


SECTIONS = sorted(
    {c for root in (RunConfig, *ADAPTER_OPTIONS.values(), *GRADIENT_OPTIONS.values()) for c in dataclasses_of(root)},
    key=lambda c: c.__name__,
)


@pytest.mark.parametrize("cls", SECTIONS, ids=lambda c: c.__name__)
def test_every_field_has_a_one_line_help(cls):
    for fld in dataclasses.fields(cls):
        text = fld.metadata.get("help", "")
        assert text and "\n" not in text, f"{cls.__name__}.{fld.name} has no one-line help"


def test_docs_config_md_is_current():
    assert (REPO / DOCS_FILE).read_text() == docs_markdown(), "run: python -m loralab.config.reference --write"


def test_readme_key_tables_are_current():
    readme = (REPO / README_FILE).read_text()
    assert readme_block() in readme, "run: python -m loralab.config.reference --write"
    assert with_readme_block(readme) == readme


def test_the_reference_has_every_key_with_base_yaml_defaults():
    rows = {row.key: row for row in core_keys()}
    leaves = flatten({k: v for k, v in read_packaged("base.yaml").items() if k != "method"})
    for key, value in leaves.items():
        assert rows[key].default == shown(value), key
    assert rows["train.compile"].default == "false" and "torch.compile" in rows["train.compile"].help
    assert "| `train.compile` |" in docs_markdown()
    for kind, cls in ADAPTER_OPTIONS.items():
        keys = {row.key.removeprefix("method.adapter.") for row in kind_keys("adapter", kind)}
        assert {f.name for f in dataclasses.fields(cls)} <= {k.split(".")[0] for k in keys}
        assert f"## `method.adapter.kind: {kind}`" in docs_markdown()


def flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def shown(value) -> str:
    """A YAML value as the reference prints it: YAML's own spelling, floats as Python's %g."""
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list) and not value:
        return "[]"
    if isinstance(value, dict) and not value:
        return "{}"
    text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
    return text.replace("'", "")


def test_explain_prints_type_default_allowed_and_help(capsys):
    assert main(["config", "explain", "train.lr", "train.lr=3e-4"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "train.lr",
        "  type:    float",
        "  default: 0.0003",
        "  allowed: > 0",
        "  help:    peak learning rate of AdamW",
    ]


def test_explain_shows_the_value_this_config_gives_the_key(capsys):
    assert main(["config", "explain", "train.max_steps", "train.max_steps=7"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1:4] == ["  type:    int | null", "  default: null", "  value:   7 (this config)"]


def test_explain_reads_the_current_kind_and_any_kind_by_name(capsys):
    assert main(["config", "explain", "method.adapter.R", "method.name=ours"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("method.adapter.R (method.adapter.kind: dual_rank_lora)\n") and "default: 32" in out
    assert "allowed: ≥ 2" in out
    assert main(["config", "explain", "method.gradient.grit.kfac_damping"]) == 0
    out = capsys.readouterr().out
    assert "default: 0.001" in out and "allowed: > 0" in out
    assert load_config([], ["method.name=grit"]).method.gradient.kfac_damping == 1e-3


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("train.lrr", "unknown key 'train.lrr' (did you mean 'train.lr'?)"),
        ("learning_rate", "unknown key 'learning_rate' (did you mean 'train.lr'?"),
        ("method.gradient.grit.damping", "(did you mean 'method.gradient.grit.kfac_damping'?)"),
        ("method.adapter.R", "for method.adapter.kind=lora (did you mean 'method.adapter.dual_rank_lora.R'?)"),
        ("method.gradient.history.enabled", "(did you mean 'method.gradient.shake_align.history.enabled'?)"),
    ],
)
def test_an_unknown_key_is_one_line_with_a_did_you_mean_and_exit_2(key, message, capsys):
    assert main(["config", "explain", key, "method.name=lora"]) == 2
    captured = capsys.readouterr()
    (line,) = captured.err.splitlines()
    assert line.startswith("loralab: error: unknown key") and message in line
    assert captured.out == ""
