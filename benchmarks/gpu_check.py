"""The one prepared GPU check behind `benchmarks/gpu_check.sh` (docs/gpu.md): prerequisites first, then the GPU
tests, the loop's device→host syncs on CUDA, and loralab against HF Trainer + PEFT on a ~1B Llama built from its
config (padded and packed, with Liger kernels where they install, GRIT and Shake-to-Align beside LoRA); one JSON and
one markdown table in `--out`. Each step runs in its own process under a time limit, so one that fails or runs out
of time leaves the others' results (on one H100 the limits add up to under 8 minutes).

    python benchmarks/gpu_check.py run [--dry-run] [--out runs/gpu_check]   # what gpu_check.sh runs
    python benchmarks/gpu_check.py throughput --json F [--device cpu --tiny --steps 2 --warmup 1]   # one step alone
    python benchmarks/gpu_check.py syncs --json F [--device cpu]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import importlib.util
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REQUIRED = ("torch", "transformers", "peft", "accelerate", "pytest", "loralab")
OPTIONAL = {"bitsandbytes": "the NF4 test", "vllm": "the vLLM test", "liger_kernel": "the Liger rows"}
DEVICE_SECONDS = 480  # the budget on one H100 that the step limits below stay within


@dataclasses.dataclass(frozen=True)
class Step:
    """One step of the check: a command run in its own process under `limit` seconds."""

    name: str
    what: str
    command: list[str]
    limit: int
    results: str | None = None  # the JSON file the step writes, relative to --out


def plan(out: Path) -> list[Step]:
    """The check's steps, in order; every one needs CUDA."""
    python = sys.executable
    return [
        Step(
            "gpu-tests",
            "tests/test_gpu.py: bf16, NF4 QLoRA + plain PEFT reload, the three methods on CUDA, vLLM = HF greedy",
            [python, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py", "-v", "-p", "no:cacheprovider"],
            210,
        ),
        Step(
            "syncs",
            "device→host syncs per step of loralab's loop on CUDA (torch.cuda.set_sync_debug_mode), per method",
            [python, str(Path(__file__)), "syncs", "--json", str(out / "syncs.json")],
            80,
            "syncs.json",
        ),
        Step(
            "throughput",
            "~1B Llama from config, bf16: loralab vs HF Trainer + PEFT, padded and packed, Liger; GRIT and "
            "Shake-to-Align beside LoRA (tokens/s, peak memory, MFU)",
            [python, str(Path(__file__)), "throughput", "--json", str(out / "throughput.json")],
            160,
            "throughput.json",
        ),
    ]


# ---- prerequisites ----------------------------------------------------------------------------------------------


def prerequisites(dry_run: bool) -> dict:
    """What is installed, the device, and one line of what is missing (required first, then optional)."""
    missing = [name for name in REQUIRED if importlib.util.find_spec(name) is None]
    found: dict = {"python": sys.version.split()[0], "missing": missing}
    if "torch" not in missing:
        import torch

        found |= {"torch": torch.__version__, "cuda": torch.cuda.is_available()}
        found["device"] = torch.cuda.get_device_name() if found["cuda"] else "no CUDA device"
        if not found["cuda"]:
            missing.append(f"a CUDA GPU (torch {torch.__version__} sees none)")
    if not (dry_run or missing):
        wheels = os.environ.get("GPU_CHECK_WHEELS")  # a machine without network: wheels brought along (docs/gpu.md)
        if wheels:
            try_install("--no-index", "--no-deps", *map(str, sorted(Path(wheels).glob("*.whl"))))
        elif importlib.util.find_spec("liger_kernel") is None:
            try_install("liger-kernel")  # only where it can run: Liger's kernels are Triton, GPU only
    found["optional_missing"] = [f"{name} ({use})" for name, use in OPTIONAL.items() if not importable(name)]
    return found


def importable(name: str) -> bool:
    importlib.invalidate_caches()
    return importlib.util.find_spec(name) is not None


def try_install(*arguments: str) -> None:
    """`pip install` with a short limit, for what helps but is not needed (no network: fails in seconds)."""
    command = [sys.executable, "-m", "pip", "install", "-q", "--retries", "0", "--timeout", "5", *arguments]
    with contextlib.suppress(subprocess.TimeoutExpired):
        subprocess.run(command, capture_output=True, timeout=60, check=False)


def missing_line(found: dict) -> str:
    """The one line: what the check cannot run without, and what it will skip."""
    parts = []
    if found["missing"]:
        parts.append("missing: " + ", ".join(found["missing"]))
    if found["optional_missing"]:
        parts.append("optional, skipped without: " + ", ".join(found["optional_missing"]))
    return "gpu_check: " + ("; ".join(parts) if parts else "all prerequisites found")


# ---- running the steps ------------------------------------------------------------------------------------------


def run_step(step: Step, out: Path) -> dict:
    """Run one step under its limit, its output in logs/<name>.log; its status, seconds and results."""
    log = out / "logs" / f"{step.name}.log"
    started = time.perf_counter()
    with log.open("w") as handle:
        # a session of its own, so a time-out also ends what the step started (vLLM's engine process holds the GPU)
        process = subprocess.Popen(
            step.command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code = process.wait(timeout=step.limit)
            status = "passed" if code == 0 else f"failed (exit {code})"
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            status = f"timed out after {step.limit} s"
    row = {"name": step.name, "status": status, "seconds": round(time.perf_counter() - started, 1)}
    if step.name == "gpu-tests":
        row["tests"] = test_outcomes(log.read_text())
    if step.results and (out / step.results).is_file():
        row["results"] = json.loads((out / step.results).read_text())
    return row


def test_outcomes(output: str) -> dict[str, str]:
    """Each test's outcome from `pytest -v` lines (those finished before a time-out too)."""
    pattern = re.compile(r"^(tests/\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR)", re.MULTILINE)
    outcomes = {name: outcome for name, outcome in pattern.findall(output)}
    reasons = re.findall(r"^SKIPPED \[\d+\] (.+)$", output, re.MULTILINE)  # the summary's skip reasons
    return outcomes | ({"skip reasons": "; ".join(reasons)} if reasons else {})


def run_check(args: argparse.Namespace) -> int:
    """Prerequisites, then every step (or, with --dry-run, the plan with each step skipped); the JSON and table."""
    out: Path = args.out
    (out / "logs").mkdir(parents=True, exist_ok=True)
    started, found = time.perf_counter(), prerequisites(args.dry_run)
    print(missing_line(found), flush=True)
    if found["missing"] and not args.dry_run:
        return 2
    steps = plan(out)
    print(f"plan: {len(steps)} steps, time limits {sum(s.limit for s in steps)} s of {DEVICE_SECONDS} s", flush=True)
    rows = []
    for number, step in enumerate(steps, 1):
        print(f"[{number}/{len(steps)}] {step.name}: {step.what}\n    $ {' '.join(step.command)}", flush=True)
        if args.dry_run or not found.get("cuda"):
            reason = "dry run" if args.dry_run else "no CUDA"
            rows.append({"name": step.name, "status": f"skipped: {reason} (needs CUDA)", "seconds": 0.0})
        else:
            rows.append(run_step(step, out))
        print(f"    {rows[-1]['status']}", flush=True)
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dry_run": args.dry_run,
        "prerequisites": found,
        "steps": [{**row, "what": step.what, "command": step.command} for row, step in zip(rows, steps, strict=True)],
        "seconds": round(time.perf_counter() - started, 1),
    }
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "gpu_check.md").write_text(markdown(report))
    print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'} ({report['seconds']} s)")
    return 0 if all(row["status"] in ("passed",) or row["status"].startswith("skipped") for row in rows) else 1


# ---- the markdown report ----------------------------------------------------------------------------------------


def markdown(report: dict) -> str:
    """The report as markdown: the card, the steps, the tests, syncs per method, and the throughput table."""
    from tables import markdown_table

    found = report["prerequisites"]
    lines = [
        f"GPU check, {report['date']}: {found.get('device', '?')}, torch {found.get('torch', '?')}, "
        f"{report['seconds']} s{' (dry run)' if report['dry_run'] else ''}",
        "",
        markdown_table(
            ["step", "status", "seconds"],
            [[s["name"], s["status"], f"{s['seconds']:.1f}"] for s in report["steps"]],
            text_columns=2,
        ),
    ]
    by_name = {step["name"]: step for step in report["steps"]}
    tests = by_name["gpu-tests"].get("tests", {})
    if tests:
        rows = [[name, outcome] for name, outcome in tests.items()]
        lines += ["", markdown_table(["GPU test", "outcome"], rows, text_columns=2)]
    syncs = by_name["syncs"].get("results")
    if syncs:
        header = ["method", "syncs per step (median)", "of them loralab's", "per step"]
        rows = [[m, f"{r['median']:g}", f"{r['loralab_median']:g}", str(r["per_step"])] for m, r in syncs.items()]
        lines += ["", markdown_table(header, rows)]
    throughput = by_name["throughput"].get("results")
    if throughput:
        lines += ["", throughput["setup"], "", markdown_table(THROUGHPUT_HEADER, throughput_rows(throughput))]
    return "\n".join(lines) + "\n"


THROUGHPUT_HEADER = ["side", "real tokens/s", "ms per step", "peak MiB", "MFU", "tokens/s ratio to reference"]


def throughput_rows(throughput: dict) -> list[list[str]]:
    """One table row per side that ran (its error otherwise)."""
    rows = []
    for side in throughput["sides"]:
        if "error" in side:
            rows.append([side["label"], side["error"], "", "", "", ""])
            continue
        rows.append(
            [
                side["label"],
                f"{side['tokens_per_s']:,.0f}",
                f"{side['step_ms']:.1f}",
                f"{side['peak_mib']:,.0f}",
                f"{side['mfu_percent']:.3g} %",
                f"{side['ratio']:.3f} ({side['reference']})",
            ]
        )
    return rows


# ---- throughput: loralab vs HF Trainer + PEFT -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Measured:
    """One side's timed steps: wall seconds, real tokens, steps, peak memory over what was allocated before it."""

    seconds: float
    tokens: int
    steps: int
    peak_mib: float
    adapter_parameters: int


def synchronize(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def measure(build_and_run: Callable[[], tuple[float, int, int, int]], device: str) -> Measured:
    """Peak memory of a side over what was allocated before it was built (CUDA; RSS growth on the CPU), and what it
    measured; everything it held is freed afterwards."""
    import torch

    from common import resident_mb, settle

    settle()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = torch.cuda.memory_allocated() if device == "cuda" else resident_mb("VmRSS")
    seconds, tokens, steps, adapter = build_and_run()
    peak = (torch.cuda.max_memory_allocated() - before) / 2**20 if device == "cuda" else resident_mb("VmHWM") - before
    settle()
    if device == "cuda":
        torch.cuda.empty_cache()
    return Measured(seconds, tokens, steps, peak, adapter)


def loralab_run(
    args: argparse.Namespace, overrides: list[str], features: list[dict], batch: int, warmup: int
) -> tuple[float, int, int, int]:
    """loralab's loop (`training.loop.optimizer_steps`) with the config's adapter and rule on a fresh base: `warmup`
    steps, then `args.steps` timed ones; (seconds, real tokens, steps, adapter parameters)."""
    from accelerate import Accelerator

    from gpu import build_base
    from loralab.adapters import build_adapter
    from loralab.config import load_config
    from loralab.gradient import build_rule
    from loralab.training.loop import BatchOrder, TrainState, optimizer_steps, prepare_for_loop
    from loralab.training.optim import build_optimizer, build_scheduler

    config = load_config([], [*overrides, f"train.batch_size={batch}", "train.warmup_ratio=0"])
    model = build_base(model_config(args), args.device)
    adapter = build_adapter(config.method.adapter, "causal_lm")
    model = adapter.apply(model)
    rule = build_rule(config.method.gradient)
    rule.attach(model, adapter.lora_modules(model))
    accelerator = Accelerator(mixed_precision="no", cpu=args.device == "cpu")
    optimizer = build_optimizer(model, config.train)
    model, optimizer = prepare_for_loop(accelerator, model, optimizer)
    rule.bind_optimizer(optimizer)
    scheduler = build_scheduler(optimizer, config.train, 10**6)
    order, state = BatchOrder(len(features), batch, 0), TrainState()

    def advance(steps: int) -> None:
        end = state.step + steps
        for step in optimizer_steps(
            model, features, rule, config.train, accelerator, optimizer, scheduler, state, order, 0, end
        ):
            if state.step == end:  # the recipe logs a run's last step
                step.train_metrics(scheduler.get_last_lr()[0], state.epoch)

    advance(warmup)
    synchronize(args.device)
    started, tokens = time.perf_counter(), state.tokens
    advance(args.steps)
    synchronize(args.device)
    seconds = time.perf_counter() - started
    adapter_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return seconds, state.tokens - tokens, args.steps, adapter_parameters


def trainer_run(args: argparse.Namespace, features: list[dict], batch: int, liger: bool) -> tuple[float, int, int, int]:
    """`transformers.Trainer` on the same base with PEFT LoRA (r 8, alpha 16, every linear layer), AdamW, clipping at
    1.0, loralab's collate; times from the end of the last warm-up step to the end of the last step."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from gpu import build_base
    from loralab.data.collate import collate

    base = build_base(model_config(args), args.device)
    base.config.use_cache = False  # a cache would turn off transformers' packed (block-diagonal) attention
    lora = LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear")
    model = get_peft_model(base, lora)
    tokens: list[int] = []
    ends: list[float] = []

    def collator(rows: list[dict]) -> dict:
        tokens.append(sum(len(row["input_ids"]) for row in rows))
        return {k: v for k, v in collate(rows, 0).items() if k != "token_mask"}  # loralab's own key, not the model's

    class StepEnds(TrainerCallback):
        def on_step_end(self, *unused, **kwargs) -> None:
            synchronize(args.device)
            ends.append(time.perf_counter())

    arguments = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="gpu-check-trainer-"),
        per_device_train_batch_size=batch,
        learning_rate=3e-4,
        lr_scheduler_type="linear",
        max_steps=args.warmup + args.steps,
        max_grad_norm=1.0,
        optim="adamw_torch",
        use_cpu=args.device == "cpu",
        use_liger_kernel=liger,
        report_to=[],
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = Trainer(model=model, args=arguments, train_dataset=features, data_collator=collator)
    trainer.add_callback(StepEnds())
    trainer.train()
    adapter_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    timed = tokens[args.warmup : args.warmup + args.steps]  # the collator runs once per step, in order
    return ends[-1] - ends[args.warmup - 1], sum(timed), args.steps, adapter_parameters


def model_config(args: argparse.Namespace):
    from gpu import model_config as config_for

    return config_for(args.tiny)


LORA = ["method.name=lora", "method.adapter.target_modules=all-linear", "method.adapter.dropout=0"]
GRIT, OURS = ["method.name=grit"], ["method.name=ours"]


def throughput_sides(args: argparse.Namespace, padded: list[dict], packed: list[dict], rows: int) -> list[tuple]:
    """(label, reference label, run) per side; the Liger sides last, since Liger patches transformers' Llama."""
    batch, warm = args.batch, args.warmup
    sides = [
        ("loralab LoRA, padded", None, lambda: loralab_run(args, LORA, padded, batch, warm)),
        ("HF Trainer + PEFT, padded", "loralab LoRA, padded", lambda: trainer_run(args, padded, batch, False)),
        ("loralab LoRA, packed", "loralab LoRA, padded", lambda: loralab_run(args, LORA, packed, rows, warm)),
        ("HF Trainer + PEFT, packed", "loralab LoRA, packed", lambda: trainer_run(args, packed, rows, False)),
        ("GRIT, padded", "loralab LoRA, padded", lambda: loralab_run(args, GRIT, padded, batch, args.grit_warmup)),
        ("Shake-to-Align, padded", "loralab LoRA, padded", lambda: loralab_run(args, OURS, padded, batch, warm)),
    ]
    if args.liger:
        sides += [
            ("loralab LoRA + Liger, packed", "loralab LoRA, packed", lambda: liger_loralab(args, packed, rows)),
            (
                "HF Trainer + PEFT + Liger, packed",
                "loralab LoRA + Liger, packed",
                lambda: trainer_run(args, packed, rows, True),
            ),
        ]
    return sides


def liger_loralab(args: argparse.Namespace, packed: list[dict], rows: int) -> tuple[float, int, int, int]:
    """loralab's loop on a base whose Llama layers Liger has patched (RMSNorm, RoPE, SwiGLU, fused linear CE)."""
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    apply_liger_kernel_to_llama()
    return loralab_run(args, LORA, packed, rows, args.warmup)


def run_throughput(args: argparse.Namespace) -> None:
    """Every side in turn, each result written to --json as soon as it exists (a time-out keeps the rows so far)."""
    import torch

    from gpu import base_parameters, flops_per_token
    from loralab.data.packing import pack
    from packing import alpaca_features

    config = model_config(args)
    _, base_n = base_parameters(config)
    padded = alpaca_features(args.examples, args.length, config.vocab_size)
    packed = pack(padded, args.length)
    mean_length = statistics.fmean(len(f["input_ids"]) for f in padded)
    rows = max(1, round(args.batch * mean_length / statistics.fmean(len(r["input_ids"]) for r in packed)))
    chip = torch.cuda.get_device_name() if args.device == "cuda" else "CPU (a smoke run, not a GPU figure)"
    result = {
        "setup": (
            f"{chip}, torch {torch.__version__}: Llama from config ({config.num_hidden_layers} layers, hidden "
            f"{config.hidden_size}), bf16 weights, adapters fp32, AdamW; Alpaca-shaped examples of at most "
            f"{args.length} tokens (mean {mean_length:.0f}); padded: {args.batch} examples a step; packed: {rows} "
            f"rows of {args.length} a step; {args.steps} timed steps after {args.warmup} warm-up ({args.grit_warmup} "
            f"for GRIT, past its first inversion at step 50); real (non-padding) tokens only; MFU: "
            f"(4·N + 6·N_adapter + 12·L·d·s̄) per real token, s̄ the mean example length, over "
            f"{args.peak_tflops:g} TFLOP/s"
        ),
        "sides": [],
    }
    measured: dict[str, float] = {}
    for label, reference, run in throughput_sides(args, padded, packed, rows):
        try:
            side = measure(run, args.device)
        except Exception as error:  # a side that fails is a row of the table, not the end of the check
            result["sides"].append({"label": label, "error": f"{type(error).__name__}: {error}"[:200]})
        else:
            per_second = side.tokens / side.seconds
            measured[label] = per_second
            flops = flops_per_token(base_n, side.adapter_parameters, config, round(mean_length)) * per_second
            result["sides"].append(
                {
                    "label": label,
                    "tokens_per_s": per_second,
                    "step_ms": 1e3 * side.seconds / side.steps,
                    "peak_mib": side.peak_mib,
                    "mfu_percent": 100 * flops / (args.peak_tflops * 1e12),
                    "reference": reference or label,
                    "ratio": per_second / measured.get(reference or label, per_second),
                }
            )
        args.json.write_text(json.dumps(result, indent=2) + "\n")


# ---- device→host syncs of the loop on CUDA ----------------------------------------------------------------------

SYNC_BASE = ["task.train_samples=64", "train.batch_size=8", "train.grad_accum=4", "train.warmup_ratio=0"]
SYNC_LLAMA = ["model.name=tiny-llama", "task.name=synthetic/arithmetic", "task.max_length=256"]
SYNC_METHODS = {
    "lora": [*SYNC_LLAMA, "method.name=lora"],
    "ours": ["model.name=tiny-bert", "method.name=ours", "method.gradient.samples_per_vote=2"],
    "grit": [*SYNC_LLAMA, "method.name=grit", "method.gradient.cov_update_freq=8"],
}
SYNC_WARMUP, SYNC_STEPS = 2, 10


class SyncSteps:
    """The recorded sync warnings cut into steps: per step, the count by where they came from."""

    def __init__(self, caught: list) -> None:
        self.caught, self.seen, self.steps = caught, 0, []

    def after_step(self) -> None:
        fresh, self.seen = self.caught[self.seen :], len(self.caught)
        self.steps.append(Counter(source(w.filename) for w in fresh if "synchroniz" in str(w.message)))


SOURCES = ("loralab", "transformers", "peft", "accelerate", "torch")


@functools.cache
def package_directories() -> dict[str, str]:
    """Each counted package's own directory (a checkout named `loralab` holding a venv must not claim torch)."""
    found = {name: importlib.util.find_spec(name) for name in SOURCES}
    return {name: str(Path(spec.origin).parent) + os.sep for name, spec in found.items() if spec and spec.origin}


def source(filename: str) -> str:
    """The counted package a warning's file belongs to, or "other"."""
    for package, directory in package_directories().items():
        if filename.startswith(directory):
            return package
    return "other"


def run_syncs(args: argparse.Namespace) -> None:
    """Per method, 10 steps of 4 micro-batches (no logging but the last) under `set_sync_debug_mode("warn")`."""
    import torch

    from loralab.config import load_config
    from loralab.training.loop import BatchOrder, TrainState, new_accelerator, optimizer_steps, prepare_for_loop
    from loralab.training.optim import build_optimizer, build_scheduler
    from loralab.training.recipe import prepare

    results = {}
    for method, overrides in SYNC_METHODS.items():
        config = load_config([], [*SYNC_BASE, *overrides, f"io.root={tempfile.mkdtemp()}"])
        parts = prepare(config)
        accelerator = new_accelerator("no")
        model, optimizer = prepare_for_loop(accelerator, parts.model, build_optimizer(parts.model, config.train))
        parts.rule.bind_optimizer(optimizer)
        scheduler = build_scheduler(optimizer, config.train, SYNC_WARMUP + SYNC_STEPS)
        order, state = BatchOrder(len(parts.features), config.train.batch_size, config.seed), TrainState()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            events = SyncSteps(caught)
            for steps, mode in ((SYNC_WARMUP, 0), (SYNC_WARMUP + SYNC_STEPS, "warn")):
                if args.device == "cuda":
                    torch.cuda.set_sync_debug_mode(mode)
                pad = parts.tokenizer.pad_token_id
                for step in optimizer_steps(
                    model, parts.features, parts.rule, config.train, accelerator, optimizer, scheduler, state, order,
                    pad, steps,
                ):  # fmt: skip
                    if state.step == steps:  # the recipe logs a run's last step
                        step.train_metrics(scheduler.get_last_lr()[0], state.epoch)
                    events.after_step()
            if args.device == "cuda":
                torch.cuda.set_sync_debug_mode(0)
        counted = events.steps[SYNC_WARMUP:]
        results[method] = {
            "per_step": [sum(c.values()) for c in counted],
            "median": statistics.median(sum(c.values()) for c in counted),
            "loralab_median": statistics.median(c["loralab"] for c in counted),
            "by_source": dict(sum(counted, Counter())),
        }
    args.json.write_text(json.dumps(results, indent=2) + "\n")


# ---- command line -----------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("run", help="the whole check (what gpu_check.sh runs)")
    check.add_argument("--dry-run", action="store_true", help="plan and print every step; run none that needs CUDA")
    check.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu_check")
    device = "cuda" if importlib.util.find_spec("torch") and __import__("torch").cuda.is_available() else "cpu"
    throughput = commands.add_parser("throughput", help="loralab vs HF Trainer + PEFT on a ~1B Llama")
    throughput.add_argument("--json", type=Path, required=True)
    throughput.add_argument("--device", default=device, choices=["cpu", "cuda"])
    throughput.add_argument("--tiny", action="store_true", help="the tiny-llama config (a CPU smoke run)")
    throughput.add_argument("--batch", type=int, default=16, help="examples per padded step")
    throughput.add_argument("--length", type=int, default=512, help="tokens per example at most, per packed row")
    throughput.add_argument("--examples", type=int, default=512)
    throughput.add_argument("--steps", type=int, default=15, help="timed steps per side")
    throughput.add_argument("--warmup", type=int, default=5, help="untimed steps per side first")
    throughput.add_argument(
        "--grit-warmup", type=int, default=51, help="GRIT's untimed steps: past its first inversion (step 50)"
    )
    throughput.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100/H200 SXM: 989)")
    syncs = commands.add_parser("syncs", help="device→host syncs per step of loralab's loop, per method")
    syncs.add_argument("--json", type=Path, required=True)
    syncs.add_argument("--device", default=device, choices=["cpu", "cuda"])
    args = parser.parse_args()
    if args.command == "throughput":
        args.liger = args.device == "cuda" and importable("liger_kernel")  # Liger's kernels are Triton: GPU only
    return args


def main() -> int:
    args = parse_args()
    if args.command == "run":
        return run_check(args)
    {"throughput": run_throughput, "syncs": run_syncs}[args.command](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
