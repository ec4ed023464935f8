"""Which adapter, on which base model, with which head: from a run directory or an adapter directory + --base.

A run directory (holding `config.yaml` and `adapter/`) gives the base model, its dtype and the task, hence the
head (`models.heads.resolve_head`) and the number of labels. A bare adapter directory needs `--base`; its
head comes from `--task`, else from the PEFT config's task type; a classification head's size comes from the
task, else from the saved head tensor. A masked-diffusion run is analysed on its masked-LM backbone.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import PreTrainedTokenizerBase

from loralab.adapters import load_adapter, load_peft_adapter
from loralab.adapters.base import SIDE_FILE, check_safetensors, read_json, require_directory
from loralab.adapters.peft_any import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from loralab.config import load_config
from loralab.config.schema import ModelConfig, RunConfig
from loralab.data import load_task, resolved_spec
from loralab.errors import AdapterError, ConfigError
from loralab.models.heads import resolve_head
from loralab.models.load import load_model_reporting_new

NATIVE_WEIGHTS = {  # loralab's own (non-PEFT) adapter kinds: the file of the tensors they train
    "full": "weights.safetensors",
    "bitfit": "weights.safetensors",
    "houlsby": "houlsby.safetensors",
    "prefix": "prefix.safetensors",
}
PEFT_HEADS = {"SEQ_CLS": "seq_cls", "CAUSAL_LM": "causal_lm"}
HEAD_SUFFIXES = ("classifier.weight", "score.weight", "out_proj.weight")  # the last layer of a classification head
PROBE_SENTENCES = (
    "The film was a quiet delight from start to finish.",
    "I would not recommend this place to anyone.",
    "What is the sum of twelve and thirty?",
    "A low-rank update adds B times A to the frozen weight.",
    "The weather turned cold before the train arrived.",
    "Nobody expected the results to hold up, but they did.",
    "Answer briefly: which planet is closest to the sun?",
    "Every adapter is saved in the standard PEFT format.",
)


@dataclass
class AdapterSource:
    """An adapter directory and what is needed to load it: the base model config, head, labels and task."""

    adapter: Path
    model: ModelConfig
    head: str  # seq_cls | causal_lm | masked_lm
    num_labels: int | None
    config: RunConfig | None  # the run's config (or one naming --task); None: no task known
    kind: str  # loralab.json's adapter kind, or 'peft' for a PEFT directory without one
    diffusion: bool = False  # a masked-diffusion run: the adapter is analysed on the backbone

    @property
    def is_peft(self) -> bool:
        return self.kind not in NATIVE_WEIGHTS and (self.adapter / ADAPTER_CONFIG).is_file()

    @property
    def peft_config(self) -> dict:
        return read_json(self.adapter / ADAPTER_CONFIG) if self.is_peft else {}

    def native_weights(self) -> Path | None:
        """The safetensors file of a loralab-native adapter (its tensors keyed by the model's names), else None."""
        return self.adapter / NATIVE_WEIGHTS[self.kind] if self.kind in NATIVE_WEIGHTS else None

    def load_base(self) -> tuple[nn.Module, PreTrainedTokenizerBase, tuple[str, ...]]:
        """A fresh base model with the head, its tokenizer, and the names of parameters its checkpoint lacked."""
        return load_model_reporting_new(self.model, self.head, self.num_labels)

    def load_adapted(
        self, trainable: bool = False, device: torch.device | None = None
    ) -> tuple[nn.Module, PreTrainedTokenizerBase]:
        """A fresh base with the adapter on it, and the tokenizer; `trainable` loads a PEFT adapter as for
        training (is_trainable: the adapter's tensors require grad, the base's must not)."""
        model, tokenizer, _ = self.load_base()
        if device is not None:
            model = model.to(device)
        if self.is_peft:
            return load_peft_adapter(model, self.adapter, is_trainable=trainable), tokenizer
        return load_adapter(model, self.adapter), tokenizer

    def probe_texts(self, count: int) -> tuple[list[str], list[str | None], str]:
        """`count` texts (and text pairs) from the task's eval split, or fixed sentences when no task is known."""
        if count < 1:
            raise ConfigError(f"the probe batch needs at least one text, got {count}")
        if self.config is None:
            texts = [PROBE_SENTENCES[i % len(PROBE_SENTENCES)] for i in range(count)]
            return texts, [None] * count, "synthetic sentences"
        examples = load_task(self.config.task).eval[:count]
        if not examples:
            raise ConfigError(f"task {self.config.task.name} has no eval examples to probe with")
        return [e.text for e in examples], [e.text_pair for e in examples], f"{self.config.task.name} (eval split)"

    def probe_batch(self, tokenizer: PreTrainedTokenizerBase, count: int) -> tuple[dict, str]:
        """The tokenised probe batch (padded, truncated to the task's max_length) and where its texts came from."""
        texts, pairs, origin = self.probe_texts(count)
        max_length = self.config.task.max_length if self.config is not None else 128
        pair = pairs if any(p is not None for p in pairs) else None
        batch = tokenizer(texts, pair, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return dict(batch), origin


def resolve_source(path: Path, base: str | None = None, task: str | None = None) -> AdapterSource:
    """The adapter at `path` (an adapter directory or a run directory holding adapter/) and how to load it."""
    run, adapter, kind = locate(path)
    overrides = [f"model.name={base}"] if base else []
    overrides += [f"task.name={task}"] if task else []
    if run is not None:
        config: RunConfig | None = load_config([str(run / "config.yaml")], overrides)
    elif base is None:
        raise ConfigError(f"{adapter} is not a run directory: pass --base MODEL (and --task T for a task's probes)")
    else:
        resolved = load_config([], overrides)
        config, model_cfg = (resolved if task else None), resolved.model
    if config is not None:
        model_cfg = config.model
        head = resolve_head(config.model.kind, config.task.format)
        num_labels = resolved_spec(config.task).num_labels if head == "seq_cls" else None
    else:
        head, num_labels = head_of_adapter(adapter), None
        if head == "seq_cls":
            num_labels = saved_head_size(adapter)
    diffusion = head == "masked_diffusion"
    if diffusion:
        head = "masked_lm"
    return AdapterSource(adapter, model_cfg, head, num_labels, config, kind, diffusion)


def locate(path: Path) -> tuple[Path | None, Path, str]:
    """The run directory (None for a bare adapter), the adapter directory and its kind ('peft' without a
    loralab.json); anything but a PEFT or a loralab-native adapter is refused."""
    path = Path(path)
    if not path.exists():
        raise AdapterError(f"adapter or run directory not found: {path}")
    run = path if (path / "adapter").is_dir() and (path / "config.yaml").is_file() else None
    adapter = require_directory(path / "adapter" if run is not None else path)
    side = read_json(adapter / SIDE_FILE) if (adapter / SIDE_FILE).is_file() else {}
    kind = side.get("adapter", "peft")
    if kind not in NATIVE_WEIGHTS and not (adapter / ADAPTER_CONFIG).is_file():
        raise AdapterError(
            f"{adapter}: a '{kind}' adapter without {ADAPTER_CONFIG}; analyze and merge serve PEFT adapters "
            "(merge only those) and loralab's full, bitfit, houlsby and prefix adapters"
        )
    return run, adapter, kind


def head_of_adapter(adapter: Path) -> str:
    """A PEFT adapter's head from its task type; others need --task."""
    task_type = read_json(adapter / ADAPTER_CONFIG).get("task_type") if (adapter / ADAPTER_CONFIG).is_file() else None
    if task_type not in PEFT_HEADS:
        raise ConfigError(f"{adapter}: the head is not recorded (PEFT task_type {task_type}); pass --task T")
    return PEFT_HEADS[task_type]


def saved_head_size(adapter: Path) -> int:
    """The number of labels of a classification adapter: rows of the saved head's last weight."""
    check_safetensors(adapter / ADAPTER_WEIGHTS)
    with safe_open(str(adapter / ADAPTER_WEIGHTS), framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
            if key.replace("modules_to_save.", "").endswith(HEAD_SUFFIXES):
                return handle.get_slice(key).get_shape()[0]
    raise ConfigError(f"{adapter}: no classification head among the saved tensors; pass --task T")


def with_dtype(source: AdapterSource, dtype: str) -> AdapterSource:
    """The same source with the base loaded in `dtype` and without quantisation (a merge needs full weights)."""
    return dataclasses.replace(source, model=dataclasses.replace(source.model, dtype=dtype, quantization="none"))
