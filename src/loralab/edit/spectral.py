"""LoRA Spectral Edit: rescale each selected module's singular values by how sensitive a calibration loss is to them.

Per module: thin SVD of B A from the adapter file (lowrank.py), ∂L/∂σ_k from hooks over a calibration set
(sensitivity.py), new σ by the edit rule (rules.py), B' = U diag(√σ'), A' = diag(√σ') Vᵀ written under the same
keys in the original dtype. Modules that are not selected are copied byte for byte; the result is a PEFT adapter.
The math, the defaults and every choice the paper leaves open: docs/methods/spectral_edit.md.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from loralab import __version__
from loralab.adapters.base import check_safetensors, read_json, require_directory
from loralab.adapters.compress import peft_module_name
from loralab.adapters.peft_any import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_peft_adapter
from loralab.config.load import load_task_config, task_section
from loralab.config.schema import ModelConfig, TaskConfig
from loralab.data import TaskData, load_task
from loralab.data.collate import IGNORE_INDEX, collate
from loralab.data.encode import encode_examples, fit_sequences
from loralab.data.tasks import Example
from loralab.edit.rules import EditRule, edit_sigma
from loralab.edit.sensitivity import SpectralBasis, recording
from loralab.errors import AdapterError, ConfigError, first_line
from loralab.lowrank import rebuild_factors, thin_svd
from loralab.models import load_model

META_FILE = "spectral_edit_meta.json"
TOKENIZATIONS = ("loralab", "published")
LAYER = re.compile(r"\.layers\.(\d+)\.")
A_SUFFIX, B_SUFFIX = ".lora_A.weight", ".lora_B.weight"


@dataclass(frozen=True)
class SpectralEdit:
    """One edit: the base model and adapter, which modules, the calibration data, the rule, where to write."""

    base_model: str
    lora_path: str
    out_dir: Path
    rule: EditRule = field(default_factory=EditRule)
    target_modules: tuple[str, ...] = ("down_proj", "o_proj")
    layer_min: int | None = None
    layer_max: int | None = None
    calib_task: str = "gsm8k"
    calib_path: str | None = None
    calib_samples: int = 32
    calib_batch_size: int = 2
    max_length: int = 512
    dtype: str = "auto"
    device: str = "auto"
    overwrite: bool = False
    calib_tokenization: Literal["loralab", "published"] = "loralab"

    def __post_init__(self) -> None:
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        for name in ("calib_samples", "calib_batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.layer_min is not None and self.layer_max is not None and self.layer_min > self.layer_max:
            raise ConfigError(f"layer_min ({self.layer_min}) must not exceed layer_max ({self.layer_max})")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.calib_tokenization not in TOKENIZATIONS:
            raise ConfigError(f"calib_tokenization must be loralab or published, got {self.calib_tokenization!r}")
        self.torch_device()  # an unknown device, or cuda where torch sees none, fails now and in one line

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            device = torch.device(self.device)
        except RuntimeError:
            raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {self.device}: torch {torch.__version__} sees no CUDA device")
        return device

    def model_config(self) -> ModelConfig:
        """The base model as calibrated: fp16 on a GPU (g within ~1e-3 of max|g| of float64 on a tiny model, bf16
        ~4e-3: docs/methods/spectral_edit.md) and fp32 on a CPU, unless `dtype` says otherwise."""
        dtype = self.dtype
        if dtype == "auto":
            dtype = "float16" if self.torch_device().type == "cuda" else "float32"
        return ModelConfig(self.base_model, "causal_lm", dtype, "none", False, False, None)

    def meta(self) -> dict:
        return {
            "base_model": self.base_model,
            "lora_path": self.lora_path,
            "target_modules": list(self.target_modules),
            "layer_min": self.layer_min,
            "layer_max": self.layer_max,
            "calib_task": self.calib_task,
            "calib_samples": self.calib_samples,
            "calib_batch_size": self.calib_batch_size,
            "calib_tokenization": self.calib_tokenization,
            **self.rule.as_dict(),
            "loralab_version": __version__,
        }


@dataclass
class EditOutcome:
    source: Path  # the adapter directory edited (a hub id resolves to its local cache)
    out_dir: Path
    sigma_stats: dict[str, dict]


def resolve_adapter(lora_path: str) -> Path:
    """A local adapter directory, or a hub adapter id fetched into the local cache."""
    path = Path(lora_path).expanduser()
    if path.is_dir():
        return path
    if lora_path.startswith((".", "/", "~")) or lora_path.count("/") != 1:
        raise AdapterError(f"adapter directory not found: {lora_path}")
    import huggingface_hub

    try:
        return Path(huggingface_hub.snapshot_download(lora_path, allow_patterns=[ADAPTER_CONFIG, ADAPTER_WEIGHTS]))
    except Exception as exc:  # offline, unknown repo and auth failures all land here
        raise AdapterError(f"cannot fetch adapter '{lora_path}' from the hub: {first_line(exc)}") from None


def select_modules(keys: list[str], target_modules: tuple[str, ...], low: int | None, high: int | None) -> list[str]:
    """Prefixes with both LoRA factors whose last name is a target, in layers [low, high] where they have a layer."""
    selected = []
    for key in keys:
        if not key.endswith(A_SUFFIX):
            continue
        prefix = key.removesuffix(A_SUFFIX)
        layer = LAYER.search(prefix + ".")
        inside = layer is None or (
            (low is None or int(layer.group(1)) >= low) and (high is None or int(layer.group(1)) <= high)
        )
        if prefix.rsplit(".", 1)[-1] in target_modules and inside and prefix + B_SUFFIX in keys:
            selected.append(prefix)
    return selected


def prepare_out_dir(out: Path, source: Path, overwrite: bool) -> None:
    """Refuse the source directory, and a non-empty directory unless `overwrite` (which replaces only our files)."""
    if out.resolve() == source.resolve():
        raise ConfigError(f"--out_dir must differ from the adapter directory: {out}")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"--out_dir {out} is not empty; pass --overwrite to replace the files an edit writes")
    out.mkdir(parents=True, exist_ok=True)


def read_adapter(directory: Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, str]]:
    """The adapter's config, its tensors and the safetensors metadata; DoRA adapters are refused."""
    config = read_json(directory / ADAPTER_CONFIG)
    if config.get("peft_type", "LORA") != "LORA":
        kind = str(config["peft_type"])
        article = "an" if kind[:1].upper() in "AEIOU" else "a"
        raise AdapterError(f"{directory} is {article} {kind} adapter; spectral edit needs a LoRA adapter")
    if config.get("use_dora"):
        raise AdapterError(f"{directory} is a DoRA adapter: its magnitude vector makes ΔW non-linear in σ")
    check_safetensors(directory / ADAPTER_WEIGHTS)
    with safe_open(str(directory / ADAPTER_WEIGHTS), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - no __iter__
        metadata = handle.metadata() or {"format": "pt"}
    return config, tensors, metadata


def spectral_bases(
    model: nn.Module, prefixes: list[str], tensors: dict, device: torch.device
) -> dict[str, SpectralBasis]:
    """Thin SVDs of the selected modules' file factors, in the model's module order, with PEFT's scaling."""
    wanted, bases = set(prefixes), {}
    for name, module in model.named_modules():
        if name in wanted:
            A, B = tensors[name + A_SUFFIX].to(device), tensors[name + B_SUFFIX].to(device)
            U, S, Vh = thin_svd(B, A)
            bases[name] = SpectralBasis.of(module, U, S, Vh, float(module.scaling[module.active_adapters[0]]))
    missing = wanted - set(bases)
    if missing:
        raise AdapterError(f"adapter modules not found in the loaded model: {', '.join(sorted(missing))}")
    return bases


def published_sequence(example: Example, tokenizer) -> dict:
    """The published tool's calibration tokens: prompt + answer + the EOS text, without special tokens; the loss
    masked over as many tokens as the prompt alone has; attention 0 wherever the id is the pad id."""
    full = tokenizer(example.text + example.target + (tokenizer.eos_token or ""), add_special_tokens=False)
    ids = full["input_ids"]
    prompt = min(len(tokenizer(example.text, add_special_tokens=False)["input_ids"]), len(ids))
    mask = [int(token != tokenizer.pad_token_id) for token in ids]
    return {"input_ids": ids, "attention_mask": mask, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]}


def calibration_features(task: TaskData, tokenizer, max_length: int, samples: int, tokenization: str) -> list[dict]:
    """loralab: the task's training features (the prompt with the tokenizer's special tokens, as loralab trains);
    published: `published_sequence` per example (sft tasks only), cut at `max_length` the same way."""
    examples = task.train[:samples]
    if tokenization == "loralab":
        return encode_examples(task.spec, examples, tokenizer, max_length)
    return fit_sequences([published_sequence(e, tokenizer) for e in examples], examples, max_length, "right")


def calibrate(
    model: nn.Module,
    tokenizer,
    task: TaskData,
    bases: dict[str, SpectralBasis],
    batch_size: int,
    max_length: int,
    samples: int,
    tokenization: str = "loralab",
) -> None:
    """Sum ∂L/∂σ over the first `samples` training examples, one answer-token loss per batch; no parameter receives
    a gradient."""
    device = next(model.parameters()).device
    features = calibration_features(task, tokenizer, max_length, samples, tokenization)
    handle = model.get_input_embeddings().register_forward_hook(lambda module, inputs, output: output.requires_grad_())
    try:
        for start in range(0, len(features), batch_size):
            batch = {
                k: v.to(device)
                for k, v in collate(features[start : start + batch_size], tokenizer.pad_token_id).items()
            }
            with recording(bases, batch["attention_mask"]):
                model(**batch, use_cache=False).loss.backward()
    finally:
        handle.remove()


def require_finite(bases: dict[str, SpectralBasis], dtype: str) -> None:
    """One line, not an edit of garbage, when a half-precision calibration overflowed."""
    bad = [name for name, basis in bases.items() if not bool(basis.g.isfinite().all())]
    if bad:
        raise ConfigError(
            f"calibration in {dtype} gave non-finite ∂L/∂σ in {len(bad)} module(s) (first: {bad[0]}); "
            "rerun with --dtype float32 or bfloat16"
        )


def write_adapter(edit: SpectralEdit, source: Path, tensors: dict, metadata: dict, stats: dict) -> None:
    shutil.copyfile(source / ADAPTER_CONFIG, edit.out_dir / ADAPTER_CONFIG)
    save_file(tensors, str(edit.out_dir / ADAPTER_WEIGHTS), metadata=metadata)
    document = {"meta": edit.meta(), "sigma_stats": stats}
    (edit.out_dir / META_FILE).write_text(json.dumps(document, indent=2) + "\n")


def calibration_task(edit: SpectralEdit) -> TaskConfig:
    """The calibration task: a built-in name, or a YAML file holding a `task:` section of one's own (sft or chat)."""
    keys = task_section(edit.calib_task)
    if edit.calib_path is not None:
        keys = {**keys, "path": edit.calib_path}
    sizes = {"max_length": edit.max_length, "train_samples": edit.calib_samples, "eval_samples": 1}
    task = load_task_config(**{**keys, **sizes})
    if task.format not in ("sft", "chat"):
        raise ConfigError(f"--calib_task must be an sft or chat task; {task.name} is {task.format}")
    if edit.calib_tokenization == "published" and task.format != "sft":
        raise ConfigError(f"--calib-tokenization published needs an sft calibration task; {task.name} is chat")
    return task


def spectral_edit(edit: SpectralEdit) -> EditOutcome:
    """Calibrate, edit and write `edit.out_dir`; returns where from, where to and the per-module statistics."""
    source = require_directory(resolve_adapter(edit.lora_path))
    prepare_out_dir(edit.out_dir, source, edit.overwrite)
    _, tensors, metadata = read_adapter(source)
    prefixes = select_modules(list(tensors), edit.target_modules, edit.layer_min, edit.layer_max)
    if not prefixes:
        raise ConfigError(
            f"no LoRA module named {' or '.join(edit.target_modules)} in the selected layers of {edit.lora_path}"
        )
    task = load_task(calibration_task(edit))
    device = edit.torch_device()
    model, tokenizer = load_model(edit.model_config(), "causal_lm")
    model = load_peft_adapter(model.to(device), source)
    model.eval()
    bases = spectral_bases(model, prefixes, tensors, device)
    calibrate(
        model,
        tokenizer,
        task,
        bases,
        edit.calib_batch_size,
        edit.max_length,
        edit.calib_samples,
        edit.calib_tokenization,
    )
    require_finite(bases, edit.model_config().dtype)
    generator = torch.Generator().manual_seed(edit.rule.seed)
    stats = {}
    for prefix, basis in bases.items():
        sigma, stats[peft_module_name(prefix)] = edit_sigma(basis.S, basis.g, edit.rule, generator)
        B, A = rebuild_factors(basis.U, sigma.to(basis.U), basis.Vh)
        tensors[prefix + A_SUFFIX] = A.to(tensors[prefix + A_SUFFIX].dtype).cpu().contiguous()
        tensors[prefix + B_SUFFIX] = B.to(tensors[prefix + B_SUFFIX].dtype).cpu().contiguous()
    write_adapter(edit, source, tensors, metadata, stats)
    return EditOutcome(source, edit.out_dir, stats)
