"""CUDA paths: bf16 mixed precision against fp32, an NF4 (QLoRA) base, the methods on CUDA, vLLM against HF; and
the GPU check (`benchmarks/gpu_check.sh`) rehearsed on the CPU.

The CUDA tests carry the `gpu` mark (conftest skips them without CUDA); the NF4 test also needs bitsandbytes and
the vLLM test vLLM (`pip install ".[gpu]"`). Run them with `python -m pytest -m gpu` (docs/gpu.md).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from loralab.adapters.peft_any import load_peft_adapter
from loralab.config import RunConfig, load_config
from loralab.data import load_task
from loralab.data.collate import collate
from loralab.evaluation.generate import HfGenerator, VllmGenerator
from loralab.models import load_model
from loralab.models.presets import tiny_config, tiny_tokenizer
from loralab.tracking import read_metrics
from loralab.training.loop import BatchOrder, TrainState, new_accelerator, optimizer_steps, prepare_for_loop
from loralab.training.optim import build_optimizer, build_scheduler
from loralab.training.recipe import RunParts, prepare, run_training
from loralab.training.rundir import read_status

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")

TINY_LLAMA = [
    "model.name=tiny-llama",
    "task.name=synthetic/arithmetic",
    "task.train_samples=64",
    "task.eval_samples=4",
    "train.batch_size=8",
    "train.lr=1e-2",
    "train.warmup_ratio=0",
    "method.adapter.target_modules=all-linear",
    "method.adapter.dropout=0",
    "eval.max_new_tokens=8",
    "log.every=1",
]
BF16_LOSS_TOLERANCE = 0.02  # relative, per step; bf16 autocast keeps fp32 master weights, so the gap stays small
NF4_LOGIT_TOLERANCE = 0.02  # relative Frobenius error of the logits: 5 bf16 ulps
METHODS = {
    "lora": ["method.name=lora"],
    "ours": ["method.name=ours", "method.gradient.samples_per_vote=4"],  # 2 votes per batch of 8
    "grit": [  # inverses and reprojection within the 6 steps, so they run on CUDA too
        "method.name=grit",
        "method.gradient.cov_update_freq=1",
        "method.gradient.kfac_update_freq=3",
        "method.gradient.reprojection_freq=3",
        "method.gradient.kfac_min_samples=16",
    ],
}


def tiny_config_for(tmp_path: Path, *overrides: str) -> RunConfig:
    """tiny-llama on synthetic arithmetic, runs under `tmp_path`."""
    return load_config([], [*TINY_LLAMA, f"io.root={tmp_path / 'runs'}", *overrides])


def trained_run(config: RunConfig) -> Path:
    """Train a run through the recipe and return its directory, checking that it trained on CUDA."""
    directory = run_training(config, show_progress=False).directory
    assert read_status(directory)["device"].startswith("cuda")
    return directory


def metric_curve(directory: Path, metric: str) -> list[float]:
    """A training metric at every logged step, from the run's metrics.csv."""
    rows = read_metrics(directory / "metrics.csv")
    return [row["value"] for row in rows if row["split"] == "train" and row["metric"] == metric]


def assert_learns(losses: list[float]) -> None:
    """Finite losses whose last 5 average at least 0.1 nats below the first 5 (uniform bytes: ln 263 = 5.57)."""
    assert all(math.isfinite(loss) for loss in losses)
    assert statistics.fmean(losses[-5:]) < statistics.fmean(losses[:5]) - 0.1


@pytest.mark.gpu
def test_bf16_mixed_precision_follows_the_fp32_loss_curve_and_keeps_the_adapter_fp32(tmp_path):
    """Same seed, data and steps: under bf16 autocast every step's loss is within 2 % of the fp32 run's (a CPU
    rehearsal differed by 0.3 % at most), and not equal to it (autocast did run); the trained LoRA weights are
    float32 (master weights, not bf16 copies)."""
    fp32 = trained_run(tiny_config_for(tmp_path, "train.max_steps=20"))
    bf16 = trained_run(tiny_config_for(tmp_path, "train.max_steps=20", "train.mixed_precision=bf16"))
    reference, mixed = metric_curve(fp32, "loss"), metric_curve(bf16, "loss")
    assert len(reference) == len(mixed) == 20
    assert_learns(reference)  # a curve that moves, or the comparison would mean little
    gaps = [abs(m - r) / r for m, r in zip(mixed, reference, strict=True)]
    assert 0 < max(gaps) < BF16_LOSS_TOLERANCE
    tensors = load_file(str(bf16 / "adapter" / "adapter_model.safetensors"))
    assert tensors and {t.dtype for t in tensors.values()} == {torch.float32}


def train_in_place(parts: RunParts, config: RunConfig) -> list[float]:
    """Train prepared parts with loralab's loop for `train.max_steps`, as a run does, keeping the model in memory;
    returns the losses."""
    accelerator = new_accelerator(config.train.mixed_precision)
    model, optimizer = prepare_for_loop(accelerator, parts.model, build_optimizer(parts.model, config.train))
    parts.rule.bind_optimizer(optimizer)
    scheduler = build_scheduler(optimizer, config.train, config.train.max_steps)
    order = BatchOrder(len(parts.features), config.train.batch_size, config.seed)
    pad, steps = parts.tokenizer.pad_token_id, config.train.max_steps
    batches = optimizer_steps(
        model,
        parts.features,
        parts.rule,
        config.train,
        accelerator,
        optimizer,
        scheduler,
        TrainState(),
        order,
        pad,
        steps,
    )
    return [step.loss for step in batches if step.finite]


@pytest.mark.gpu
def test_nf4_base_trains_float_lora_and_the_adapter_loads_with_plain_peft_on_a_bf16_base(tmp_path):
    """QLoRA: every decoder Linear is a bitsandbytes Linear4bit holding packed NF4 weights, the LoRA A/B on them are
    trainable float32 on the GPU, and 30 steps lower the loss. The saved adapter loads with plain
    `PeftModel.from_pretrained` on a bf16 base whose Linear weights are the NF4 base dequantized (the weights the
    adapter was trained against), so the logits differ only by bf16 rounding: bitsandbytes' 4-bit GEMM against
    dequantize-then-matmul, and the LoRA delta rounded to bf16 before the sum or after it. The bound is a 2 %
    relative (Frobenius) error, 5 bf16 ulps (2^-8 each); a CPU rehearsal with bitsandbytes' CPU backend gave 0.6 %.
    Against the never-quantized bf16 weights the NF4 error itself would dominate, which is not what this checks."""
    bnb = pytest.importorskip("bitsandbytes")
    config = tiny_config_for(tmp_path, "model.quantization=nf4", "model.dtype=bfloat16", "train.max_steps=30")
    parts = prepare(config)
    views = parts.adapter.lora_modules(parts.model)
    decoder = parts.model.get_base_model().model.layers
    linears = [m for m in decoder.modules() if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad]
    assert len(views) == len(linears) == 7 * len(decoder)  # q, k, v, o, gate, up, down per layer
    for view in views.values():
        base = view.module.base_layer
        assert isinstance(base, bnb.nn.Linear4bit) and base.weight.dtype == torch.uint8
        assert base.weight.quant_state.quant_type == "nf4" and not base.weight.requires_grad
        assert all(p.requires_grad and p.dtype == torch.float32 and p.is_cuda for p in (view.A, view.B))

    losses = train_in_place(parts, config)
    assert_learns(losses)

    adapter = tmp_path / "adapter"
    parts.adapter.save(parts.model, adapter)
    quantized, _ = load_model(config.model, "causal_lm")  # the same NF4 base, quantized again (deterministic)
    base = quantized.dequantize()
    assert isinstance(base, LlamaForCausalLM) and base.dtype == torch.bfloat16
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in base.modules())
    plain = PeftModel.from_pretrained(base, str(adapter)).eval()
    trained = parts.model.eval()
    batch = {k: v.cuda() for k, v in collate(parts.features[:4], parts.tokenizer.pad_token_id).items()}
    keep = batch["attention_mask"].bool()
    with torch.no_grad():
        expected, actual = (m(**batch).logits.float()[keep] for m in (trained, plain))
    assert (actual - expected).norm() <= NF4_LOGIT_TOLERANCE * expected.norm()


@pytest.mark.gpu
@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_method_trains_on_cuda_with_a_finite_loss(tmp_path, method):
    """Baseline LoRA, Shake-to-Align and GRIT on a bf16 tiny-llama: every step's loss finite, none skipped, and the
    rule's own work ran (Shake-to-Align corrected blocks from 2 votes, GRIT inverted its covariances)."""
    config = tiny_config_for(tmp_path, "model.dtype=bfloat16", "train.max_steps=6", *METHODS[method])
    directory = trained_run(config)
    losses = metric_curve(directory, "loss")
    assert len(losses) == 6 and all(math.isfinite(loss) for loss in losses)
    assert not metric_curve(directory, "bad_step")
    if method == "ours":
        assert set(metric_curve(directory, "shake/votes")) == {2.0}
        assert max(metric_curve(directory, "shake/trigger_rate")) > 0
    if method == "grit":
        assert max(metric_curve(directory, "grit/inverted")) > 0


def vllm_llama(directory: Path) -> Path:
    """The tiny-llama preset widened to heads of 64 (a head size vLLM's attention kernels support), saved with its
    byte tokenizer. Weights are drawn with std 0.1: at the usual 0.02 the frozen lm_head behind the RMS norm keeps
    every logit within about ±5, too flat for any adapter to make a greedy step confident."""
    config = tiny_config("tiny-llama", None)
    config.update({"hidden_size": 256, "intermediate_size": 512, "head_dim": 64, "initializer_range": 0.1})
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    tiny_tokenizer("tiny-llama").save_pretrained(directory)
    return directory


@pytest.mark.gpu
def test_vllm_greedy_generations_with_a_lora_adapter_equal_hf_generate(tmp_path):
    """A LoRA (r 8 on every linear layer; vLLM serves ranks from 8) trained until it reproduces its 4 training
    answers, so every greedy step has a wide margin; vLLM with the adapter as a LoRA request then generates exactly
    what HF `generate` does on the PEFT model, both in float16 (vLLM's LoRA kernels run in fp16/bf16 only), and
    something else without the request (the adapter is applied, not ignored)."""
    pytest.importorskip("vllm")
    base = vllm_llama(tmp_path / "base")
    config = load_config(
        [],
        [
            f"model.name={base}",
            "task.name=synthetic/squad",
            "task.train_samples=4",
            "task.eval_samples=2",
            "task.max_length=256",  # whole prompts, as generation sees them
            "method.name=baseline",
            "method.adapter.dropout=0",
            "train.batch_size=4",
            "train.max_steps=40",
            "train.lr=3e-3",
            "train.warmup_ratio=0",
            "eval.max_new_tokens=8",
            f"io.root={tmp_path / 'runs'}",
        ],
    )
    adapter = trained_run(config) / "adapter"
    examples = load_task(config.task).train
    prompts, new_tokens = [example.text for example in examples], 24

    model, tokenizer = load_model(dataclasses.replace(config.model, dtype="float16"), "causal_lm")
    peft_model = load_peft_adapter(model.cuda(), adapter)
    hf = HfGenerator(peft_model, tokenizer, len(prompts)).generate(prompts, new_tokens, ())
    assert hf == [example.target for example in examples], "the adapter must have memorised the answers"

    del model, peft_model
    torch.cuda.empty_cache()  # vLLM claims most of the GPU's free memory
    # eager (no graph capture) and a small KV cache: a tiny model starts in seconds instead of a minute
    generator = VllmGenerator(
        str(base), {"trained": adapter}, dtype="float16", enforce_eager=True, gpu_memory_utilization=0.2
    )
    assert generator.generate(prompts, new_tokens, (), "trained") == hf
    assert generator.generate(prompts, new_tokens, ()) != hf
    del generator
    gc.collect()  # shuts the engine down, returning the GPU memory it holds to the tests after this one


GPU_CHECK = Path(__file__).parent.parent / "benchmarks"


def test_gpu_check_dry_run_plans_every_step_and_writes_the_report(tmp_path):
    """`gpu_check.sh --dry-run` on any machine: the prerequisites line, every step with its command, the steps that
    need CUDA skipped with the reason, the JSON and markdown report; exit 0, in seconds."""
    done = subprocess.run(
        ["bash", str(GPU_CHECK / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("gpu_check: ")
    steps = ["gpu-tests", "syncs", "throughput"]
    for number, step in enumerate(steps, 1):
        assert any(line.startswith(f"[{number}/3] {step}: ") for line in lines)
    assert done.stdout.count("$ ") == 3 and done.stdout.count("skipped: dry run (needs CUDA)") == 3
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["dry_run"] and [step["name"] for step in report["steps"]] == steps
    assert "| throughput | skipped: dry run (needs CUDA) |" in (tmp_path / "gpu_check.md").read_text()


@pytest.mark.slow
def test_gpu_check_steps_rehearse_on_the_cpu(tmp_path):
    """The throughput and syncs steps' own code on the CPU with the tiny Llama config, so a GPU run starts measuring:
    every side trains and is measured, and every method's 10 steps are counted."""
    script = [sys.executable, str(GPU_CHECK / "gpu_check.py")]
    tiny = ["--device", "cpu", "--tiny", "--steps", "2", "--warmup", "1", "--grit-warmup", "2"]
    sizes = ["--length", "64", "--examples", "64"]
    throughput, syncs = tmp_path / "throughput.json", tmp_path / "syncs.json"
    for command in (["throughput", "--json", str(throughput), *tiny, *sizes], ["syncs", "--json", str(syncs)]):
        subprocess.run([*script, *command], check=True, capture_output=True, timeout=900)
    sides = json.loads(throughput.read_text())["sides"]
    assert [side["label"] for side in sides] == [
        "loralab LoRA, padded",
        "HF Trainer + PEFT, padded",
        "loralab LoRA, packed",
        "HF Trainer + PEFT, packed",
        "GRIT, padded",
        "Shake-to-Align, padded",
    ]
    assert all(side["tokens_per_s"] > 0 and side["mfu_percent"] > 0 for side in sides)
    counted = json.loads(syncs.read_text())
    assert sorted(counted) == ["grit", "lora", "ours"] and all(len(m["per_step"]) == 10 for m in counted.values())
