"""Help and flags: every option has help text, one flag style (dashed, the underscored spelling an alias), one name per
idea across verbs (`edit spectral --base/--adapter/--out` as `eval`), and `train -h` ends with examples."""

from __future__ import annotations

import argparse
import re

import pytest

from conftest import subcommands
from loralab.cli import build_parser

PARSER = build_parser()


def subparser(path: tuple[str, ...]) -> argparse.ArgumentParser:
    parser = PARSER
    for name in path:
        (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        parser = action.choices[name]
    return parser


def options(path: tuple[str, ...]) -> list[argparse.Action]:
    return [a for a in subparser(path)._actions if not isinstance(a, argparse._HelpAction | argparse._SubParsersAction)]


PATHS = subcommands(PARSER)


@pytest.mark.parametrize("path", PATHS, ids=" ".join)
def test_every_option_has_help_text(path):
    missing = [a.option_strings or a.dest for a in options(path) if not a.help or a.help == argparse.SUPPRESS]
    assert not missing


@pytest.mark.parametrize("path", PATHS, ids=" ".join)
def test_flags_are_dashed_and_answer_to_the_underscored_spelling(path):
    for action in options(path):
        if not action.option_strings:
            continue
        first = action.option_strings[0]
        assert "_" not in first, first
        if "-" in first[2:]:
            assert "--" + first[2:].replace("-", "_") in action.option_strings


def parse(*argv: str) -> argparse.Namespace:
    return PARSER.parse_args(list(argv))


SPECTRAL = ["--calib-task", "t", "--core-frac", "0.3"]


@pytest.mark.parametrize(
    "names",
    [
        ("--base_model", "--lora_path", "--out_dir"),  # the published tool's
        ("--base-model", "--lora-path", "--out-dir"),
    ],
)
def test_spectral_takes_evals_names_and_keeps_the_published_ones(names):
    new = parse("edit", "spectral", "--base", "m", "--adapter", "a", "--out", "o", *SPECTRAL)
    old = parse("edit", "spectral", *(x for pair in zip(names, "mao", strict=True) for x in pair), *SPECTRAL)
    assert vars(new) == vars(old)
    assert (new.base, new.adapter, str(new.out), new.calib_task, new.core_frac) == ("m", "a", "o", "t", 0.3)


def test_both_spellings_give_one_namespace():
    assert vars(parse("eval", "--run", "r", "--max_samples", "3")) == vars(
        parse("eval", "--run", "r", "--max-samples", "3")
    )
    assert vars(parse("hpo", "--n_trials", "4")) == vars(parse("hpo", "--n-trials", "4"))
    assert vars(parse("sweep", "--dry_run")) == vars(parse("sweep", "--dry-run"))


def test_help_lists_the_dashed_spelling_only():
    text = subparser(("edit", "spectral")).format_help()
    assert "--calib-task" in text and "--calib_task" not in text and "--base-model" not in text
    assert "--base BASE" in text and re.search(r"also\s+--base_model", text)  # the old name, in the new one's help


def test_train_help_ends_with_two_examples_and_points_to_config_show_and_list():
    text = subparser(("train",)).format_help()
    assert "loralab config show" in text and "loralab config list" in text
    lines = text.rstrip().splitlines()
    assert lines[-3] == "examples:" and all(line.startswith("  loralab train ") for line in lines[-2:])
