"""Greedy text generation backends with one interface: transformers `generate` (CPU or GPU) and vLLM (optional).

Both take the same prompts, stop strings and token budget and return the text generated after each prompt,
cut before the first stop string; an adapter is chosen by name per call, so one model serves several adapters.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from peft import PeftModel
from torch import nn
from transformers import PreTrainedTokenizerBase

from loralab.data.collate import left_pad_prompts
from loralab.errors import LoraLabError

VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


class Generator(Protocol):
    def generate(
        self, prompts: Sequence[str], max_new_tokens: int, stop: Sequence[str], adapter: str | None = None
    ) -> list[str]:
        """The greedy continuation of each prompt, cut before the first stop string."""


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """Truncate generated text at the first stop string."""
    cut = min((text.find(s) for s in stops if s in text), default=len(text))
    return text[:cut]


class HfGenerator:
    """transformers `generate`: greedy, batches of similar length, left padding, stop strings checked as decoded.

    A prompt longer than the model's positions minus the token budget is cut from the left, as lm-eval does.
    """

    def __init__(
        self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, batch_size: int, add_special_tokens: bool = True
    ) -> None:
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.add_special_tokens = add_special_tokens  # False for prompts a chat template rendered (BOS included)

    @torch.no_grad()
    def generate(
        self, prompts: Sequence[str], max_new_tokens: int, stop: Sequence[str], adapter: str | None = None
    ) -> list[str]:
        if adapter is not None and isinstance(self.model, PeftModel):
            self.model.set_adapter(adapter)
        room = getattr(self.model.config, "max_position_embeddings", None)
        keep = max(room - max_new_tokens, 1) if room else None  # as lm-eval: prompts lose their oldest tokens
        encoded = [self.tokenizer(p, add_special_tokens=self.add_special_tokens)["input_ids"] for p in prompts]
        if keep is not None:
            encoded = [ids[-keep:] for ids in encoded]
        order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
        outputs: list[str] = [""] * len(prompts)
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                texts = self.generate_batch([encoded[i] for i in chunk], max_new_tokens, stop)
                for index, text in zip(chunk, texts, strict=True):
                    outputs[index] = text
        finally:
            self.model.train(was_training)
        return outputs

    def generate_batch(self, prompts: list[list[int]], max_new_tokens: int, stop: Sequence[str]) -> list[str]:
        device = next(self.model.parameters()).device
        batch = {k: v.to(device) for k, v in left_pad_prompts(prompts, self.tokenizer.pad_token_id).items()}
        generated = self.model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            **({"stop_strings": list(stop), "tokenizer": self.tokenizer} if stop else {}),
        )
        new_tokens = generated[:, batch["input_ids"].shape[1] :]
        return [cut_at_stop(self.tokenizer.decode(t, skip_special_tokens=True), stop) for t in new_tokens]


class VllmGenerator:
    """vLLM: one engine for the base model, each adapter served as a LoRA request (CUDA; the `gpu` extra)."""

    def __init__(
        self, base_model: str, adapters: Mapping[str, Path], dtype: str = "auto", seed: int = 0, **engine: Any
    ) -> None:
        """`engine`: further `vllm.LLM` arguments (`enforce_eager`, `gpu_memory_utilization`, ...)."""
        require_vllm()
        from vllm import LLM, SamplingParams
        from vllm.lora.request import LoRARequest

        self.sampling = SamplingParams
        self.engine = LLM(
            model=base_model,
            dtype=dtype,
            seed=seed,
            enable_lora=bool(adapters),
            max_loras=max(len(adapters), 1),
            max_lora_rank=vllm_lora_rank(adapters.values()),
            **engine,
        )
        self.requests = {name: LoRARequest(name, i + 1, str(path)) for i, (name, path) in enumerate(adapters.items())}

    def generate(
        self, prompts: Sequence[str], max_new_tokens: int, stop: Sequence[str], adapter: str | None = None
    ) -> list[str]:
        params = self.sampling(temperature=0.0, top_p=1.0, max_tokens=max_new_tokens, stop=list(stop) or None)
        request = self.requests[adapter] if adapter is not None else None
        results = self.engine.generate(list(prompts), params, lora_request=request)
        return [cut_at_stop(result.outputs[0].text, stop) for result in results]


def require_vllm() -> None:
    """Fail in one line, before any work, where vLLM is not installed."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise LoraLabError("the vllm backend needs vLLM and a CUDA GPU: pip install 'loralab[gpu]'") from None


def vllm_lora_rank(adapters: Iterable[Path]) -> int:
    """The smallest rank vLLM accepts that covers every adapter's r and rank_pattern values."""
    ranks = [8]
    for directory in adapters:
        config = json.loads((Path(directory) / "adapter_config.json").read_text())
        ranks += [int(config.get("r") or 0), *map(int, (config.get("rank_pattern") or {}).values())]
    needed = max(ranks)
    for rank in VLLM_LORA_RANKS:
        if rank >= needed:
            return rank
    raise LoraLabError(f"vLLM serves LoRA ranks up to {VLLM_LORA_RANKS[-1]}; this adapter needs {needed}")
