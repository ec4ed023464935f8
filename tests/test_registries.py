"""Kinds by registration: a toy adapter kind and a toy gradient rule, defined and registered only in this module,
validate, train and save through the ordinary CLI without any loralab file naming them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from loralab.adapters import ADAPTERS, build_adapter, register_adapter
from loralab.adapters.base import LoraView, is_head_parameter, write_side_file
from loralab.cli import main
from loralab.config import load_config
from loralab.config.reference import explain
from loralab.config.registry import ADAPTER_OPTIONS, GRADIENT_OPTIONS, Registry, adapter_options, rule_options
from loralab.config.schema import option
from loralab.errors import ConfigError
from loralab.gradient import RULES, build_rule, register_rule
from loralab.gradient.base import RuleDefaults

TINY = ["model.name=tiny-bert", "task.train_samples=32", "task.eval_samples=16", "train.max_steps=3"]


@dataclass(frozen=True)
class ProbeOptions:
    """A linear probe: only the task head trains."""

    kind: Literal["toy_probe"] = option("toy_probe", help="a linear probe")
    watch: str = option("embeddings.word_embeddings.weight", help="a backbone parameter saved before and after")


class ProbeAdapter:
    """Freezes the backbone; saves the head and one backbone parameter as they were at apply and at save."""

    name = "toy_probe"

    def __init__(self, options: ProbeOptions) -> None:
        self.options, self.initial = options, {}

    def apply(self, model: nn.Module) -> nn.Module:
        for name, param in model.named_parameters():
            param.requires_grad_(is_head_parameter(name))
            if param.requires_grad or name.endswith(self.options.watch):
                self.initial[name] = param.detach().clone()
        return model

    def lora_modules(self, model: nn.Module) -> dict[str, LoraView]:
        return {}

    def save(self, model: nn.Module, directory: Path) -> None:
        final = {name: param.detach().clone() for name, param in model.named_parameters() if name in self.initial}
        tensors = {f"initial/{k}": v for k, v in self.initial.items()} | {f"final/{k}": v for k, v in final.items()}
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, directory / "probe.safetensors")
        write_side_file(directory, {"adapter": self.name})

    def load(self, model: nn.Module, directory: Path) -> nn.Module:
        return model


@dataclass(frozen=True)
class FreezeOptions:
    """Zero the gradients of the parameters whose name ends with `suffix`."""

    kind: Literal["toy_freeze"] = option("toy_freeze", help="zero some gradients before each step")
    suffix: str = option("bias", help="parameter names ending with this get a zero gradient")


class FreezeRule(RuleDefaults):
    name = "toy_freeze"

    def __init__(self, options: FreezeOptions) -> None:
        self.options = options
        self.frozen: list[nn.Parameter] = []

    def attach(self, model: nn.Module, lora_modules: dict[str, LoraView]) -> None:
        self.frozen = [p for n, p in model.named_parameters() if p.requires_grad and n.endswith(self.options.suffix)]

    def before_step(self, step: int) -> dict:
        for param in self.frozen:
            param.grad.zero_()
        return {"toy/frozen": float(len(self.frozen))}


@pytest.fixture
def toy_kinds(monkeypatch):
    """Register the toy kinds in copies of the four registries, so no other test sees them."""
    for registry in (ADAPTER_OPTIONS, GRADIENT_OPTIONS, ADAPTERS, RULES):
        monkeypatch.setattr(registry, "_items", dict(registry._items))
    adapter_options(ProbeOptions)
    rule_options(FreezeOptions)
    register_adapter("toy_probe", lambda options, head: ProbeAdapter(options))
    register_rule("toy_freeze")(FreezeRule)


def test_a_toy_kind_and_rule_validate_build_and_explain(toy_kinds):
    config = load_config([], [*TINY, "method.adapter.kind=toy_probe", "method.gradient.kind=toy_freeze"])
    assert config.method.adapter == ProbeOptions()  # the lora preset's keys are dropped with its kind
    assert isinstance(build_adapter(config.method.adapter, "seq_cls"), ProbeAdapter)
    assert isinstance(build_rule(config.method.gradient), FreezeRule)
    with pytest.raises(ConfigError, match=r"unknown key 'method.gradient.sufix' \(did you mean 'suffix'\?\)"):
        load_config([], ["method.gradient.kind=toy_freeze", "method.gradient.sufix=weight"])
    assert "parameter names ending with this" in explain("method.gradient.toy_freeze.suffix", {})


def test_a_toy_kind_trains_through_the_cli_and_its_rule_acts(toy_kinds, tmp_path, capsys):
    argv = ["train", *TINY, "train.lr=5e-2", f"io.root={tmp_path}", "method.adapter.kind=toy_probe"]
    assert main([*argv, "method.gradient.kind=toy_freeze", "method.gradient.suffix=bias"]) == 0
    (saved,) = tmp_path.glob("**/adapter/probe.safetensors")
    tensors = load_file(saved)
    heads = sorted(k.removeprefix("final/") for k in tensors if k.startswith("final/") and "classifier" in k)
    assert heads == ["classifier.bias", "classifier.weight"]
    for name in heads:  # the rule zeroed the bias gradient (no weight decay): it kept its initial value exactly
        moved = not torch.equal(tensors[f"initial/{name}"], tensors[f"final/{name}"])
        assert moved == name.endswith("weight")
    watched = "bert.embeddings.word_embeddings.weight"
    torch.testing.assert_close(tensors[f"final/{watched}"], tensors[f"initial/{watched}"], rtol=0, atol=0)


def test_an_unknown_kind_names_the_registered_ones():
    with pytest.raises(ConfigError, match=r"method.adapter.kind: unknown adapter kind 'lorra' \(did you mean 'lora'"):
        load_config([], ["method.adapter.kind=lorra"])
    assert {"lora", "dual_rank_lora", "full", "bitfit", "peft", "houlsby", "prefix"} <= set(ADAPTERS)
    assert set(ADAPTERS) <= set(ADAPTER_OPTIONS) and set(RULES) == set(GRADIENT_OPTIONS)


def test_a_taken_name_is_refused():
    registry: Registry[type] = Registry("thing")
    registry.register("a")(ProbeOptions)
    registry.register("a")(ProbeOptions)  # the same object again (a module imported twice) is fine
    with pytest.raises(ValueError, match="thing 'a' is already registered"):
        registry.register("a")(FreezeOptions)
