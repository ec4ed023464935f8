"""`method.adapter.kind: lora` — PEFT LoRA (rsLoRA, DoRA, init variants, layer selection) and its views."""

from __future__ import annotations

from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from torch import nn

from loralab.adapters.base import LoraView
from loralab.adapters.peft_any import TASK_TYPES, PeftAdapter
from loralab.adapters.targets import resolve_targets
from loralab.config.schema import LoraOptions


class LoraAdapter(PeftAdapter):
    """PEFT LoRA with loralab's target presets resolved per architecture."""

    name = "lora"

    def __init__(self, head: str, options: LoraOptions) -> None:
        super().__init__(head)
        self.options = options

    def peft_config(self, model: nn.Module) -> LoraConfig:
        o = self.options
        return LoraConfig(
            task_type=TASK_TYPES[self.head],
            r=o.r,
            lora_alpha=o.alpha,
            lora_dropout=o.dropout,
            target_modules=resolve_targets(o.target_modules, model),
            use_rslora=o.use_rslora,
            use_dora=o.use_dora,
            init_lora_weights=o.init_lora_weights,
            layers_to_transform=o.layers_to_transform,
            bias=o.bias,
        )

    def lora_modules(self, model: nn.Module) -> dict[str, LoraView]:
        return peft_lora_views(model)


def peft_lora_views(model: nn.Module, adapter_name: str = "default") -> dict[str, LoraView]:
    """A view of every PEFT LoRA layer of the active adapter, keyed by module name."""
    views = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
            views[name] = LoraView(
                module=module,
                A=module.lora_A[adapter_name].weight,
                B=module.lora_B[adapter_name].weight,
                scaling=float(module.scaling[adapter_name]),
            )
    return views
