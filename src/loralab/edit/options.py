"""The parameters of a spectral edit (`EditRule`) and their choices: no torch, so the CLI can build its flags."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from loralab.errors import ConfigError

CHOICES = {
    "mode": ("abs_select", "random_index", "gd"),
    "update_mode": ("multiplicative", "additive"),
    "grad_norm": ("mean_abs", "l2", "none"),
    "preserve_energy": ("l1", "l2", "none"),
}

FIELD_HELP = {  # the CLI's help for each EditRule field (its default is added)
    "mode": "abs_select: scale the largest-|g| directions up, the smallest down; random_index: the same counts at "
    "random; gd: one gradient step on σ",
    "core_frac": "share of the rank scaled by amp_factor (abs_select, random_index)",
    "noise_frac": "share of the rank scaled by sup_factor (abs_select, random_index)",
    "amp_factor": "factor on the core directions",
    "sup_factor": "factor on the noise directions",
    "mid_factor": "factor on the other directions",
    "eta": "gd: the step size η",
    "update_mode": "gd: σ·exp(−η g) (multiplicative) or σ − η g (additive)",
    "asymmetric_update": "gd: 2.0·relu(g)^p − 0.2·relu(−g) in place of η g",
    "pos_power": "gd with asymmetric_update: the power p",
    "grad_norm": "gd: how g is normalised (mean_abs, l2, none)",
    "preserve_energy": "rescale σ to keep Σσ (l1), ‖σ‖ (l2), or neither (none)",
    "sigma_clip_min": "lower clamp of the new σ",
    "seed": "random_index: seed of the random directions",
}


@dataclass(frozen=True)
class EditRule:
    """The σ-editing parameters of every mode, with the published defaults."""

    mode: Literal["abs_select", "random_index", "gd"] = "abs_select"
    core_frac: float = 0.2
    noise_frac: float = 0.2
    amp_factor: float = 1.25
    sup_factor: float = 0.80
    mid_factor: float = 1.0
    eta: float = 0.2
    update_mode: Literal["multiplicative", "additive"] = "multiplicative"
    asymmetric_update: bool = False
    pos_power: float = 1.0
    grad_norm: Literal["mean_abs", "l2", "none"] = "mean_abs"
    preserve_energy: Literal["l1", "l2", "none"] = "l1"
    sigma_clip_min: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        for name in ("core_frac", "noise_frac"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        if self.core_frac + self.noise_frac > 1:  # the two shares would overlap and the edit undo itself
            raise ConfigError(f"core_frac + noise_frac must be at most 1, got {self.core_frac} + {self.noise_frac}")
        for name in ("amp_factor", "sup_factor", "mid_factor", "sigma_clip_min"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("eta", "pos_power"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")

    def as_dict(self) -> dict:
        return asdict(self)
