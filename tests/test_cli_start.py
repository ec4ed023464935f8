"""Instant start: help, `config show`, `config list` and `report` import no torch, transformers, peft or datasets."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import subcommands, write_run
from loralab.cli import build_parser

HEAVY = ("torch", "transformers", "peft", "datasets")
PROBE = f"""
import json, runpy, sys
sys.argv = ["loralab", *sys.argv[1:]]
try:
    runpy.run_module("loralab", run_name="__main__")
    code = 0
except SystemExit as exit:
    code = exit.code
print(json.dumps({{"code": code, "heavy": [name for name in {HEAVY!r} if name in sys.modules]}}), file=sys.stderr)
"""


def probe(argv: list[str], cwd) -> dict:
    """Run the CLI in a fresh interpreter; its exit code and which heavy packages it imported."""
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, cwd=cwd, check=False)
    return json.loads(done.stderr.splitlines()[-1])


@pytest.mark.parametrize(
    "argv", [["--help"]] + [[*path, "--help"] for path in subcommands(build_parser())], ids=" ".join
)
def test_help_imports_nothing_heavy(argv, tmp_path):
    assert probe(argv, tmp_path) == {"code": 0, "heavy": []}


@pytest.mark.parametrize(
    "argv",
    [["config", "show"], ["config", "show", "seed=1", "model.name=tiny-llama"], ["config", "list"]],
    ids=" ".join,
)
def test_config_verbs_import_nothing_heavy(argv, tmp_path):
    assert probe(argv, tmp_path) == {"code": 0, "heavy": []}


def test_report_imports_nothing_heavy(tmp_path):
    for seed in (1, 2):
        write_run(tmp_path, "lora", seed, {"accuracy": 0.5 + seed / 10}, [0.5])
    assert probe(["report", str(tmp_path)], tmp_path) == {"code": 0, "heavy": []}


def test_a_pipe_closed_early_is_no_traceback(tmp_path):
    """`loralab config show | head -1`: the reader leaves before the output is written."""
    command = [sys.executable, "-m", "loralab", "config", "show"]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    process.stdout.close()
    assert process.wait(timeout=120) == 1
    assert process.stderr.read() == ""
