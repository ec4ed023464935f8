"""One meaning for `train` (no --config: the quickstart, overrides on top; `config show` prints what `train` runs)
and configs by name (`--config quickstart`, `experiments/grit_alpaca.yaml`, `loralab config list`)."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from loralab.cli import main
from loralab.config import config_hash, load_config
from loralab.config.load import config_file, experiment_names, packaged_experiment
from loralab.errors import ConfigError

README = Path(__file__).resolve().parents[1] / "README.md"


def trained_config(monkeypatch, argv: list[str]):
    """The config `loralab train *argv` hands to run_training (which is replaced: nothing trains)."""
    import loralab.training.recipe as recipe

    seen = []

    def record(config, **_):
        seen.append(config)
        return SimpleNamespace(metrics={}, directory=Path("runs"), action="new")

    monkeypatch.setattr(recipe, "run_training", record)
    assert main(["train", *argv]) == 0
    (config,) = seen
    return config


def shown_hash(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(["config", "show", *argv]) == 0
    return re.match(r"# config hash: ([0-9a-f]{8})\n", capsys.readouterr().out).group(1)


@pytest.mark.parametrize(
    "argv", [[], ["seed=1"], ["seed=1", "train.lr=0.01"], ["--config", "shake_align_rte", "seed=3"]], ids=" ".join
)
def test_config_show_prints_the_hash_of_what_train_runs(argv, monkeypatch, capsys):
    assert shown_hash(capsys, argv) == config_hash(trained_config(monkeypatch, argv))


def test_without_config_the_quickstart_is_the_base_and_overrides_apply_on_top(monkeypatch, capsys):
    config = trained_config(monkeypatch, ["seed=1"])
    quickstart = load_config([str(packaged_experiment("quickstart"))], ["seed=1"])
    assert config == quickstart
    assert (config.seed, config.train.epochs, config.task.max_length, config.io.overwrite) == (1, 2, 64, "skip")
    assert capsys.readouterr().err == ""  # no notice: an error of a run with overrides stays one line


def test_bare_overrides_on_both_sides_of_an_option_all_apply_the_last_winning(monkeypatch):
    """`seed=1 --set train.lr=0.01 seed=2 train.epochs=1`: argparse takes only the first bare group as the
    positional; the later one joins it, so both apply, in order, and bare overrides still beat --set."""
    config = trained_config(monkeypatch, ["seed=1", "--set", "train.lr=0.01", "seed=2", "train.epochs=1"])
    assert (config.seed, config.train.lr, config.train.epochs) == (2, 0.01, 1)
    assert trained_config(monkeypatch, ["train.lr=0.5", "--set", "train.lr=0.01"]).train.lr == 0.5
    with pytest.raises(SystemExit):
        main(["train", "seed=1", "--bogus", "seed=2"])


def test_the_readme_names_the_quickstart_hash(capsys):
    stated = re.search(r"`# config hash: ([0-9a-f]{8})`", README.read_text()).group(1)
    assert shown_hash(capsys, ["seed=1"]) == shown_hash(capsys, []), "the hash leaves the seed out"
    assert shown_hash(capsys, []) == stated, "a hashed default changed: put the new quickstart hash in README.md"


@pytest.mark.parametrize(
    ("value", "name"),
    [
        ("quickstart", "quickstart"),
        ("quickstart.yaml", "quickstart"),
        ("grit_alpaca", "grit_alpaca"),
        ("experiments/grit_alpaca.yaml", "grit_alpaca"),
        ("experiments/shake_align_rte", "shake_align_rte"),
    ],
)
def test_config_by_name_finds_the_packaged_experiment(value, name, capsys):
    assert config_file(value) == packaged_experiment(name)
    assert shown_hash(capsys, ["--config", value]) == config_hash(load_config([str(packaged_experiment(name))]))


def test_a_file_wins_over_a_packaged_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "quickstart").write_text("train: {epochs: 7}\n")
    assert config_file("quickstart") == Path("quickstart")
    assert load_config(["quickstart"]).train.epochs == 7


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("quickstrat", "config file not found: quickstrat (did you mean 'quickstart'?)"),
        ("mine.yaml", "config file not found: mine.yaml; packaged experiments: arithmetic_base, arithmetic_shifted, "),
    ],
)
def test_an_unknown_config_is_one_line_with_the_names(value, message, capsys):
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_file(value)
    assert main(["config", "show", "--config", value]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"loralab: error: {message}")


def test_config_list_prints_each_experiment_with_its_first_comment_line(capsys):
    assert main(["config", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == experiment_names()
    for line, name in zip(lines, experiment_names(), strict=True):
        first = next(text for text in packaged_experiment(name).read_text().splitlines() if text.startswith("#"))
        assert line.split(None, 1)[1] == first.lstrip("# ")
    assert {"quickstart", "shake_align_rte", "grit_alpaca"} <= set(experiment_names())
