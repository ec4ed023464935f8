"""Bad input: every case exits with code 2 and one clear line on stderr, no traceback, nothing lost."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from loralab.cli import main

TINY = ["model.name=tiny-bert", "task.train_samples=16", "task.eval_samples=8", "train.max_steps=1"]


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


def corrupt_adapter(tmp_path: Path) -> Path:
    directory = tmp_path / "corrupt"
    directory.mkdir(exist_ok=True)
    (directory / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    (directory / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    return directory


def evaluate(adapter: Path, *flags: str) -> list[str]:
    """`loralab eval` of an adapter directory on tiny-bert and synthetic/sentiment."""
    return ["eval", "--base", "tiny-bert", "--adapter", str(adapter), "--task", "synthetic/sentiment", *flags]


def spectral_edit(tmp_path: Path, *flags: str) -> list[str]:
    """`loralab edit spectral` of the adapter at `tmp_path` on tiny-llama."""
    return [
        "edit",
        "spectral",
        "--base",
        "tiny-llama",
        "--adapter",
        str(tmp_path),
        "--out",
        str(tmp_path / "edited"),
        *flags,
    ]


def adapter_config(tmp_path: Path, config: dict) -> Path:
    """An adapter directory holding only this adapter_config.json."""
    directory = tmp_path / "config-only"
    directory.mkdir(exist_ok=True)
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory


def bad_json_adapter(tmp_path: Path) -> Path:
    directory = tmp_path / "badjson"
    directory.mkdir()
    (directory / "adapter_config.json").write_text("{oops")
    return directory


def malformed_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text("train: [unclosed\n")
    return path


def data_file(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text)
    return folder / name


def own_task(path: Path | str, fmt: str = "classification", *keys: str) -> list[str]:
    """`loralab train` on a task of the user's own (tiny-bert for classification, tiny-llama otherwise)."""
    model = "tiny-bert" if fmt == "classification" else "tiny-llama"
    return [
        "train",
        "task.name=my/data",
        f"task.format={fmt}",
        f"task.path={path}",
        *keys,
        *TINY,
        f"model.name={model}",
    ]


def chats(*conversations: list[dict]) -> str:
    return "".join(json.dumps({"messages": messages}) + "\n" for messages in conversations)


USER, ASSISTANT = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}
DATA_CASES = {
    "missing data column": (
        lambda t: own_task(
            data_file(t, "r.csv", "review,stars\ngood,5\nbad,1\n"), "classification", "task.columns.label=stars"
        ),
        r"r\.csv: missing column 'text' \(task\.columns\.text, format classification\); the data has: review, stars$",
    ),
    "empty data file": (lambda t: own_task(data_file(t, "empty.csv", "")), r"empty\.csv is empty$"),
    "empty split": (lambda t: own_task(data_file(t, "header.csv", "text,label\n")), r"header\.csv holds no rows$"),
    "malformed json line": (
        lambda t: own_task(data_file(t, "bad.jsonl", '{"text": "a", "label": 0}\n{"text": "b", label: 1}\n')),
        r"bad\.jsonl:2: malformed JSON line",
    ),
    "label not in label_names": (
        lambda t: own_task(
            data_file(t, "l.jsonl", "".join(json.dumps({"text": w, "label": w}) + "\n" for w in "abcab")),
            "classification",
            "task.label_names=[a, b]",
        ),
        r"l\.jsonl, row 3: label 'c' is not in task\.label_names \(a, b\)$",
    ),
    "chat without an assistant turn": (
        lambda t: own_task(data_file(t, "c.jsonl", chats([USER, ASSISTANT], [USER], [USER, ASSISTANT])), "chat"),
        r"c\.jsonl, row 2: the conversation has no assistant turn",
    ),
    "unknown chat role": (
        lambda t: own_task(
            data_file(
                t, "r.jsonl", chats([USER, ASSISTANT], [USER, {"role": "bot", "content": "x"}], [USER, ASSISTANT])
            ),
            "chat",
        ),
        r"r\.jsonl, row 2: unknown role 'bot' \(the roles are system, user, assistant\); name it with task\.roles",
    ),
    "chat on an encoder": (
        lambda t: [
            *own_task(data_file(t, "e.jsonl", chats(*[[USER, ASSISTANT]] * 20)), "chat"),
            "model.name=tiny-bert",
        ],
        r"model 'tiny-bert' is an encoder \(bert\), not a causal LM",
    ),
    "packing with shake_align": (
        lambda t: ["train", "method.name=ours", "task.name=gsm8k", "task.packing=true", "model.name=tiny-llama"],
        r"task\.packing cannot run with method\.gradient\.kind=shake_align: its votes need whole examples",
    ),
    "unknown sft template": (
        lambda t: ["train", "task.name=gsm8k", "task.template=alpacca", "model.name=tiny-llama"],
        r"task\.template: unknown template 'alpacca' \(did you mean 'alpaca'\?\)",
    ),
    "packing a classification task": (
        lambda t: ["train", "task.packing=true", *TINY],
        r"task\.packing applies to sft, chat and text tasks, not classification$",
    ),
    "glob matching nothing": (
        lambda t: own_task(f"{t}/nothing/*.jsonl"),
        r"the glob .*nothing/\*\.jsonl matches no file$",
    ),
}


CASES = {
    **DATA_CASES,
    "unknown key": (lambda t: ["train", "train.lrr=0.1"], r"unknown key 'train.lrr' \(did you mean 'lr'\?\)"),
    "bad type": (lambda t: ["train", "train.epochs=many"], r"train.epochs: expected a number"),
    "negative batch size": (lambda t: ["train", "train.batch_size=-4"], r"train.batch_size: must be ≥ 1"),
    "zero lr": (lambda t: ["train", "train.lr=0"], r"train.lr: must be > 0"),
    "unknown task": (lambda t: ["train", "task.name=glue/sst3", *TINY], r"unknown task 'glue/sst3'"),
    "unknown metric": (  # refused before training, not after it
        lambda t: ["train", "task.metrics=[acc]", *TINY],
        r"task\.metrics: unknown metric 'acc' \(did you mean 'accuracy'\?\)$",
    ),
    "unknown model": (lambda t: ["train", "model.name=tiny-lama"], r"tiny-llama"),
    "unknown preset": (lambda t: ["train", "method.name=loar"], r"did you mean 'lora'"),
    "missing config file": (lambda t: ["train", "--config", str(t / "missing.yaml")], r"config file not found"),
    "malformed yaml": (lambda t: ["train", "--config", str(malformed_yaml(t))], r"malformed YAML"),
    "bad override form": (lambda t: ["train", "--set", "train.lr"], r"not of the form a.b.c=value"),
    "impossible combination": (
        lambda t: ["train", "train.batch_size=10", "train.grad_accum=4"],
        r"multiple of train.grad_accum",
    ),
    "shake_align without dual-rank": (
        lambda t: ["train", "method.gradient.kind=shake_align"],
        r"shake_align needs method.adapter.kind=dual_rank_lora, not lora",
    ),
    "extension rank not above core": (
        lambda t: ["train", "method.name=ours", "method.adapter.R=8"],
        r"method.adapter.R \(8\) must be larger than method.adapter.r \(8\)",
    ),
    "one vote per step": (
        lambda t: ["train", "method.name=ours", "train.batch_size=8"],
        r"samples_per_vote \(8\) must be smaller than train.batch_size \(8\)",
    ),
    "votes under fp16": (
        lambda t: ["train", "method.name=ours", "train.mixed_precision=fp16"],
        r"cannot run with train.mixed_precision=fp16",
    ),
    "core view of plain lora": (lambda t: ["train", "eval.views=[core]"], r"eval.views=core needs"),
    "unknown shake_align key": (
        lambda t: ["train", "method.name=ours", "method.gradient.trigger.percentile=80"],
        r"unknown key 'method.gradient.trigger.percentile' \(did you mean 'percentile_p'\?\)",
    ),
    "grit without lora factors": (
        lambda t: ["train", "method.name=grit", "method.adapter.kind=bitfit"],
        r"grit needs a LoRA-like adapter \(method.adapter.kind=lora or dual_rank_lora\), not bitfit",
    ),
    "grit under fp16": (
        lambda t: ["train", "method.name=grit", "train.mixed_precision=fp16"],
        r"grit cannot run with train.mixed_precision=fp16",
    ),
    "grit bad pairing": (
        lambda t: ["train", "method.name=grit", "method.gradient.pairing=fisher"],
        r"method.gradient.pairing",
    ),
    "compress a plain adapter": (
        lambda t: ["export", str(corrupt_adapter(t)), "--compress", "--out", str(t / "out")],
        r"has no grit_projectors.safetensors: --compress needs an adapter trained with method.gradient.kind=grit",
    ),
    "wrong head for task": (
        lambda t: ["train", "model.kind=causal_lm", *TINY],
        r"model.kind=causal_lm cannot run a classification task",
    ),
    "negative seed": (lambda t: ["train", "seed=-1", *TINY], r"seed: must be ≥ 0, got -1"),
    "no samples to evaluate": (
        lambda t: evaluate(t, "--max-samples", "0"),
        r"argument --max-samples/--max_samples: must be ≥ 1, got 0",
    ),
    "overlapping spectral shares": (
        lambda t: spectral_edit(t, "--core-frac", "0.9", "--noise-frac", "0.9"),
        r"core_frac \+ noise_frac must be at most 1, got 0\.9 \+ 0\.9",
    ),
    "unknown edit device": (
        lambda t: spectral_edit(t, "--device", "gpu0"),
        r"device must be auto, cpu, cuda or cuda:N, got 'gpu0'",
    ),
    "unknown metric in eval": (  # refused before the model runs
        lambda t: evaluate(corrupt_adapter(t), "task.metrics=[acc]"),
        r"task\.metrics: unknown metric 'acc' \(did you mean 'accuracy'\?\)$",
    ),
    "unknown PEFT type": (
        lambda t: evaluate(adapter_config(t, {"peft_type": "FOOBAR"})),
        r"adapter_config\.json: unknown PEFT type 'FOOBAR'",
    ),
    "adapter config without a PEFT type": (
        lambda t: evaluate(adapter_config(t, {"r": 8})),
        r"adapter_config\.json has no peft_type: not a PEFT adapter config",
    ),
    "missing adapter dir": (
        lambda t: ["eval", "--base", "tiny-bert", "--adapter", str(t / "none"), "--task", "synthetic/sentiment"],
        r"adapter directory not found",
    ),
    "corrupt safetensors": (
        lambda t: [
            "eval",
            "--base",
            "tiny-bert",
            "--adapter",
            str(corrupt_adapter(t)),
            "--task",
            "synthetic/sentiment",
            "task.eval_samples=4",
        ],
        r"corrupt safetensors file",
    ),
    "malformed adapter config": (
        lambda t: [
            "eval",
            "--base",
            "tiny-bert",
            "--adapter",
            str(bad_json_adapter(t)),
            "--task",
            "synthetic/sentiment",
            "task.eval_samples=4",
        ],
        r"malformed JSON in .*adapter_config.json",
    ),
    "not a run dir": (lambda t: ["eval", "--run", str(t)], r"not a run directory"),
    "missing predictions": (
        lambda t: ["score", "--task", "synthetic/sentiment", "--predictions", str(t / "p.jsonl")],
        r"predictions file not found",
    ),
    "missing task path": (
        lambda t: ["train", "task.name=glue/sst2", f"task.path={t / 'nowhere'}", *TINY],
        r"nowhere",
    ),
    "unknown subcommand": (lambda t: ["trian"], r"invalid choice: 'trian'"),
    "fewshot on a classification task": (
        lambda t: [
            "eval",
            "--base",
            "tiny-bert",
            "--adapter",
            str(t),
            "--task",
            "synthetic/sentiment",
            "--fewshot",
            "2",
        ],
        r"serve GSM8K-style tasks, not synthetic/sentiment",
    ),
    "unknown GSM8K profile": (
        lambda t: ["eval", "--base", "tiny-llama", "--adapter", str(t), "--task", "gsm8k", "eval.profile=lm_eval"],
        r"eval.profile",
    ),
    "profile on a classification score": (
        lambda t: [
            "score",
            "--task",
            "synthetic/sentiment",
            "--predictions",
            str(predictions(t)),
            "--profile",
            "lm-eval",
        ],
        r"--profile applies to GSM8K-style tasks",
    ),
    "vllm backend in training": (
        lambda t: ["train", "eval.backend=vllm", *TINY],
        r"eval.backend=vllm serves loralab eval",
    ),
    "vllm not installed": (
        lambda t: [
            *edit_spectral(t),
            "--eval",
            "gsm8k",
            "--eval_backend",
            "vllm",
            "--calib_task",
            "synthetic/arithmetic",
        ],
        r"the vllm backend needs vLLM",
    ),
    "edit evaluated on unreachable data": (
        lambda t: [*edit_spectral(t), "--eval", "gsm8k"],
        r"cannot load gsm8k from the hub",
    ),
    "edit a missing adapter": (lambda t: edit_spectral(t, t / "none"), r"adapter directory not found"),
    "edit a DoRA adapter": (lambda t: edit_spectral(t, dora_adapter(t)), r"DoRA adapter"),
    "edit into the source": (lambda t: edit_spectral(t, lora_adapter(t), t / "lora"), r"must differ from the adapter"),
    "edit with no matching module": (
        lambda t: [*edit_spectral(t, lora_adapter(t)), "--target_modules", "gate_proj"],
        r"no LoRA module named gate_proj",
    ),
    "edit calibrated on a classifier task": (
        lambda t: [*edit_spectral(t, lora_adapter(t)), "--calib_task", "glue/sst2"],
        r"--calib_task must be an sft or chat task; glue/sst2 is classification$",
    ),
    "edit with an impossible layer range": (
        lambda t: [*edit_spectral(t), "--layer_min", "3", "--layer_max", "1"],
        r"layer_min \(3\) must not exceed layer_max",
    ),
    "edit with a bad fraction": (lambda t: [*edit_spectral(t), "--core_frac", "2"], r"core_frac must lie in"),
}


def predictions(tmp_path: Path) -> Path:
    path = tmp_path / "classified.jsonl"
    path.write_text('{"prediction": "positive", "reference": "positive", "output": "positive"}\n')
    return path


def lora_adapter(tmp_path: Path, **options) -> Path:
    """A tiny-llama LoRA on o_proj saved as a PEFT adapter (loralab's model loader, PEFT's save)."""
    from peft import LoraConfig, get_peft_model

    from loralab.config.schema import ModelConfig
    from loralab.models import load_model

    model, _ = load_model(ModelConfig("tiny-llama", "causal_lm", "float32", "none", False, False, None), "causal_lm")
    directory = tmp_path / ("dora" if options else "lora")
    get_peft_model(model, LoraConfig(r=4, target_modules=["o_proj"], **options)).save_pretrained(str(directory))
    return directory


def dora_adapter(tmp_path: Path) -> Path:
    return lora_adapter(tmp_path, use_dora=True)


def edit_spectral(tmp_path: Path, source: Path | None = None, out: Path | None = None) -> list[str]:
    source = source or lora_adapter(tmp_path)
    out = out or tmp_path / "edited"
    return ["edit", "spectral", "--base_model", "tiny-llama", "--lora_path", str(source), "--out_dir", str(out)]


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_gives_one_line_and_exit_2(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv, pattern = CASES[case]
    try:
        code, err = run_cli(argv(tmp_path), capsys)
    except SystemExit as exit_:  # argparse usage errors exit from inside parse_args
        code, err = exit_.code, capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("loralab: error: "), err
    assert re.search(pattern, lines[0]), lines[0]


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` with the bytes of each file (None for a directory)."""
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def test_bad_input_leaves_an_existing_run_untouched(tmp_path, capsys, monkeypatch):
    """After a completed run, every bad command above exits 2 and changes no file and adds no directory."""
    monkeypatch.chdir(tmp_path)
    assert main(["train", *TINY]) == 0
    (tmp_path / "inputs").mkdir()
    argvs = [argv(tmp_path / "inputs") for argv, _ in CASES.values()]
    argvs.append(["train", *TINY, "io.overwrite=error"])  # the same run again, refused
    before = snapshot(tmp_path / "runs")
    for argv in argvs:
        try:
            code = main(argv)
        except SystemExit as exit_:
            code = exit_.code
        assert code == 2, argv
    capsys.readouterr()
    assert snapshot(tmp_path / "runs") == before


def test_console_script_exits_2_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "loralab", "train", "train.batch_size=-1"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "loralab: error: train.batch_size: must be ≥ 1, got -1"
