"""Gradient rules (the second method axis). `build_rule` maps method.gradient options to one.

Each rule registers its builder here with one line (its options class is registered in config/schema.py);
docs/config.md, "Adding an adapter kind or a gradient rule", gives the steps.
"""

from __future__ import annotations

from typing import Any

from loralab.gradient.base import RULES, GradientRule, NoRule, register_rule
from loralab.gradient.grit import Grit
from loralab.gradient.shake_align import ShakeAlign

register_rule("none", lambda options: NoRule())
register_rule("shake_align", ShakeAlign)
register_rule("grit", Grit)


def build_rule(options: Any) -> GradientRule:
    """The gradient rule for `method.gradient` options."""
    return RULES.lookup(options.kind, "method.gradient.kind")(options)


__all__ = ["RULES", "GradientRule", "NoRule", "build_rule", "register_rule"]
