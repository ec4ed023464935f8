"""FSDP on CPU: `accelerate launch --config_file <packaged fsdp.yaml>` (2 processes, gloo) shards the frozen base with
FSDP2 and trains the adapter of one process with the same global batch, for the baseline, Shake-to-Align and GRIT;
the adapter it saves is a plain PEFT adapter; the sharding itself is checked in-process; what FSDP cannot run is
refused in one line."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from importlib.resources import files
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from peft import PeftModel, get_peft_model_state_dict
from torch.distributed.tensor import DTensor

from conftest import PARALLEL_METHODS as DDP_METHODS
from conftest import PARALLEL_TINY as TINY
from conftest import logged_losses as losses
from conftest import max_difference, run_of
from conftest import parallel_overrides as overrides
from conftest import saved_adapter as adapter
from conftest import train_in as train
from loralab.adapters import build_adapter
from loralab.cli import main
from loralab.config.load import load_config
from loralab.models import load_model
from loralab.seeding import seed_everything
from loralab.tracking import read_metrics
from loralab.training.sharding import ShardingPlan, read_plan, shard_frozen_base

pytestmark = pytest.mark.slow

FSDP_CONFIG = files("loralab") / "configs" / "accelerate" / "fsdp.yaml"
METHODS = ("baseline", "ours", "grit")  # with tests/test_ddp.py's settings
CHECKPOINTS = {"grit": ("train.checkpoint_every=3", "train.keep_last=2")}  # for the resume test


def accelerate_fsdp(arguments: list[str]) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file <packaged fsdp.yaml> -m loralab train` with these overrides."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG)]
    sets = [token for value in arguments for token in ("--set", value)]
    environment = os.environ | {"OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [*launcher, "-m", "loralab", "train", *sets], capture_output=True, text=True, timeout=600, env=environment
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """{method: (one-process run, 2-process FSDP run)} directories."""
    found = {}
    for method in METHODS:
        root = tmp_path_factory.mktemp(method)
        extra = CHECKPOINTS.get(method, ())
        single, sharded = overrides(root / "one", method, *extra), overrides(root / "fsdp", method, *extra)
        assert train(1, single) == 0
        done = accelerate_fsdp(sharded)
        assert done.returncode == 0, done.stderr[-3000:]
        found[method] = run_of(single), run_of(sharded)
    return found


@pytest.mark.parametrize("method", METHODS)
def test_fsdp_trains_the_adapter_of_one_process(runs, method):
    one, two = runs[method]
    status = json.loads((two / "status.json").read_text())
    assert status["state"] == "completed" and status["processes"] == 2 and status["fsdp"] is True
    assert json.loads((one / "status.json").read_text())["fsdp"] is False
    assert max_difference(adapter(one), adapter(two)) <= 1e-5
    (s1, l1), (s2, l2) = zip(*losses(one), strict=True), zip(*losses(two), strict=True)
    assert s1 == s2 == (1, 2, 3, 4, 5, 6)
    assert l2 == pytest.approx(l1, abs=1e-5)
    evaluated = [json.loads((run / "eval.json").read_text())["metrics"] for run in (one, two)]
    assert evaluated[1] == pytest.approx(evaluated[0], abs=1e-6)  # every process took part in each evaluation
    if method == "ours":
        triggered = [r["value"] for r in read_metrics(two / "metrics.csv") if r["metric"] == "shake/trigger_rate"]
        assert max(triggered) > 0  # corrections ran, so the gathered votes decided them


def test_the_fsdp_adapter_loads_with_plain_peft(runs):
    one, two = runs["baseline"]
    config = load_config([], overrides(one.parent, "baseline"))
    base, _ = load_model(config.model, "seq_cls", 2)
    reloaded = PeftModel.from_pretrained(base, str(two / "adapter"))
    loaded = get_peft_model_state_dict(reloaded)
    reference = adapter(one)  # the one-process run's adapter
    assert loaded.keys() == reference.keys() and any("lora_A" in key for key in loaded)
    assert max_difference(loaded, reference) <= 1e-5


def test_an_interrupted_fsdp_run_resumes_to_the_same_adapter(runs, tmp_path):
    finished = runs["grit"][1]
    arguments = overrides(tmp_path, "grit", *CHECKPOINTS["grit"])
    run_dir = run_of(arguments)
    shutil.copytree(finished, run_dir)
    # what a kill after the step-3 checkpoint leaves: no final checkpoint, no outputs, a running status
    shutil.rmtree(run_dir / "checkpoints" / "step-6")
    shutil.rmtree(run_dir / "adapter")
    (run_dir / "eval.json").unlink()
    status = json.loads((run_dir / "status.json").read_text())
    (run_dir / "status.json").write_text(json.dumps(status | {"state": "running"}))
    done = accelerate_fsdp([*arguments, "io.overwrite=resume"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert max_difference(adapter(run_dir), adapter(finished)) <= 1e-6
    assert [step for step, _ in losses(run_dir)] == [1, 2, 3, 4, 5, 6]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def sharding_worker(rank: int, port: int, out: str) -> None:
    """Shard a LoRA tiny-bert over 2 gloo processes; record shard shapes and the logits against the unsharded one."""
    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    dist.init_process_group("gloo", rank=rank, world_size=2)
    config = load_config([], [*TINY, "method.name=baseline"])

    def build() -> torch.nn.Module:
        seed_everything(0, True)
        model, _ = load_model(config.model, "seq_cls", 2)
        return build_adapter(config.method.adapter, "seq_cls").apply(model)

    reference, model = build(), build()
    shard_frozen_base(model, ShardingPlan(block_classes=(), per_block=True, reshard_after_forward=True))
    full = dict(reference.named_parameters())
    record = {"frozen": {}, "trainable": {}, "blocks": []}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            same = not isinstance(parameter, DTensor) and torch.equal(parameter, full[name])
            record["trainable"][name] = [type(parameter).__name__, same]
        else:
            assert isinstance(parameter, DTensor), name
            local = parameter.to_local()
            own = torch.equal(local, full[name][rank * -(-len(full[name]) // 2) :][: len(local)])
            record["frozen"][name] = [list(full[name].shape), list(local.shape), own]
    record["blocks"] = sorted({type(m).__name__ for m in model.modules() if type(m).__name__.startswith("FSDP")})
    inputs = torch.randint(5, 200, (3, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        record["logits"] = float((model(input_ids=inputs).logits - reference(input_ids=inputs).logits).abs().max())
    Path(out, f"rank{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


def test_the_frozen_base_is_sharded_and_the_adapter_stays_whole(tmp_path):
    mp.spawn(sharding_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    records = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for record in records:
        assert "FSDPBertLayer" in record["blocks"]  # each block (the model's _no_split_modules) is its own group
        assert record["logits"] <= 1e-5
        lora = [name for name in record["trainable"] if "lora_" in name]
        wrapped = [name for name in record["frozen"] if name.endswith("base_layer.weight")]
        assert wrapped and len(lora) == 2 * len(wrapped)  # an A and a B beside each sharded base weight
        assert all(kind == "Parameter" and same for kind, same in record["trainable"].values())
        assert any("layer.0.attention.self.query.base_layer.weight" in name for name in record["frozen"])
        assert all(own for _, _, own in record["frozen"].values())  # the rows this rank holds are its own
    for name, (shape, local, _) in records[0]["frozen"].items():
        other = records[1]["frozen"][name][1]
        assert local[0] == -(-shape[0] // 2) and local[0] + other[0] == shape[0]  # half the rows each
        assert local[1:] == other[1:] == shape[1:]


def test_the_plan_follows_the_accelerate_fsdp_settings():
    assert read_plan({}) is None
    assert read_plan({"ACCELERATE_USE_FSDP": "false"}) is None
    named = FSDP_ENV | {
        "FSDP_TRANSFORMER_CLS_TO_WRAP": "LlamaDecoderLayer, BertLayer",
        "FSDP_RESHARD_AFTER_FORWARD": "false",
    }
    assert read_plan(named) == ShardingPlan(("LlamaDecoderLayer", "BertLayer"), True, False)
    assert read_plan(FSDP_ENV | {"FSDP_AUTO_WRAP_POLICY": "NO_WRAP"}) == ShardingPlan((), False, True)


FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP"}


@pytest.mark.parametrize(
    ("environment", "extra", "message"),
    [
        (
            {},
            ("method.name=full_ft",),
            "FSDP shards the frozen base, and method.adapter.kind=full trains every parameter: launch full "
            "fine-tuning with DDP (a DDP accelerate config, torchrun or loralab launch local)",
        ),
        (
            {},
            DDP_METHODS["ours_microbatch"],
            "FSDP needs the same forward passes in every process, which method.gradient.route=microbatch does not "
            "run; use method.gradient.route=vectorized",
        ),
        (
            {"FSDP_VERSION": "1"},
            (),
            "FSDP setting not supported: FSDP_VERSION=1; loralab shards the frozen base with FSDP2 "
            "(fsdp_version: 2, TRANSFORMER_BASED_WRAP or NO_WRAP, no offload; docs/parallel.md)",
        ),
        (
            {"FSDP_OFFLOAD_PARAMS": "true"},
            (),
            "FSDP setting not supported: fsdp_offload_params; loralab shards the frozen base with FSDP2 "
            "(fsdp_version: 2, TRANSFORMER_BASED_WRAP or NO_WRAP, no offload; docs/parallel.md)",
        ),
        (
            {"FSDP_TRANSFORMER_CLS_TO_WRAP": "LlamaDecoderLayer"},
            (),
            "FSDP: the model has no block of class LlamaDecoderLayer; set fsdp_transformer_layer_cls_to_wrap in the "
            "accelerate config to the model's block class",
        ),
    ],
    ids=["full_ft", "microbatch", "fsdp_v1", "offload", "no_such_block"],
)
def test_what_fsdp_cannot_run_is_refused_in_one_line(tmp_path, monkeypatch, capsys, environment, extra, message):
    for name, value in (FSDP_ENV | environment).items():
        monkeypatch.setenv(name, value)
    common = [value for value in TINY if not value.startswith("method.")]  # full_ft has no adapter dropout
    sets = [token for value in (f"io.root={tmp_path}", *common, *extra) for token in ("--set", value)]
    assert main(["train", *sets]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"loralab: error: {message}"]
    assert not any(tmp_path.iterdir())  # refused before the run directory exists
