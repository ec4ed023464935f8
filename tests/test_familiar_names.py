"""Familiar names: an HF TrainingArguments / PEFT LoraConfig name, typed at the top level or in a wrong section, gets
loralab's key in the one-line unknown-key error (exit 2); every suggested key exists."""

from __future__ import annotations

import re

import pytest

from loralab.cli import main
from loralab.config import config_to_dict, load_config
from loralab.config.familiar import FAMILIAR
from loralab.errors import ConfigError

NAMES = sorted(FAMILIAR)


def known_keys() -> set[str]:
    """Every dotted key and section of the default config, and of a `peft` adapter (method.adapter.peft_type)."""
    keys: set[str] = set()

    def walk(tree: dict, prefix: str) -> None:
        for key, value in tree.items():
            keys.add(prefix + key)
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")

    for overrides in ([], ["method.adapter.kind=peft"]):
        walk(config_to_dict(load_config([], overrides)), "")
    return keys


def wrong_section(name: str) -> str:
    """`name` under a section its loralab key is not in."""
    return f"train.{name}" if FAMILIAR[name][0].startswith("model.") else f"model.{name}"


def test_at_least_twenty_names_and_each_suggestion_is_a_key():
    assert len(FAMILIAR) >= 20
    assert {key for key, _ in FAMILIAR.values()} <= known_keys()


@pytest.mark.parametrize("name", NAMES)
def test_a_familiar_name_in_a_wrong_section_gets_the_loralab_key(name, capsys):
    typed = wrong_section(name)
    key, note = FAMILIAR[name]
    expected = f"unknown key '{typed}' (did you mean '{key}'?" + (f" {note})" if note else ")")
    with pytest.raises(ConfigError, match=re.escape(expected) + "$"):
        load_config([], [f"{typed}=1"])
    assert main(["config", "show", f"{typed}=1"]) == 2
    assert capsys.readouterr().err == f"loralab: error: {expected}\n"


@pytest.mark.parametrize("name", [name for name in NAMES if FAMILIAR[name][0] != name])
def test_a_familiar_name_at_the_top_level_gets_the_loralab_key(name):
    with pytest.raises(ConfigError, match=re.escape(f"unknown key '{name}' (did you mean '{FAMILIAR[name][0]}'?")):
        load_config([], [f"{name}=1"])


def test_the_issue_examples_read_as_promised():
    messages = {}
    for name in ("learning_rate", "num_train_epochs", "output_dir", "per_device_train_batch_size", "lora_alpha"):
        with pytest.raises(ConfigError) as caught:
            load_config([], [f"{name}=1"])
        messages[name] = str(caught.value)
    assert "'train.lr'" in messages["learning_rate"] and "'train.epochs'" in messages["num_train_epochs"]
    assert "'io.root'" in messages["output_dir"] and "'method.adapter.alpha'" in messages["lora_alpha"]
    assert "train.batch_size" in messages["per_device_train_batch_size"]
    assert "train.grad_accum" in messages["per_device_train_batch_size"]


def test_a_key_valid_in_another_adapter_kind_is_not_suggested_as_itself():
    with pytest.raises(ConfigError, match=r"^unknown key 'method.adapter.target_modules'$"):
        load_config([], ["method.name=bitfit", "method.adapter.target_modules=[query]"])
