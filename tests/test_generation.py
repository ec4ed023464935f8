"""Generation backends: batched left-padded HF generation equals one-by-one, vLLM gets the same request, the example."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from loralab.config.schema import ModelConfig
from loralab.evaluation.generate import HfGenerator, VllmGenerator, cut_at_stop, vllm_lora_rank
from loralab.models import load_model

PROMPTS = ["Question: 2 + 3?\nAnswer:", "Q", "Question: a much longer question about apples and pears\nAnswer:"]


def test_batched_generation_equals_one_prompt_at_a_time_and_cuts_at_stops():
    model, tokenizer = load_model(
        ModelConfig("tiny-llama", "causal_lm", "float32", "none", False, False, None), "causal_lm"
    )
    torch.manual_seed(0)
    alone = [HfGenerator(model, tokenizer, 1).generate([p], 24, ())[0] for p in PROMPTS]
    assert HfGenerator(model, tokenizer, 3).generate(PROMPTS, 24, ()) == alone
    stops = (alone[2][5:7],)  # a stop string that occurs in the third output
    cut = HfGenerator(model, tokenizer, 2).generate(PROMPTS, 24, stops)
    assert cut == [cut_at_stop(text, stops) for text in alone] and len(cut[2]) <= 5


def fake_vllm(monkeypatch, calls: dict) -> None:
    """A stand-in `vllm` module that records what the backend asks of it and echoes the prompts."""
    module, lora = types.ModuleType("vllm"), types.ModuleType("vllm.lora.request")

    class LLM:
        def __init__(self, **kwargs):
            calls["engine"] = kwargs

        def generate(self, prompts, params, lora_request=None):
            calls.setdefault("generate", []).append((prompts, params, lora_request))
            return [
                types.SimpleNamespace(outputs=[types.SimpleNamespace(text=f"{p} #### 7\n\nQuestion: x")])
                for p in prompts
            ]

    module.LLM = LLM
    module.SamplingParams = lambda **kwargs: kwargs
    lora.LoRARequest = lambda name, index, path: (name, index, path)
    for name, value in {"vllm": module, "vllm.lora": types.ModuleType("vllm.lora"), "vllm.lora.request": lora}.items():
        monkeypatch.setitem(sys.modules, name, value)


def adapter_config(directory: Path, **config) -> Path:
    directory.mkdir()
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory


def test_vllm_backend_serves_each_adapter_as_a_lora_request(tmp_path, monkeypatch):
    calls: dict = {}
    fake_vllm(monkeypatch, calls)
    baseline = adapter_config(tmp_path / "baseline", r=8)
    edited = adapter_config(tmp_path / "edited", r=16, rank_pattern={"o_proj": 24})
    generator = VllmGenerator("meta-llama/Llama-2-7b-hf", {"baseline": baseline, "edited": edited}, "bfloat16")
    assert calls["engine"] == {
        "model": "meta-llama/Llama-2-7b-hf",
        "dtype": "bfloat16",
        "seed": 0,
        "enable_lora": True,
        "max_loras": 2,
        "max_lora_rank": 32,
    }
    outputs = generator.generate(["a", "b"], 256, ("Question:",), "edited")
    assert outputs == ["a #### 7\n\n", "b #### 7\n\n"]
    prompts, params, request = calls["generate"][0]
    assert prompts == ["a", "b"] and request == ("edited", 2, str(edited))
    assert params == {"temperature": 0.0, "top_p": 1.0, "max_tokens": 256, "stop": ["Question:"]}
    assert vllm_lora_rank([adapter_config(tmp_path / "big", r=64)]) == 64


@pytest.mark.slow
def test_the_spectral_edit_example_runs_offline(tmp_path):
    """examples/spectral_edit.sh as shipped, shortened: train, then edit with each mode and evaluate before/after."""
    script = Path(__file__).parents[1] / "examples" / "spectral_edit.sh"
    env = os.environ | {
        "OUT": str(tmp_path / "example"),
        "TRAIN_STEPS": "4",
        "EVAL_SAMPLES": "2",
        "MAX_NEW_TOKENS": "8",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    subprocess.run(["bash", str(script)], env=env, check=True, capture_output=True, cwd=tmp_path)
    for mode in ("abs_select", "random_index", "gd"):
        document = json.loads((tmp_path / "example" / mode / "metrics_gsm8k.json").read_text())
        assert set(document["results"]) == {"baseline", "edited"} and document["meta"]["n"] == 2
        meta = json.loads((tmp_path / "example" / mode / "spectral_edit_meta.json").read_text())
        assert meta["meta"]["mode"] == mode and meta["meta"]["calib_task"] == "synthetic/arithmetic"
