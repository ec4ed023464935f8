"""Gradient rules (the second method axis). `build_rule` maps method.gradient options to one."""

from __future__ import annotations

from typing import Any

from loralab.gradient.base import GradientRule, NoRule
from loralab.gradient.grit import Grit
from loralab.gradient.shake_align import ShakeAlign


def build_rule(options: Any) -> GradientRule:
    """The gradient rule for `method.gradient` options."""
    if options.kind == "none":
        return NoRule()
    if options.kind == "shake_align":
        return ShakeAlign(options)
    if options.kind == "grit":
        return Grit(options)
    raise ValueError(f"no gradient rule for kind {options.kind!r}")


__all__ = ["GradientRule", "NoRule", "build_rule"]
