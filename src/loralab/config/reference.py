"""The configuration reference, generated from the schema: docs/config.md, the README's key tables, `config explain`.

One source: each field's type, limits and help in schema.py, the core sections' defaults in configs/base.yaml and
each registered kind's defaults in its options class. `python -m loralab.config.reference --write` regenerates the
two files; `--check` exits 1 when either is stale (tests/test_config_docs.py runs the same comparison).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from loralab.config.familiar import familiar_hint
from loralab.config.load import preset_names, read_packaged, schedule_names
from loralab.config.registry import ADAPTER_OPTIONS, GRADIENT_OPTIONS, Registry
from loralab.config.schema import RunConfig
from loralab.errors import ConfigError, did_you_mean

DOCS_FILE, README_FILE = Path("docs/config.md"), Path("README.md")  # relative to the repository checkout
START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"
AXES: dict[str, Registry[type]] = {"adapter": ADAPTER_OPTIONS, "gradient": GRADIENT_OPTIONS}
HOW_TO_ADD_A_KIND = """## Adding an adapter kind or a gradient rule

Kinds are found by registration, as lm-evaluation-harness finds its filters: a registry maps each kind's name to
its options class (config layer, `config/registry.py`) and another to its builder (`adapters/base.py`
`ADAPTERS`, `gradient/base.py` `RULES`). The config layer never imports `adapters/` or `gradient/`, so it can
validate, document and explain every kind on its own; validation, `compose`, this file and `loralab config
explain` read the registries, never a list of kinds.

An adapter kind `mykind`:

1. **One new file**, `src/loralab/adapters/mykind.py`: a class with the `Adapter` protocol (`adapters/base.py`:
   `apply`, `lora_modules`, `save`, `load`, `name`).
2. **Its options** in `src/loralab/config/schema.py`: a frozen dataclass under `@adapter_options` whose first
   field is `kind: Literal["mykind"] = option("mykind", help=...)`, every other field `option(default,
   help=..., min=...)`; checks that involve other sections go in a `check(self, config)` method beside the
   fields (raise `ConfigError` with one line).
3. **One registration line** in `src/loralab/adapters/__init__.py`:
   `register_adapter("mykind", lambda options, head: MyAdapter(head, options))` (or `@register_adapter("mykind")`
   on a builder function `(options, head) -> Adapter` in the new file, imported by `__init__`).
4. A method preset `src/loralab/configs/methods/<name>.yaml` if a `method.name` should select it, then
   `python -m loralab.config.reference --write` to regenerate this file and the README's tables.

A gradient rule `myrule`: the same with `src/loralab/gradient/myrule.py` (a `GradientRule`; subclass
`RuleDefaults` in `gradient/base.py` and override what the rule changes), `@rule_options` on its options class,
and `register_rule("myrule", MyRule)` in `src/loralab/gradient/__init__.py` (the builder takes the options).

Code outside loralab (a plugin, a test) may define the options class and the builder in one module of its own;
it registers both when imported, before the config is loaded: `tests/test_registries.py` trains a toy adapter
kind and a toy rule that way without touching any loralab file.
"""
LIMIT_SYMBOLS = {"min": "≥", "gt": ">", "max": "≤", "lt": "<"}


@dataclass(frozen=True)
class KeyDoc:
    """One leaf key of the configuration as the reference shows it."""

    key: str
    type: str
    default: str
    allowed: str
    help: str


def section_keys(cls: type, prefix: str, defaults: dict | None) -> list[KeyDoc]:
    """Every leaf key of a dataclass section (nested dataclasses flattened), defaults from `defaults` or the class."""
    hints = typing.get_type_hints(cls)
    rows = []
    for fld in dataclasses.fields(cls):
        hint, key = hints[fld.name], f"{prefix}{fld.name}"
        given = (defaults or {}).get(fld.name, class_default(fld))
        if dataclasses.is_dataclass(hint):
            rows += section_keys(hint, f"{key}.", given if isinstance(given, dict) else None)
            continue
        rows.append(
            KeyDoc(key, type_name(hint), show(given), allowed(hint, fld.metadata), fld.metadata.get("help", ""))
        )
    return rows


def class_default(fld: dataclasses.Field) -> Any:
    """A field's default in the class; MISSING when base.yaml gives it."""
    if fld.default_factory is not dataclasses.MISSING:
        value = fld.default_factory()
        return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return fld.default


def core_keys() -> list[KeyDoc]:
    """The keys of every core section (and the top-level seeds), defaults from base.yaml."""
    base = read_packaged("base.yaml")
    rows = section_keys(RunConfig, "", base)
    packaged = {"method.name": preset_names(), "hpo.schedule": schedule_names()}  # the names of packaged files
    rows = [
        dataclasses.replace(row, allowed=" · ".join(packaged[row.key])) if row.key in packaged else row for row in rows
    ]
    return [row for row in rows if not row.key.startswith("method.") or row.key == "method.name"]


def kind_keys(axis: str, kind: str) -> list[KeyDoc]:
    """The keys of one registered kind of `method.adapter` or `method.gradient`."""
    return section_keys(AXES[axis][kind], f"method.{axis}.", None)


def type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(type_name(option) for option in typing.get_args(hint))
    if origin is Literal:
        return "str"
    if origin is list:
        return f"list[{type_name(typing.get_args(hint)[0])}]"
    if origin is dict:
        return "mapping"
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", str(hint))


def allowed(hint: Any, metadata: typing.Mapping[str, Any]) -> str:
    """Literal choices and numeric limits, e.g. `linear · cosine · constant` or `≥ 1`."""
    choices = [True, False] if hint is bool else literal_choices(hint)
    limits = [f"{symbol} {metadata[name]:g}" for name, symbol in LIMIT_SYMBOLS.items() if name in metadata]
    return " · ".join(show(choice) for choice in choices) if choices else ", ".join(limits)


def literal_choices(hint: Any) -> list[Any]:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return list(typing.get_args(hint))
    if origin in (typing.Union, types.UnionType, list):
        return [choice for option in typing.get_args(hint) for choice in literal_choices(option)]
    return []


def show(value: Any) -> str:
    """A default as YAML writes it: null, true, 0.0003, [a, b]."""
    if value is dataclasses.MISSING:
        return "—"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "[" + ", ".join(show(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key}: {show(item)}" for key, item in value.items()) + "}"
    return str(value)


# ---- Markdown -------------------------------------------------------------------------------------


def table(rows: list[KeyDoc], full: bool) -> list[str]:
    """A Markdown table: key, type (full only), default, allowed, help."""
    header = ["key", "type", "default", "allowed", "help"] if full else ["key", "default", "allowed", "help"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in rows:
        cells = [f"`{row.key}`", row.type, f"`{row.default}`", row.allowed, row.help]
        lines.append("| " + " | ".join(escape(cell) for cell in (cells if full else cells[:1] + cells[2:])) + " |")
    return lines


def escape(cell: str) -> str:
    return cell.replace("|", "\\|").replace("\\\\|", "\\|")


def sections_markdown(full: bool, level: str) -> list[str]:
    """Core sections, then each adapter kind and each gradient rule, each as a heading and a table."""
    lines: list[str] = []
    rows = core_keys()
    for section in dict.fromkeys(row.key.split(".")[0] if "." in row.key else "" for row in rows):
        members = [row for row in rows if (row.key.split(".")[0] if "." in row.key else "") == section]
        title = f"`{section}`" if section else "top level"
        doc = section_doc(section)
        lines += ["", f"{level} {title}", "", *([doc, ""] if doc else []), *table(members, full)]
    for axis, registry in AXES.items():
        for kind in registry:
            doc = first_line(registry[kind].__doc__)
            lines += ["", f"{level} `method.{axis}.kind: {kind}`", "", doc, "", *table(kind_keys(axis, kind), full)]
    return lines


def section_doc(section: str) -> str:
    if not section:
        return ""
    return first_line(typing.get_type_hints(RunConfig)[section].__doc__)


def first_line(doc: str | None) -> str:
    return " ".join((doc or "").strip().split("\n\n")[0].split())


def docs_markdown() -> str:
    """The whole of docs/config.md."""
    intro = [
        "# Configuration reference",
        "",
        "<!-- generated by `python -m loralab.config.reference --write` from src/loralab/config/schema.py and "
        "src/loralab/configs/base.yaml; do not edit by hand -->",
        "",
        "Every key of a run's configuration: its type, its default (core sections: `configs/base.yaml`; "
        "`method.adapter` and `method.gradient`: the options class of the chosen `kind`, before the method preset "
        "`method.name` fills its own values), the values it allows and what it means. "
        "`loralab config explain KEY` prints one entry; `loralab config show` prints the resolved values. "
        "How configs compose: the README's Configuration section; how to add a kind: the last section here.",
    ]
    return "\n".join([*intro, *sections_markdown(full=True, level="##"), "", HOW_TO_ADD_A_KIND])


def readme_block() -> str:
    """The generated key tables between the README's marker comments (markers included)."""
    note = "<!-- generated by `python -m loralab.config.reference --write`; edit the help in config/schema.py -->"
    return "\n".join([START, note, *sections_markdown(full=False, level="####"), "", END])


def with_readme_block(readme: str) -> str:
    """The README text with its generated block replaced; a README without the markers is a ConfigError."""
    if START not in readme or END not in readme:
        raise ConfigError(f"README.md has no {START} … {END} block")
    head, _, rest = readme.partition(START)
    _, _, tail = rest.partition(END)
    return head + readme_block() + tail


def stale_files(root: Path) -> list[Path]:
    """The generated files under the checkout `root` whose content differs from what the schema renders now."""
    docs, readme_file = root / DOCS_FILE, root / README_FILE
    stale = []
    if not docs.is_file() or docs.read_text() != docs_markdown():
        stale.append(DOCS_FILE)
    readme = readme_file.read_text()
    if with_readme_block(readme) != readme:
        stale.append(README_FILE)
    return stale


def write_files(root: Path) -> None:
    """Rewrite docs/config.md and the README's generated block in the checkout `root`."""
    (root / DOCS_FILE).write_text(docs_markdown())
    (root / README_FILE).write_text(with_readme_block((root / README_FILE).read_text()))


# ---- explain --------------------------------------------------------------------------------------


def all_keys(kinds: dict[str, str]) -> dict[str, KeyDoc]:
    """Every dotted key: core keys, the chosen kinds' keys as `method.<axis>.<field>`, and every registered kind's
    keys as `method.<axis>.<kind>.<field>`."""
    keys = {row.key: row for row in core_keys()}
    for axis, registry in AXES.items():
        for kind in registry:
            for row in kind_keys(axis, kind):
                field_name = row.key.removeprefix(f"method.{axis}.")
                keys[f"method.{axis}.{kind}.{field_name}"] = dataclasses.replace(
                    row, key=f"method.{axis}.{kind}.{field_name}"
                )
                if kinds.get(axis) == kind:
                    keys[row.key] = row
    return keys


def explain(key: str, kinds: dict[str, str], values: typing.Mapping[str, Any] | None = None) -> str:
    """The reference entry of one dotted key: `kinds` maps adapter/gradient to the kind `method.<axis>.x` means;
    `values` (dotted key → value of a resolved config) adds the value this config gives the key."""
    keys = all_keys(kinds)
    axis = current_kind_axis(key)
    if key not in keys:
        suffix = key.removeprefix(f"method.{axis}.")
        owners = [f"method.{axis}.{kind}.{suffix}" for kind in AXES[axis]] if axis else []
        owners = [owner for owner in owners if owner in keys]
        if owners:
            also = f"; also {', '.join(owners[1:])}" if owners[1:] else ""
            hint = f" (did you mean '{owners[0]}'?{also})"
            raise ConfigError(f"unknown key '{key}' for method.{axis}.kind={kinds[axis]}{hint}")
        hint = familiar_hint(key) or did_you_mean(key, keys)
        raise ConfigError(f"unknown key '{key}'" + (hint or "; every key is in docs/config.md"))
    row = keys[key]
    plain_type = row.type.replace("\\", "")
    lines = [
        f"{row.key} (method.{axis}.kind: {kinds[axis]})" if axis else row.key,
        f"  type:    {plain_type}",
        f"  default: {row.default}",
        f"  allowed: {row.allowed or 'any ' + plain_type}",
        f"  help:    {row.help}",
    ]
    if values is not None and key in values and show(values[key]) != row.default:
        lines.insert(3, f"  value:   {show(values[key])} (this config)")
    return "\n".join(lines)


def current_kind_axis(key: str) -> str | None:
    """`adapter` or `gradient` for a key of the chosen kind (`method.adapter.r`), else None (a core key, or a
    key that names its kind: `method.gradient.grit.kfac_damping`)."""
    for axis, registry in AXES.items():
        prefix = f"method.{axis}."
        if key.startswith(prefix) and not any(key.startswith(f"{prefix}{kind}.") for kind in registry):
            return axis
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Regenerate or check docs/config.md and the README's key tables.")
    parser.add_argument("--write", action="store_true", help="rewrite the generated files")
    parser.add_argument("--check", action="store_true", help="exit 1 when a generated file is stale")
    parser.add_argument("--root", type=Path, default=Path.cwd(), help="the repository checkout (default: here)")
    args = parser.parse_args(argv)
    if args.write:
        write_files(args.root)
        return 0
    stale = stale_files(args.root)
    for path in stale:
        print(f"stale: {path} (run python -m loralab.config.reference --write)", file=sys.stderr)
    if args.check:
        return 1 if stale else 0
    print(docs_markdown(), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
