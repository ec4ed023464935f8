"""Compose YAML files and `--set` overrides over the packaged defaults, validate, and hash the result.

Order (later wins): `configs/base.yaml` → the method preset named by `method.name` and the task definition
named by `task.name` (under the user's keys of that section) → each `--config FILE` → each `a.b.c=value`
override. Validation happens here, before anything runs: every problem is a ConfigError with one line of text.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from loralab.config.familiar import familiar_hint
from loralab.config.registry import ADAPTER_OPTIONS, GRADIENT_OPTIONS
from loralab.config.schema import MethodConfig, RunConfig, TaskConfig
from loralab.config.tasks import check_task, compose_task
from loralab.errors import ConfigError, did_you_mean, unknown

CONFIGS = resources.files("loralab") / "configs"
HASH_EXCLUDED = ("seed", "io", "log", "hpo")
DEFAULT_EXPERIMENT = "quickstart"  # what the CLI's run verbs compose over when no --config is given


def load_config(files: list[str] | tuple[str, ...] = (), overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Resolve and validate a run configuration from config files and dotted overrides."""
    return build_run_config(compose(files, overrides))


def compose(files: list[str] | tuple[str, ...] = (), overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """Merge base.yaml, the method preset, the files and the overrides into one plain dict."""
    user: dict = {}
    for file in files:
        deep_merge(user, read_yaml_file(config_file(file)))
    for override in overrides:
        key, value = parse_override(override)
        set_dotted(user, key, value)
    merged = read_packaged("base.yaml")
    base_task = merged["task"]
    deep_merge(merged, {k: v for k, v in user.items() if k not in ("method", "task")})
    merged["method"] = compose_method(merged.get("method", {}), user.get("method", {}))
    merged["task"] = compose_task(base_task, user.get("task", {}))
    return merged


def task_section(value: str) -> dict:
    """A `--task` argument as task keys: a built-in (or own) name, or a YAML file with a `task:` section."""
    if Path(value).suffix not in (".yaml", ".yml"):
        return {"name": value}
    section = read_yaml_file(Path(value)).get("task")
    if not isinstance(section, dict):
        raise ConfigError(f"{value} has no task: section (a mapping of task keys)")
    return section


def load_task_config(**keys: Any) -> TaskConfig:
    """A validated task section from keys (a built-in's definition under them), as `task:` in a config file."""
    task = build_dataclass(TaskConfig, compose_task(read_packaged("base.yaml")["task"], keys), "task")
    check_task(task)
    return task


def compose_method(base: dict, user: Any) -> dict:
    """Layer a method: the kind's option defaults ← the preset's section (same kind only) ← the user's keys."""
    if not isinstance(user, dict):
        raise ConfigError(f"method must be a mapping, got {type(user).__name__}")
    name = user.get("name", base.get("name"))
    preset = read_preset(name)
    method = {"name": name}
    for axis, registry in (("adapter", ADAPTER_OPTIONS), ("gradient", GRADIENT_OPTIONS)):
        preset_part, user_part = preset.get(axis, {}), user.get(axis, {})
        if not isinstance(user_part, dict):
            raise ConfigError(f"method.{axis} must be a mapping, got {type(user_part).__name__}")
        kind = user_part.get("kind", preset_part.get("kind"))
        section = dataclasses.asdict(registry.lookup(kind, f"method.{axis}.kind")())
        if preset_part.get("kind") == kind:
            deep_merge(section, preset_part)
        deep_merge(section, user_part)
        method[axis] = section
    unexpected = set(user) - {"name", "adapter", "gradient"}
    if unexpected:
        key = sorted(unexpected)[0]
        raise ConfigError(unknown_key(f"method.{key}", ["name", "adapter", "gradient"]))
    return method


def preset_names() -> list[str]:
    """Names of the packaged method presets (`method.name`)."""
    return sorted(p.name.removesuffix(".yaml") for p in (CONFIGS / "methods").iterdir() if p.name.endswith(".yaml"))


def read_preset(name: Any) -> dict:
    if not isinstance(name, str) or name not in preset_names():
        raise ConfigError("method.name: " + unknown("method preset", str(name), preset_names()))
    return read_packaged(f"methods/{name}.yaml")


def read_packaged(relative: str) -> dict:
    return yaml.safe_load((CONFIGS / relative).read_text()) or {}


def packaged_experiment(name: str) -> Path:
    """Path of a packaged experiment config such as `quickstart`."""
    return Path(str(CONFIGS / "experiments" / f"{name}.yaml"))


def experiment_names() -> list[str]:
    """Names of the packaged experiments (`--config NAME`): configs/experiments/*.yaml."""
    folder = CONFIGS / "experiments"
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def config_file(value: str | Path) -> Path:
    """A `--config` value as a file: an existing path, else a packaged experiment by name (`quickstart`,
    `grit_alpaca.yaml`, `experiments/grit_alpaca.yaml`); neither is a ConfigError naming the packaged ones."""
    path = Path(value)
    if path.is_file():
        return path
    name = path.as_posix().removeprefix("experiments/").removesuffix(".yaml").removesuffix(".yml")
    if name in experiment_names():
        return packaged_experiment(name)
    hint = did_you_mean(name, experiment_names()) or f"; packaged experiments: {', '.join(experiment_names())}"
    raise ConfigError(f"config file not found: {value}" + hint)


def run_files(files: list[str] | tuple[str, ...]) -> list[str]:
    """The config files a CLI run composes: those given, or the packaged quickstart experiment when none is."""
    return list(files) or [str(packaged_experiment(DEFAULT_EXPERIMENT))]


def experiment_summary(name: str) -> str:
    """The first comment line of a packaged experiment, without its `# `."""
    for line in packaged_experiment(name).read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
    return ""


def schedule_names() -> list[str]:
    """Names of the packaged HPO schedules (`hpo.schedule`): configs/schedules/*.yaml."""
    return sorted(p.name.removesuffix(".yaml") for p in (CONFIGS / "schedules").iterdir() if p.name.endswith(".yaml"))


def packaged_schedule(name: str) -> Path:
    """Path of a packaged HPO schedule; an unknown name is a ConfigError."""
    if name not in schedule_names():
        raise ConfigError("hpo.schedule: " + unknown("schedule", name, schedule_names()))
    return Path(str(CONFIGS / "schedules" / f"{name}.yaml"))


def read_yaml_file(path: Path) -> dict:
    """Read one user config file; missing, unreadable or malformed files are ConfigErrors."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"malformed YAML in {path}{where}: {problem}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level, not {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """Split `a.b.c=value` and parse the value as a YAML scalar or list."""
    key, sep, raw = text.partition("=")
    key = key.strip().removeprefix("--")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' is not of the form a.b.c=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{key}': '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def deep_merge(target: dict, source: dict) -> dict:
    """Merge `source` into `target` in place; nested mappings merge, everything else replaces."""
    for key, value in source.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            deep_merge(target[key], value)
        else:
            target[key] = value
    return target


# ---- validation -----------------------------------------------------------------------------------


def build_run_config(data: dict) -> RunConfig:
    """Validate a composed dict against the schema and return the frozen RunConfig."""
    method = data.get("method", {})
    built = build_dataclass(RunConfig, {**data, "method": {}}, "", skip={"method"})
    method_cfg = MethodConfig(
        name=method["name"],
        adapter=build_dataclass(ADAPTER_OPTIONS[method["adapter"]["kind"]], method["adapter"], "method.adapter"),
        gradient=build_dataclass(GRADIENT_OPTIONS[method["gradient"]["kind"]], method["gradient"], "method.gradient"),
    )
    config = dataclasses.replace(built, method=method_cfg)
    check_combinations(config)
    return config


def build_dataclass(cls: type, data: Any, path: str, skip: set[str] = frozenset()) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            raise ConfigError(unknown_key(join(path, key), fields))
    values = {}
    for name, fld in fields.items():
        where = join(path, name)
        if name in skip:
            values[name] = None
            continue
        if name not in data:
            if fld.default is dataclasses.MISSING and fld.default_factory is dataclasses.MISSING:
                raise ConfigError(f"missing key '{where}'")
            continue
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = build_dataclass(hint, data[name], where)
        else:
            values[name] = check_value(data[name], hint, where)
            check_limits(values[name], fld.metadata, where)
    return cls(**values)


def check_value(value: Any, hint: Any, where: str) -> Any:
    """Return `value` converted to `hint` (int → float, '1e-4' → float), or raise a ConfigError."""
    converted = convert(value, hint)
    if converted is INVALID:
        raise ConfigError(f"{where}: expected {describe(hint)}, got {value!r}{literal_hint(value, hint)}")
    return converted


def literal_hint(value: Any, hint: Any) -> str:
    """' (did you mean X?)' for a misspelt choice of a Literal field (possibly optional), else ''."""
    options = [hint, *typing.get_args(hint)] if typing.get_origin(hint) in (typing.Union, types.UnionType) else [hint]
    choices = [str(v) for option in options if typing.get_origin(option) is Literal for v in typing.get_args(option)]
    return did_you_mean(value, choices) if isinstance(value, str) and choices else ""


INVALID = object()


def convert(value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            result = convert(value, option)
            if result is not INVALID:
                return result
        return INVALID
    if origin is Literal:
        return value if value in typing.get_args(hint) and not isinstance(value, bool) else INVALID
    if origin is list:
        if not isinstance(value, list):
            return INVALID
        items = [convert(item, typing.get_args(hint)[0]) for item in value]
        return INVALID if any(item is INVALID for item in items) else items
    if origin is dict:
        return value if isinstance(value, dict) else INVALID
    if hint is type(None):
        return None if value is None else INVALID
    if hint is bool:
        return value if isinstance(value, bool) else INVALID
    if hint is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else INVALID
    if hint is float:
        return to_float(value)
    if hint is str:
        return value if isinstance(value, str) else INVALID
    return INVALID


def to_float(value: Any) -> Any:
    if isinstance(value, bool):
        return INVALID
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return INVALID
    return INVALID


def describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(option) for option in typing.get_args(hint))
    if origin is Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(hint))
    if origin is list:
        return f"a list of {describe(typing.get_args(hint)[0])}"
    if origin is dict:
        return "a mapping"
    if hint is type(None):
        return "null"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def check_limits(value: Any, limits: typing.Mapping[str, float], where: str) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return
    rules = {
        "min": (lambda v, b: v >= b, "≥"),
        "max": (lambda v, b: v <= b, "≤"),
        "gt": (lambda v, b: v > b, ">"),
        "lt": (lambda v, b: v < b, "<"),
    }
    for name, bound in limits.items():
        if name not in rules:
            continue
        ok, symbol = rules[name]
        if not ok(value, bound):
            raise ConfigError(f"{where}: must be {symbol} {bound:g}, got {value!r}")


def check_combinations(config: RunConfig) -> None:
    """Reject combinations that cannot run, before any model is loaded: each section's `check` (beside its fields
    in schema.py; the adapter's and the rule's options check what their kind needs), then the hpo section."""
    check_task(config.task)
    for section in (config.train, config.method.adapter, config.eval, config.diffusion, config.method.gradient):
        check = getattr(section, "check", None)
        if check is not None:
            check(config)
    check_hpo(config)


def check_hpo(config: RunConfig) -> None:
    """The hpo section: its schedule exists and its search space parses (config/hpo_space.py)."""
    from loralab.config.hpo_space import check_hpo_section

    if config.hpo.schedule is not None:
        packaged_schedule(config.hpo.schedule)
    check_hpo_section(config.hpo)


def unknown_key(where: str, known: typing.Iterable[str]) -> str:
    """An unknown dotted key in one line: loralab's name for a familiar HF/PEFT name, else the closest known key."""
    return f"unknown key '{where}'" + (familiar_hint(where) or did_you_mean(where.rpartition(".")[2], known))


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


# ---- hashing and serialisation --------------------------------------------------------------------


def dotted_items(tree: dict, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as dotted keys to its leaves (`train.lr`): the form of tables and tracker parameters."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(dotted_items(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_to_dict(config: RunConfig) -> dict:
    """The resolved config as plain data (what config.yaml holds)."""
    return dataclasses.asdict(config)


def hashed_sections(tree: dict[str, Any], model_kind: str) -> dict[str, Any]:
    """The sections of a config (as plain data) that the run hash covers: all but HASH_EXCLUDED, and diffusion
    only for masked-diffusion runs."""
    excluded = HASH_EXCLUDED if model_kind == "masked_diffusion" else (*HASH_EXCLUDED, "diffusion")
    return {key: value for key, value in tree.items() if key not in excluded}


def config_hash(config: RunConfig) -> str:
    """Stable 8-hex-digit hash of everything that changes results, except the seed (it names the seed dir).

    The diffusion section changes only masked-diffusion runs, so other runs keep the hash they had without it.
    """
    data = hashed_sections(config_to_dict(config), config.model.kind)
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:8]


def dump_yaml(config: RunConfig) -> str:
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)
