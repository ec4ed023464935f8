"""Config composition, overrides, validation messages and the run hash."""

from __future__ import annotations

import pytest

from loralab.config import config_hash, dump_yaml, load_config
from loralab.config.load import parse_override
from loralab.errors import ConfigError


def test_defaults_come_from_base_yaml_and_preset():
    config = load_config()
    assert config.seed == 42
    assert config.task.name == "synthetic/sentiment"
    assert config.method.name == "lora"
    assert (config.method.adapter.r, config.method.adapter.alpha, config.method.adapter.dropout) == (8, 16.0, 0.05)
    assert config.method.gradient.kind == "none"


def test_files_then_overrides_compose_in_order(tmp_path):
    first = tmp_path / "a.yaml"
    first.write_text("train:\n  lr: 0.1\n  batch_size: 4\nmethod:\n  adapter:\n    r: 4\n")
    second = tmp_path / "b.yaml"
    second.write_text("train:\n  lr: 0.2\n")
    config = load_config([str(first), str(second)], ["train.lr=1e-4", "--method.adapter.alpha=32"])
    assert config.train.lr == pytest.approx(1e-4)  # '1e-4' is a YAML string; the float field converts it
    assert config.train.batch_size == 4
    assert config.method.adapter.r == 4
    assert config.method.adapter.alpha == 32.0


def test_override_values_parse_as_yaml():
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])
    assert parse_override("a=null") == ("a", None)
    assert parse_override("a=true") == ("a", True)
    assert parse_override("a=glue/sst2") == ("a", "glue/sst2")


def test_switching_adapter_kind_drops_the_presets_other_keys():
    config = load_config([], ["method.adapter.kind=full"])
    assert config.method.adapter.kind == "full"
    with pytest.raises(ConfigError, match=r"unknown key 'method.adapter.r'"):
        load_config([], ["method.adapter.kind=full", "method.adapter.r=4"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.lrr=1"], r"unknown key 'train.lrr' \(did you mean 'lr'\?\)"),
        (["trian.lr=1"], r"unknown key 'trian' \(did you mean 'train'\?\)"),
        (["train.batch_size=-1"], r"train.batch_size: must be ≥ 1, got -1"),
        (["train.batch_size=abc"], r"train.batch_size: expected an integer, got 'abc'"),
        (["train.batch_size=2.5"], r"expected an integer"),
        (["train.warmup_ratio=1.5"], r"train.warmup_ratio: must be ≤ 1"),
        (["train.scheduler=cos"], r"one of 'linear', 'cosine', 'constant'"),
        (["train.scheduler=cosin"], r"got 'cosin' \(did you mean 'cosine'\?\)$"),
        (["task.format=classfication"], r"task.format: expected one of .* \(did you mean 'classification'\?\)$"),
        (["method.name=lorra"], r"unknown method preset 'lorra' \(did you mean 'lora'\?\)"),
        (["method.adapter.kind=dora"], r"unknown adapter kind 'dora'"),
        (["train.batch_size=10", "train.grad_accum=3"], r"multiple of train.grad_accum"),
        (["model.dtype=bfloat16", "train.mixed_precision=fp16"], r"needs model.dtype=float32"),
        (["model.quantization=nf4", "method.name=full"], r"cannot train a 4-bit quantized base"),
        (["train.deterministic=yes please"], r"expected true/false"),
        (["log.trackers=[neptune]"], r"log.trackers"),
        (["justakey"], r"not of the form a.b.c=value"),
    ],
)
def test_invalid_configs_fail_in_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config([], overrides)
    assert "\n" not in str(info.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config([str(tmp_path / "nope.yaml")])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1, 2\n")
    with pytest.raises(ConfigError, match=r"malformed YAML in .*bad.yaml \(line"):
        load_config([str(bad)])
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config([str(scalar)])


def test_hash_ignores_seed_io_and_log_but_not_training_keys():
    base = config_hash(load_config())
    assert len(base) == 8
    assert config_hash(load_config([], ["seed=7", "io.root=/tmp/elsewhere", "log.every=3"])) == base
    assert config_hash(load_config([], ["train.lr=0.01"])) != base
    assert config_hash(load_config([], ["method.adapter.r=16"])) != base


def test_resolved_config_round_trips_through_its_yaml(tmp_path):
    config = load_config([], ["train.lr=0.002", "method.adapter.target_modules=[query, value]"])
    saved = tmp_path / "config.yaml"
    saved.write_text(dump_yaml(config))
    assert load_config([str(saved)]) == config
