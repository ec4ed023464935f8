"""`method.adapter.kind: prefix` — prefix tuning: trainable key/value prefixes in every self-attention layer.

How the prefix reaches attention: `apply` registers the attention function `loralab_prefix_<base>` (base = the
implementation the model used: sdpa or eager) with transformers' AttentionInterface and sets the model config's
`_attn_implementation` to it. Every self-attention module looks its function up by that name; when the module
carries a prefix link (layer index into the model's `loralab_prefix` PrefixEncoder), the function prepends the
layer's prefix keys and values (kv_heads × P × head_dim, expanded over the batch; the base functions repeat
kv heads for GQA themselves) to the keys and values — after RoPE and after any cache update, so prefixes are
never rotated nor cached — extends the mask over the P prefix columns (every query attends to every prefix) and
calls the base function (sdpa, or the model's own `eager_attention_forward`), dropout included.

Masks: transformers builds no mask at all for an implementation name missing from its AttentionMaskInterface,
so the same name is registered there with the base's mask function (sdpa: boolean or None; eager: additive
float). A 4-D mask (batch|1 × heads|1 × q × kv) gains P leading columns: True for boolean, 0 for additive.
No mask means full attention for an encoder (prefixes included, nothing to add); for a causal module with more
than one query it would mean SDPA's `is_causal` — wrong once keys outnumber queries — so an explicit causal
mask, aligned at the last key, is built first.

Parameters: P virtual-token embeddings (hidden wide) through an MLP (hidden → projection_hidden → tanh →
layers·2·kv_heads·head_dim) while training, as in the prefix-tuning paper; each layer computes only its slice
of the MLP's output layer. `projection: false` trains the prefix tensors directly. Saving writes the final
prefixes (the MLP's output, computed once) to `prefix.safetensors`; loading puts those fixed tensors back, with
no MLP. Not a PEFT adapter: PEFT's prefix tuning on BERT under transformers 5 feeds the prefixes as a cache, so
token positions start at P, and a bare masked LM has no task type of its own.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from loralab.adapters.base import LoraView, is_head_parameter
from loralab.adapters.houlsby import (
    copy_saved,
    family_of,
    positive_int,
    read_saved,
    train_only,
    trained_tensors,
    write_saved,
)
from loralab.errors import AdapterError, ConfigError

WEIGHTS = "prefix.safetensors"
ENCODER = "loralab_prefix"  # the PrefixEncoder's attribute on the model
LINK = "_loralab_prefix_link"  # (encoder, layer) in a self-attention module's __dict__, not a submodule
NAME = "loralab_prefix_"  # + base implementation
BASES = ("sdpa", "eager")

# Full names of the self-attention modules (those that call the attention interface) per family.
ATTENTION = {
    "bert": r"(.*\.)?layer\.\d+\.attention\.self",
    "roberta": r"(.*\.)?layer\.\d+\.attention\.self",
    "llama": r"(.*\.)?layers\.\d+\.self_attn",
    "gpt2": r"(.*\.)?h\.\d+\.attn",
}


class PrefixEncoder(nn.Module):
    """The prefixes of all layers: `layer(i)` gives layer i's keys and values, each kv_heads × P × head_dim."""

    def __init__(
        self,
        layers: int,
        kv_heads: int,
        head_dim: int,
        tokens: int,
        hidden: int,
        projection_hidden: int | None,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        self.shape = (layers, 2, kv_heads, tokens, head_dim)
        self.projection = projection_hidden is not None
        if self.projection:
            self.embedding = nn.Parameter(torch.randn(tokens, hidden))
            self.mlp_in = nn.Linear(hidden, projection_hidden)
            self.mlp_out = nn.Linear(projection_hidden, layers * 2 * kv_heads * head_dim)
        else:
            self.prefix = nn.Parameter(torch.randn(self.shape) * init_std)

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.projection:
            return self.prefix[index, 0], self.prefix[index, 1]
        _, _, kv_heads, tokens, head_dim = self.shape
        width = 2 * kv_heads * head_dim
        rows = slice(index * width, (index + 1) * width)
        hidden = torch.tanh(self.mlp_in(self.embedding))
        out = nn.functional.linear(hidden, self.mlp_out.weight[rows], self.mlp_out.bias[rows])
        keys, values = out.view(tokens, 2, kv_heads, head_dim).permute(1, 2, 0, 3)
        return keys, values

    def export(self) -> torch.Tensor:
        """All prefixes as one tensor, layers × 2 × kv_heads × P × head_dim (keys at [:, 0], values at [:, 1])."""
        with torch.no_grad():
            rows = [torch.stack(self.layer(i)) for i in range(self.shape[0])]
        return torch.stack(rows).contiguous().cpu()


class PrefixAdapter:
    """Prefix tuning of `num_virtual_tokens` keys/values per attention layer (MLP-reparameterised); head trains."""

    name = "prefix"

    def __init__(self, num_virtual_tokens: int = 32, projection: bool = True, projection_hidden: int | None = None):
        self.num_virtual_tokens = num_virtual_tokens
        self.projection = projection
        self.projection_hidden = projection_hidden

    def apply(self, model: nn.Module) -> nn.Module:
        modules = attention_modules(model)
        config = model.config
        base = base_implementation(config._attn_implementation)
        if not isinstance(getattr(model, ENCODER, None), PrefixEncoder):
            layers, kv_heads, head_dim, hidden = geometry(config, len(modules))
            width = (self.projection_hidden or hidden) if self.projection else None
            init_std = getattr(config, "initializer_range", 0.02)
            encoder = PrefixEncoder(layers, kv_heads, head_dim, self.num_virtual_tokens, hidden, width, init_std)
            setattr(model, ENCODER, encoder.to(next(model.parameters()).device))
        encoder = getattr(model, ENCODER)
        for index, module in enumerate(modules):
            module.__dict__[LINK] = (encoder, index)
            if module.config is not config:
                module.config._attn_implementation = NAME + base
        config._attn_implementation = NAME + base
        train_only(model, lambda name: name.startswith(ENCODER + ".") or is_head_parameter(name))
        return model

    def lora_modules(self, model: nn.Module) -> dict[str, LoraView]:
        return {}

    def save(self, model: nn.Module, directory: Path) -> None:
        encoder = getattr(model, ENCODER)
        tensors = {**trained_tensors(model, set()), f"{ENCODER}.prefix": encoder.export()}
        layers, _, kv_heads, tokens, head_dim = encoder.shape
        side = {"adapter": self.name, "num_virtual_tokens": tokens, "layers": layers, "kv_heads": kv_heads}
        write_saved(directory, WEIGHTS, tensors, {**side, "head_dim": head_dim, "trained_with_mlp": encoder.projection})

    def load(self, model: nn.Module, directory: Path) -> nn.Module:
        side, saved = read_saved(directory, self.name, WEIGHTS)
        path = Path(directory) / WEIGHTS
        tokens = positive_int(side, "num_virtual_tokens", directory)
        layers, kv_heads, head_dim, _ = geometry(model.config, len(attention_modules(model)))
        shape = (layers, 2, kv_heads, tokens, head_dim)
        saved_shape = tuple(saved.get(f"{ENCODER}.prefix", torch.empty(shape)).shape)
        if saved_shape != shape:
            raise AdapterError(f"{path}: prefixes of shape {saved_shape} do not fit this base model's {shape}")
        if isinstance(getattr(model, ENCODER, None), PrefixEncoder):
            delattr(model, ENCODER)  # the saved prefixes replace any encoder (and its MLP)
        PrefixAdapter(tokens, projection=False).apply(model)
        copy_saved(model, saved, path, expected={f"{ENCODER}.prefix"})
        return model


def attention_modules(model: nn.Module) -> list[nn.Module]:
    pattern = re.compile(ATTENTION[family_of(model, ATTENTION, "prefix adapters")])
    modules = [module for name, module in model.named_modules() if pattern.fullmatch(name)]
    if not modules:
        raise ConfigError(f"prefix adapters found no self-attention modules in {type(model).__name__}")
    return modules


def base_implementation(current: str | None) -> str:
    """The attention implementation beneath the prefix: the model's own, or the one a prefix already wraps."""
    base = (current or "eager").removeprefix(NAME)
    if base not in BASES:
        raise ConfigError(f"prefix adapters need model attention 'sdpa' or 'eager', not '{base}'")
    return base


def geometry(config, layers: int) -> tuple[int, int, int, int]:
    """Layers, key/value heads, head dimension and hidden size of a decoder or encoder config."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return layers, kv_heads, head_dim, config.hidden_size


# ---- the attention functions ----------------------------------------------------------------------------


def prefixed(base: str):
    """The attention function that prepends a module's prefix, then calls `base` (sdpa or the model's eager)."""

    def attention(module, query, key, value, attention_mask, **kwargs):
        function = base_function(module, base)
        link = module.__dict__.get(LINK)
        if link is None:
            return function(module, query, key, value, attention_mask, **kwargs)
        encoder, index = link
        prefix_keys, prefix_values = encoder.layer(index)
        batch = key.shape[0]
        causal = kwargs.get("is_causal")
        causal = getattr(module, "is_causal", False) if causal is None else causal
        attention_mask = extend_mask(attention_mask, query, key, prefix_keys.shape[1], causal, base)
        key = torch.cat([prefix_keys.to(key).expand(batch, -1, -1, -1), key], dim=2)
        value = torch.cat([prefix_values.to(value).expand(batch, -1, -1, -1), value], dim=2)
        return function(module, query, key, value, attention_mask, **kwargs)

    return attention


def base_function(module: nn.Module, base: str):
    if base == "sdpa":
        return ALL_ATTENTION_FUNCTIONS["sdpa"]
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise ConfigError(f"prefix adapters found no eager attention function for {type(module).__name__}")
    return eager


def extend_mask(
    mask: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor, tokens: int, causal: bool, base: str
) -> torch.Tensor | None:
    """The mask over [prefix; keys]: every query sees all `tokens` prefix positions, the keys as before."""
    q_length, kv_length = query.shape[2], key.shape[2]
    if mask is None:
        if not causal or q_length == 1:
            return None  # full attention, prefixes included
        positions = torch.arange(kv_length, device=key.device)
        last = torch.arange(q_length, device=key.device) + (kv_length - q_length)  # aligned at the last key
        mask = (positions[None, :] <= last[:, None])[None, None]
        if base == "eager":
            mask = torch.zeros(mask.shape, dtype=query.dtype, device=key.device).masked_fill(
                ~mask, torch.finfo(query.dtype).min
            )
    if mask.ndim != 4:
        raise ConfigError(f"prefix attention expects a 4-D attention mask, got {mask.ndim}-D")
    fill = torch.ones if mask.dtype == torch.bool else torch.zeros
    columns = fill((*mask.shape[:-1], tokens), dtype=mask.dtype, device=mask.device)
    return torch.cat([columns, mask], dim=-1)


for _base in BASES:
    AttentionInterface.register(NAME + _base, prefixed(_base))
    AttentionMaskInterface.register(NAME + _base, ALL_MASK_ATTENTION_FUNCTIONS[_base])
