"""The HPO search space and grids: `hpo.space` parsed and checked before anything trains (no Optuna here).

`hpo.space` maps dotted config keys to one distribution each: `{log_uniform: [lo, hi]}`, `{uniform: [lo, hi]}`,
`{int: [lo, hi]}`, `{choice: [v, ...]}`, or a bare list (a grid list, the same as `choice`). The keys may also be
nested (`train: {lr: {...}}`, which is what `--set hpo.space.train.lr=...` writes); they are flattened to dotted
keys. A value becomes a `--set key=value` override of the trial's config.
"""

from __future__ import annotations

import difflib
import itertools
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Literal

from loralab.config.schema import SHAKE_ALIGN_KNOBS, HierarchicalConfig, HpoConfig, LrGridConfig
from loralab.errors import ConfigError, unknown

DISTRIBUTIONS = ("log_uniform", "uniform", "int", "choice", "grid")
UNSEARCHABLE = ("hpo", "io")  # sections a trial cannot vary
SCIENTIFIC = re.compile(r"^[-+]?\d+(\.\d*)?[eE][-+]?\d+$")  # 1e-6: a string to YAML 1.1, a number here
Kind = Literal["log_uniform", "uniform", "int", "choice"]


@dataclass(frozen=True)
class Dim:
    """One dimension: a range (low, high) for log_uniform / uniform / int, or the choices."""

    kind: Kind
    values: tuple

    @property
    def is_choice(self) -> bool:
        return self.kind == "choice"

    def probes(self) -> tuple:
        """The values that check the dimension against the config: every choice, or both ends of a range."""
        return self.values


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings down to the leaves (a list, or a one-key mapping naming a distribution) as dotted keys."""
    if not isinstance(tree, dict):
        raise ConfigError(f"hpo.space{'.' + prefix if prefix else ''} must be a mapping, got {type(tree).__name__}")
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        is_leaf = isinstance(value, list) or (isinstance(value, dict) and len(value) == 1 and is_distribution(value))
        if is_leaf or not isinstance(value, dict):
            flat[dotted] = value
        else:
            flat.update(flatten(value, dotted))
    return flat


def is_distribution(value: dict) -> bool:
    """A one-key mapping whose key is a distribution name, or close to one (then parse_dim says which)."""
    [key] = value
    return key in DISTRIBUTIONS or bool(difflib.get_close_matches(str(key), DISTRIBUTIONS, n=1, cutoff=0.75))


def parse_space(raw: dict) -> dict[str, Dim]:
    """`hpo.space` as dotted key → Dim; a bad entry is a one-line ConfigError."""
    return {key: parse_dim(key, spec) for key, spec in flatten(raw).items()}


def parse_dim(key: str, spec: Any) -> Dim:
    where = f"hpo.space.{key}"
    if key.split(".")[0] in UNSEARCHABLE:
        raise ConfigError(f"{where}: keys under {' and '.join(UNSEARCHABLE)} cannot be searched")
    if isinstance(spec, list):
        return Dim("choice", check_choices(where, spec))
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"{where}: expected a list or one of {{{': ..., '.join(DISTRIBUTIONS)}: ...}}, got {spec!r}")
    [(name, args)] = spec.items()
    if name not in DISTRIBUTIONS:
        raise ConfigError(f"{where}: " + unknown("distribution", str(name), DISTRIBUTIONS))
    if name in ("choice", "grid"):
        return Dim("choice", check_choices(where, args))
    low, high = check_range(where, name, args)
    return Dim(name, (low, high))


def number_text(value: Any) -> Any:
    """`1e-6` as the float YAML 1.1 did not make of it; any other value unchanged."""
    return float(value) if isinstance(value, str) and SCIENTIFIC.match(value) else value


def check_choices(where: str, values: Any) -> tuple:
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}: choice needs a non-empty list of values, got {values!r}")
    values = [number_text(v) for v in values]
    for value in values:
        if value is not None and not isinstance(value, str | int | float | bool):
            raise ConfigError(f"{where}: choice values must be numbers, strings, booleans or null, got {value!r}")
    if len({json.dumps(v) for v in values}) != len(values):
        raise ConfigError(f"{where}: choice has repeated values: {values!r}")
    return tuple(values)


def check_range(where: str, name: str, args: Any) -> tuple[float, float]:
    args = [number_text(a) for a in args] if isinstance(args, list) else args
    numbers = isinstance(args, list) and len(args) == 2 and all(is_number(a) for a in args)
    if name == "int":
        numbers = numbers and all(isinstance(a, int) for a in args)
    if not numbers:
        what = "two integers" if name == "int" else "two numbers"
        raise ConfigError(f"{where}: {name} needs [low, high] ({what}), got {args!r}")
    low, high = args
    if not low < high:
        raise ConfigError(f"{where}: {name} needs low < high, got [{low}, {high}]")
    if name == "log_uniform" and low <= 0:
        raise ConfigError(f"{where}: log_uniform needs low > 0, got [{low}, {high}]")
    return (low, high) if name == "int" else (float(low), float(high))


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def grid_points(dims: dict[str, Dim]) -> list[dict[str, Any]]:
    """Every combination of the choices, the first key varying slowest."""
    keys = list(dims)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(dims[k].values for k in keys))]


def format_value(value: Any) -> str:
    """A value as the text of a `--set key=value` override that YAML reads back as the same value."""
    if isinstance(value, float):
        text = repr(value)
        mantissa, _, exponent = text.partition("e")
        if exponent and "." not in mantissa:  # YAML reads 1e-05 as a string, 1.0e-05 as a float
            text = f"{mantissa}.0e{exponent}"
        return text
    return json.dumps(value)


def overrides(params: dict[str, Any]) -> list[str]:
    return [f"{key}={format_value(value)}" for key, value in params.items()]


# ---- the hierarchical grids (the Shake-to-Align scaffold's protocol) -------------------------------------------------


def knobs(config: HierarchicalConfig) -> dict[str, list]:
    """The method's knobs: dotted key → candidates (the Shake-to-Align defaults when unset)."""
    raw = SHAKE_ALIGN_KNOBS if config.knobs is None else config.knobs
    flat = flatten(raw)
    for key, values in flat.items():
        check_choices(f"hpo.hierarchical.knobs.{key}", values)
    return {key: list(values) for key, values in flat.items()}


def lr_grid(config: LrGridConfig) -> list[float]:
    """10^e for `points` exponents evenly spaced from min_exp to max_exp."""
    if config.points == 1:
        return [10.0**config.min_exp]
    step = (config.max_exp - config.min_exp) / (config.points - 1)
    return [float(f"{10.0 ** (config.min_exp + i * step):.6g}") for i in range(config.points)]


def evenly(values: list, count: int) -> list:
    """`count` of `values` evenly spread over the list, both ends included (rounded half up)."""
    if count >= len(values):
        return list(values)
    if count == 1:
        return [values[len(values) // 2]]
    last = len(values) - 1
    return [values[(2 * i * last + count - 1) // (2 * (count - 1))] for i in range(count)]


def nearest_index(grid: list[float], value: float) -> int:
    """The grid point nearest to `value` on a log scale."""
    return min(range(len(grid)), key=lambda i: abs(math.log(grid[i]) - math.log(value)))


def neighbourhood(grid: list[float], value: float, count: int) -> list[float]:
    """The `count` grid points centred on the one nearest `value`, clipped at the grid's ends (then fewer)."""
    centre = nearest_index(grid, value)
    low = max(0, centre - (count - 1) // 2)
    high = min(len(grid) - 1, centre + count // 2)
    return grid[low : high + 1]


# ---- validation of the whole section --------------------------------------------------------------


def check_hpo_section(hpo: HpoConfig) -> None:
    """What every config load checks (the section is inert outside `loralab hpo`): entries that parse."""
    dims = parse_space(hpo.space)
    if hpo.seeds is not None and not hpo.seeds:
        raise ConfigError("hpo.seeds: give a non-empty list of seeds, or null for the config's seed")
    if hpo.grace_period is not None and hpo.grace_period <= hpo.heartbeat_interval:
        raise ConfigError(
            f"hpo.grace_period ({hpo.grace_period}) must be longer than hpo.heartbeat_interval "
            f"({hpo.heartbeat_interval})"
        )
    if hpo.sampler == "grid" and hpo.mode == "single":
        ranges = [key for key, dim in dims.items() if not dim.is_choice]
        if ranges:
            raise ConfigError(
                f"hpo.sampler=grid needs a choice list in every dimension; hpo.space.{ranges[0]} is "
                f"{dims[ranges[0]].kind}"
            )
    if hpo.mode == "hierarchical":
        if dims:
            raise ConfigError("hpo.space is not used with hpo.mode=hierarchical (its knobs are hpo.hierarchical.knobs)")
        check_hierarchical(hpo.hierarchical)


def check_search(hpo: HpoConfig) -> None:
    """What `loralab hpo` needs besides: a space to search (single mode) and, beyond a grid, a trial count."""
    if hpo.mode == "hierarchical" or hpo.top_k:
        return
    if not hpo.space:
        raise ConfigError(
            "hpo.space is empty: give dotted keys and distributions, e.g. train.lr: {log_uniform: [1e-5, 1e-3]}"
        )
    if hpo.sampler != "grid" and hpo.n_trials is None:
        raise ConfigError(f"hpo.n_trials is needed with hpo.sampler={hpo.sampler} (null means the grid's size)")


def check_hierarchical(config: HierarchicalConfig) -> None:
    where = "hpo.hierarchical"
    grid = config.lr_grid
    if grid.points > 1 and not grid.min_exp < grid.max_exp:
        raise ConfigError(f"{where}.lr_grid: min_exp ({grid.min_exp:g}) must be below max_exp ({grid.max_exp:g})")
    for name in ("baseline_lr_points", "lr_neighbor_points"):
        if getattr(config, name) > grid.points:
            raise ConfigError(f"{where}.{name} ({getattr(config, name)}) cannot exceed lr_grid.points ({grid.points})")
    if not config.warmup_grid or not all(0 <= w <= 1 for w in config.warmup_grid):
        raise ConfigError(f"{where}.warmup_grid: give warmup ratios in [0, 1], got {config.warmup_grid!r}")
    if len(config.epochs) != 3 or not all(e > 0 for e in config.epochs):
        raise ConfigError(f"{where}.epochs: give three positive budgets (s1, s2, s3), got {config.epochs!r}")
    weights = config.score_weights
    if len(weights) != 3 or min(weights) < 0 or sum(weights) <= 0:
        raise ConfigError(f"{where}.score_weights: give three weights ≥ 0 (best, final, mean), got {weights!r}")
    if not knobs(config):
        raise ConfigError(f"{where}.knobs: give at least one knob, e.g. method.gradient.eta: [0.1, 0.2]")
