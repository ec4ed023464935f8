"""`loralab report`: completed seeds grouped by config hash, mean ± sample std against numpy, three formats."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest

from conftest import write_run
from loralab.cli import main
from loralab.errors import RunError
from loralab.experiments.report import find_groups, table
from loralab.tables import render


@pytest.fixture
def runs(tmp_path):
    for seed, value, curve in ((1, 0.70, [0.75, 0.70]), (2, 0.80, [0.60, 0.80]), (3, 0.66, [0.9, 0.66])):
        write_run(tmp_path, "lora", seed, {"accuracy": value}, curve)
    write_run(tmp_path, "lora", 4, {"accuracy": 0.0}, [0.0], state="failed")
    for seed, full, core in ((1, 0.9, 0.5), (2, 0.8, 0.6)):
        write_run(tmp_path, "ours", seed, {"full/accuracy": full, "core/accuracy": core}, [])
    return tmp_path


def test_groups_and_statistics_match_numpy(runs):
    groups = find_groups([runs])
    assert [(g.name, len(g.runs)) for g in groups] == [("task/model/lora/abcd1234", 3), ("task/model/ours/abcd1234", 2)]
    header, rows = table(groups)
    assert header[:4] == ["run", "seeds", "accuracy", "core/accuracy"]
    lora = dict(zip(header, rows[0], strict=True))
    final = np.array([0.70, 0.80, 0.66])
    assert lora["accuracy"] == f"{final.mean():.4f} ± {final.std(ddof=1):.4f}"
    best = np.array([0.75, 0.80, 0.9])
    assert lora["best accuracy"] == f"{best.mean():.4f} ± {best.std(ddof=1):.4f}"
    assert lora["trainable %"] == "5.000 ± 0.000" and lora["tokens/s"] == "102.0 ± 1.0"
    steps = np.array([0.5, 1.0, 1.5])
    assert lora["step s"] == f"{steps.mean():.3f} ± {steps.std(ddof=1):.3f}"
    ours = dict(zip(header, rows[1], strict=True))
    assert ours["accuracy"] == f"0.8500 ± {np.std([0.9, 0.8], ddof=1):.4f}"  # the full view lines up with lora
    assert ours["core/accuracy"] == f"0.5500 ± {np.std([0.5, 0.6], ddof=1):.4f}"


def test_formats_and_cli(runs, tmp_path, capsys):
    header, rows = table(find_groups([runs]))
    parsed = list(csv.reader(io.StringIO(render(header, rows, "csv"))))
    assert parsed == [header, *rows]
    latex = render(header, rows, "latex").splitlines()
    assert latex[1] == r"\toprule" and latex[3] == r"\midrule" and latex[-2] == r"\bottomrule" and r"$\pm$" in latex[4]
    out = tmp_path / "table.md"
    assert main(["report", str(runs), "--out", str(out)]) == 0
    assert out.read_text() == capsys.readouterr().out == render(header, rows, "md")


def test_no_completed_runs_is_an_error(tmp_path):
    write_run(tmp_path, "lora", 1, {"accuracy": 0.5}, [], state="running")
    with pytest.raises(RunError, match="no completed runs"):
        find_groups([tmp_path])
