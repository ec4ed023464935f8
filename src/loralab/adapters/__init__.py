"""Adapters: what is trainable and how it is inserted. `build_adapter` maps method.adapter to one.

Each kind registers its builder here with one line (its options class is registered in config/schema.py);
docs/config.md, "Adding an adapter kind or a gradient rule", gives the steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loralab.adapters.base import (
    ADAPTERS,
    SIDE_FILE,
    Adapter,
    LoraView,
    read_json,
    register_adapter,
    require_directory,
)
from loralab.adapters.dual_rank import DualRankLoraAdapter
from loralab.adapters.houlsby import HoulsbyAdapter
from loralab.adapters.lora import LoraAdapter
from loralab.adapters.peft_any import ADAPTER_CONFIG, AnyPeftAdapter, load_peft_adapter
from loralab.adapters.prefix import PrefixAdapter
from loralab.adapters.subset import BitfitAdapter, FullAdapter
from loralab.errors import AdapterError

register_adapter("lora", lambda options, head: LoraAdapter(head, options))
register_adapter("dual_rank_lora", lambda options, head: DualRankLoraAdapter(head, options))
register_adapter("full", lambda options, head: FullAdapter())
register_adapter("bitfit", lambda options, head: BitfitAdapter(options.train_layernorm))
register_adapter("peft", lambda options, head: AnyPeftAdapter(head, options.peft_type, options.kwargs))
register_adapter("houlsby", lambda options, head: HoulsbyAdapter(options.bottleneck, options.init_std))
register_adapter(
    "prefix",
    lambda options, head: PrefixAdapter(options.num_virtual_tokens, options.projection, options.projection_hidden),
)


def build_adapter(options: Any, head: str) -> Adapter:
    """The adapter for `method.adapter` options on a model with the given head (seq_cls | causal_lm | masked_lm)."""
    return ADAPTERS.lookup(options.kind, "method.adapter.kind")(options, head)


def load_adapter(model: Any, directory: str | Path, adapter_name: str = "default") -> Any:
    """Load any adapter loralab writes (or any PEFT adapter, as `adapter_name`) onto a base model."""
    directory = require_directory(Path(directory))
    kind = read_json(directory / SIDE_FILE).get("adapter") if (directory / SIDE_FILE).is_file() else None
    native = {"full": FullAdapter(), "bitfit": BitfitAdapter(), "houlsby": HoulsbyAdapter(), "prefix": PrefixAdapter()}
    if kind in native:
        return native[kind].load(model, directory)
    if (directory / ADAPTER_CONFIG).is_file():
        return load_peft_adapter(model, directory, adapter_name=adapter_name)
    raise AdapterError(f"{directory} is not an adapter directory (no {ADAPTER_CONFIG} or {SIDE_FILE})")


__all__ = ["ADAPTERS", "Adapter", "LoraView", "build_adapter", "load_adapter", "load_peft_adapter", "register_adapter"]
