"""Typed schema of a run's configuration: one frozen dataclass per section, each field with its help.

Core sections take their defaults from the packaged `configs/base.yaml`; the option classes of each
adapter kind and gradient-rule kind carry their own defaults, since the kind is chosen at run time, and are
registered by kind (`config/registry.py`). Field metadata holds the one-line help and the ranges (`min`, `max`,
`gt`, `lt`) that validation enforces; a `check(config)` method beside a section's fields holds its checks that
ranges cannot say (including those on other sections that the kind needs). `docs/config.md` and the README's key
tables are generated from this file (`python -m loralab.config.reference --write`).
"""

# ruff: noqa: RUF009 - option() and required() return dataclass fields (a factory for a mutable default)

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from loralab.config.registry import adapter_options, rule_options
from loralab.errors import ConfigError


def option(default: Any = None, help: str = "", **limits: float) -> Any:
    """A dataclass field with a default, its one-line help and numeric limits (min, max, gt, lt) to validate.

    A list, a mapping or a dataclass type as default becomes a factory, so no two configs share one object.
    """
    metadata = {"help": help, **limits}
    if isinstance(default, type) and dataclasses.is_dataclass(default):
        return field(default_factory=default, metadata=metadata)
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


bounded = option  # the earlier name of `option`, for numeric fields


def required(help: str = "", **limits: float) -> Any:
    """A field with no default (given by base.yaml), its one-line help and numeric limits checked by validation."""
    return field(metadata={"help": help, **limits})


# ---- adapter options (method.adapter) -------------------------------------------------------------


@adapter_options
@dataclass(frozen=True)
class LoraOptions:
    """PEFT LoRA: h = W0 x + (alpha/r) B A x on the target modules (docs/methods/lora.md)."""

    kind: Literal["lora"] = option("lora", help="PEFT LoRA (docs/methods/lora.md)")
    r: int = option(8, help="rank of A (r×d_in) and B (d_out×r)", min=1)
    alpha: float = option(
        16.0, help="scaling numerator: the update is (alpha/r)·B A, or alpha/√r with use_rslora", gt=0
    )
    dropout: float = option(0.05, help="dropout on the adapter's input x (PEFT lora_dropout)", min=0, lt=1)
    target_modules: str | list[str] = option(
        "standard",
        help="module names (a list), a regex string, or a preset resolved per architecture: standard (PEFT's "
        "per-architecture default, q and v for Llama and BERT) · extended (q, k, v and the attention output) · "
        "attention-ffn (every linear layer inside the numbered blocks, no head or pooler) · all-linear",
    )
    use_rslora: bool = option(False, help="rank-stabilised scaling alpha/√r instead of alpha/r (Kalajdzievski 2023)")
    use_dora: bool = option(False, help="DoRA: a trained magnitude per output times the normalised W0 + B A (Liu 2024)")
    init_lora_weights: bool | str = option(
        True,
        help="as PEFT: true (A Kaiming-uniform, B = 0) · false (both random; the model moves at init) · gaussian · "
        "pissa · olora · …",
    )
    layers_to_transform: list[int] | None = option(None, help="only these block indices; null: every block")
    bias: Literal["none", "all", "lora_only"] = option(
        "none", help="which biases train as well: none · all · lora_only (those of the adapted modules)"
    )


@adapter_options
@dataclass(frozen=True)
class FullOptions:
    """Full fine-tuning: every parameter trains."""

    kind: Literal["full"] = option("full", help="full fine-tuning: every parameter trains")

    def check(self, config: RunConfig) -> None:
        """A 4-bit base cannot train."""
        refuse_quantized(self.kind, config)


@adapter_options
@dataclass(frozen=True)
class BitfitOptions:
    """BitFit: only bias terms train (LayerNorm weights too when `train_layernorm`)."""

    kind: Literal["bitfit"] = option("bitfit", help="BitFit: the bias terms and the task head train")
    train_layernorm: bool = option(False, help="also train the LayerNorm / RMSNorm weights")

    def check(self, config: RunConfig) -> None:
        """A 4-bit base cannot train."""
        refuse_quantized(self.kind, config)


def refuse_quantized(kind: str, config: RunConfig) -> None:
    """Adapters that train base weights cannot run on a 4-bit quantized base."""
    if config.model.quantization == "nf4":
        raise ConfigError(f"method.adapter.kind={kind} cannot train a 4-bit quantized base (model.quantization=nf4)")


@adapter_options
@dataclass(frozen=True)
class PeftOptions:
    """Any PEFT method by its config class's type name (e.g. IA3, LOHA, VERA) and keyword arguments."""

    kind: Literal["peft"] = option("peft", help="any PEFT method by its config type name")
    peft_type: str = option("IA3", help="a PEFT config type name, case-insensitive: IA3, LOHA, LOKR, VERA, …")
    kwargs: dict[str, Any] = option({}, help="keyword arguments of that PEFT config class (target_modules, r, …)")


@adapter_options
@dataclass(frozen=True)
class DualRankOptions:
    """One PEFT LoRA of rank R whose first r components are the core and the rest the extension."""

    kind: Literal["dual_rank_lora"] = option(
        "dual_rank_lora", help="one PEFT LoRA of rank R: components 0..r-1 the core, r..R-1 the extension"
    )
    r: int = option(8, help="core rank (the rank `export --view core` writes)", min=1)
    R: int = option(32, help="full rank, larger than r", min=2)
    alpha: float = option(16.0, help="scaling numerator s = alpha/r, alpha/R or alpha/√R (see scaling)", gt=0)
    dropout: float = option(0.1, help="dropout on the adapter's input (PEFT lora_dropout)", min=0, lt=1)
    target_modules: str | list[str] = option(
        "all-linear", help="as method.adapter.target_modules of lora: a list, a regex or a preset"
    )
    scaling: Literal["core", "full", "rslora"] = option(
        "core", help="s = alpha/r (core, the Shake-to-Align scaffold's) · alpha/R (full) · alpha/√R (rslora)"
    )
    hi_init_std: float = option(
        0.02,
        help="std of the extension rows of A at init (the core rows are PEFT's; B = 0, so the output starts as W0)",
        min=0,
    )

    def check(self, config: RunConfig) -> None:
        """The extension must not be empty."""
        if self.r >= self.R:
            raise ConfigError(f"method.adapter.R ({self.R}) must be larger than method.adapter.r ({self.r})")


@adapter_options
@dataclass(frozen=True)
class TrajectoryLoraOptions:
    """LoRA-Diffusion: per-phase banks of FiLM-conditioned low-rank modules that perturb hidden states."""

    kind: Literal["trajectory_lora"] = option(
        "trajectory_lora", help="LoRA-Diffusion's trajectory LoRA (model.kind=masked_diffusion only)"
    )
    ranks: list[int] = option([64, 32, 8], help="rank of the modules of the early, mid and late phase (3 values ≥ 1)")
    scales: list[float] = option([1.0, 0.5, 0.25], help="σ_p, the scale of each phase's sum (3 values ≥ 0)")
    modules_per_phase: int = option(2, help="modules g_i(h, c) in each phase's bank", min=1)
    cond_dim: int = option(256, help="width of the prompt code c after its trainable projection", min=1)
    apply_to: Literal["final", "every_layer"] = option(
        "final", help="add δ to the last hidden state (final) or to every encoder layer's output (every_layer)"
    )
    cond_norm: Literal["none", "standardize"] = option(
        "none",
        help="standardize: the pooled prompt code standardised per feature before its projection (batch statistics "
        "in training, running ones in sampling; an option beyond the paper)",
    )
    lambda_rank: float = option(0.01, help="weight of Σ(‖W_down‖² + ‖W_up‖²) in the loss", min=0)
    lambda_orth: float = option(0.001, help="weight of Σ_{i<j} ‖W_down,i W_down,jᵀ‖² in the loss", min=0)

    def check(self, config: RunConfig) -> None:
        """It lives on a masked diffusion LM, with one rank and one scale per phase."""
        if config.model.kind != "masked_diffusion":
            raise ConfigError("method.adapter.kind=trajectory_lora needs model.kind=masked_diffusion")
        for key in ("ranks", "scales"):
            if len(getattr(self, key)) != 3:
                raise ConfigError(f"method.adapter.{key} needs 3 values (early, mid, late phase)")
        if min(self.ranks) < 1 or min(self.scales) < 0:
            raise ConfigError("method.adapter.ranks must be ≥ 1 and method.adapter.scales ≥ 0")


@adapter_options
@dataclass(frozen=True)
class HoulsbyOptions:
    """Houlsby bottleneck adapters after every attention and FFN output projection (identity at init)."""

    kind: Literal["houlsby"] = option("houlsby", help="Houlsby bottleneck adapters (identity at init)")
    bottleneck: int = option(64, help="width of the down-projection", min=1)
    init_std: float = option(1e-3, help="std of the down-projection at init; the up-projection starts at zero", min=0)


@adapter_options
@dataclass(frozen=True)
class PrefixOptions:
    """Prefix tuning: trainable key/value prefixes in every attention layer, MLP-reparameterised in training."""

    kind: Literal["prefix"] = option(
        "prefix", help="prefix tuning: trained key/value prefixes in every attention layer"
    )
    num_virtual_tokens: int = option(32, help="prefix positions per attention layer", min=1)
    projection: bool = option(
        True, help="train the prefixes through an MLP reparameterisation (saved as fixed prefixes)"
    )
    projection_hidden: int | None = option(None, help="hidden width of that MLP; null: the model's hidden size", min=1)

    def check(self, config: RunConfig) -> None:
        """Its prefixes need a padding mask, which packed rows do not have."""
        if config.task.packing:
            raise ConfigError(
                "task.packing cannot run with method.adapter.kind=prefix (its prefixes need a padding mask)"
            )


# ---- gradient-rule options (method.gradient) ------------------------------------------------------


@rule_options
@dataclass(frozen=True)
class NoRuleOptions:
    """No gradient rule: plain backward, clip, step."""

    kind: Literal["none"] = option("none", help="no gradient rule: backward, clip, step")


@dataclass(frozen=True)
class HistoryOptions:
    """Smoothing of the C2 statistics over steps: a weighted window (enabled) or an EMA over `ema_H` steps."""

    enabled: bool = option(True, help="smooth over a window of recent steps; false: an EMA over ema_H steps")
    window_steps: int = option(4, help="steps in the window", min=1)
    weighting: Literal["exp", "uniform", "linear"] = option(
        "exp", help="weights of the window's steps, newest heaviest: exp (exp_beta^age) · uniform · linear"
    )
    exp_beta: float = option(0.7, help="decay per step of age with weighting=exp", min=0, lt=1)


@dataclass(frozen=True)
class TriggerOptions:
    """Which blocks get corrected: the worst by percentile of a metric, or those past a threshold."""

    mode: Literal["percentile", "threshold"] = option(
        "percentile", help="percentile: the worst blocks by percentile_p · threshold: every block past threshold"
    )
    metric: Literal["C_r", "C_R", "A_b", "misalign"] = option(
        "C_R",
        help="the smoothed statistic that ranks blocks: C_r (core vote consistency) · C_R (full) · A_b (core share "
        "of the consensus) · misalign (1 − A_b); low is bad, misalign high is bad",
    )
    percentile_p: float = option(
        90.0, help="mode=percentile: blocks at or past this percentile of badness", min=0, max=100
    )
    threshold: float = option(0.30, help="mode=threshold: blocks with metric ≤ threshold (misalign: ≥) trigger")


@dataclass(frozen=True)
class CorrectionOptions:
    """What a triggered block's correction does."""

    mode: Literal["both", "direction_only", "none"] = option(
        "both",
        help="both: magnitude (alpha) then direction and blend · direction_only: no magnitude step · none: "
        "statistics only, gradients untouched",
    )


@dataclass(frozen=True)
class DebugOptions:
    """Per-block diagnostics of Shake-to-Align."""

    every_steps: int = option(10, help="per-block rows into shake_align.csv every N steps; 0 = never", min=0)


@rule_options
@dataclass(frozen=True)
class ShakeAlignOptions:
    """Gradient Shake-to-Align: vote statistics per block, then in-place correction of triggered blocks."""

    kind: Literal["shake_align"] = option(
        "shake_align", help="Gradient Shake-to-Align on a dual_rank_lora adapter (docs/methods/shake_align.md)"
    )
    route: Literal["vectorized", "microbatch"] = option(
        "vectorized",
        help="vectorized: one forward/backward, hooks split the LoRA gradients per window · microbatch: one "
        "backward per window",
    )
    samples_per_vote: int = option(8, help="examples per vote window; must be smaller than train.batch_size", min=1)
    allow_tail: bool = option(True, help="keep a short last window; false merges it into the one before")
    combine_votes: bool = option(False, help="add votes that sum combine_size single votes")
    combine_size: int = option(2, help="single votes per combined vote", min=2)
    combine_max: int = option(0, help="at most this many combined votes; 0 = all combinations", min=0)
    keep_single_votes: bool = option(True, help="keep the single votes (false needs combine_votes=true)")
    history: HistoryOptions = option(HistoryOptions, help="smoothing of the statistics over steps")
    ema_H: int = option(4, help="EMA span in steps (alpha = 2/(H+1)) when history.enabled is false", min=1)
    trigger: TriggerOptions = option(TriggerOptions, help="which blocks are corrected")
    k: float = option(
        8.0, help="gate sharpness: w_insuf = sigmoid(k (C_R − C_r)), w_over = sigmoid(−k (C_R − C_r))", min=0
    )
    lambda_n: float = option(0.4, help="magnitude shrink per unit of noise w_noise = 1 − max(C_r, C_R)", min=0)
    lambda_o: float = option(0.4, help="extra magnitude shrink of the extension per unit of w_over", min=0)
    alpha_min: float = option(0.1, help="floor of the magnitude factors alpha_r, alpha_hi", min=0, max=1)
    gamma_r: float = option(0.3, help="pull of the core toward its consensus per unit of w_insuf", min=0)
    gamma_hi: float = option(0.3, help="pull of the extension toward its consensus per unit of w_over", min=0)
    beta_max: float = option(0.5, help="cap of the pulls beta_r, beta_hi", min=0, max=1)
    eta: float = option(0.2, help="joint-blend strength per unit of w_noise", min=0)
    rho_max: float = option(0.5, help="cap of the joint-blend weight rho", min=0, max=1)
    agree_tau: float = option(
        1.0,
        help="extension consensus keeps coordinates whose weighted sign agreement |Σ w_k sign(v_k)| ≥ tau",
        min=0,
        max=1,
    )
    correction: CorrectionOptions = option(CorrectionOptions, help="what the correction of a triggered block does")
    compat: Literal["fixed", "upstream"] = option(
        "fixed",
        help="fixed: loralab's · upstream: the published scaffold's Σ_k v_k gradient (task head too, one backward "
        "per window), additive 1e-8 guards, g_r tiled into g_hi, unit-norm blend (docs/methods/shake_align.md)",
    )
    debug: DebugOptions = option(DebugOptions, help="per-block diagnostics")

    def check(self, config: RunConfig) -> None:
        """A dual-rank adapter, whole examples per window, several votes per step and unscaled gradients."""
        adapter, train = config.method.adapter, config.train
        if config.task.packing:
            raise ConfigError(
                "task.packing cannot run with method.gradient.kind=shake_align: its votes need whole examples per "
                "window, and a packed row holds several; use task.group_by_length=true instead"
            )
        if train.compile and self.route == "vectorized":
            raise ConfigError(
                "train.compile cannot run with method.gradient.route=vectorized: its vote probes hook activations "
                "inside the compiled graph; use method.gradient.route=microbatch"
            )
        if adapter.kind != "dual_rank_lora":
            raise ConfigError(
                f"method.gradient.kind=shake_align needs method.adapter.kind=dual_rank_lora, not {adapter.kind}"
            )
        if self.samples_per_vote >= train.batch_size:
            raise ConfigError(
                f"method.gradient.samples_per_vote ({self.samples_per_vote}) must be smaller than train.batch_size "
                f"({train.batch_size}): one vote per step gives no statistics"
            )
        if not (self.keep_single_votes or self.combine_votes):
            raise ConfigError("method.gradient: keep_single_votes=false needs combine_votes=true (no votes otherwise)")
        if train.mixed_precision == "fp16":
            raise ConfigError(
                "method.gradient.kind=shake_align cannot run with train.mixed_precision=fp16 (loss scaling would "
                "scale the votes); use bf16"
            )
        if self.route == "vectorized" and config.model.gradient_checkpointing:
            raise ConfigError(
                "method.gradient.route=vectorized cannot capture votes under model.gradient_checkpointing; "
                "use route=microbatch"
            )


@rule_options
@dataclass(frozen=True)
class GritOptions:
    """GRIT: rank-space K-FAC natural gradient, Fisher-guided reprojection, dynamic rank (published defaults)."""

    kind: Literal["grit"] = option(
        "grit", help="GRIT on a lora or dual_rank_lora adapter, the paper's published defaults (docs/methods/grit.md)"
    )
    cov_update_freq: int = option(15, help="record Σ_a, Σ_g on one backward in N (which: record_phase)", min=1)
    record_phase: Literal["first", "last"] = option(
        "first",
        help="first: record on backwards 0, N, 2N, … (the first backward counts) · last: N−1, 2N−1, … as the "
        "published hook",
    )
    cov_ema: float | None = option(
        None,
        help="null: cumulative token-weighted mean of the covariances · β in (0, 1): an EMA keeping β of the old value",
        gt=0,
        lt=1,
    )
    count_padding: bool = option(False, help="let padding tokens enter the covariances")
    kfac_update_freq: int = option(50, help="re-invert the damped factors every N optimizer steps", min=1)
    kfac_min_samples: int = option(
        64, help="tokens both covariances of a module need before it is preconditioned or reprojected", min=1
    )
    kfac_damping: float = option(1e-3, help="Tikhonov damping λ added to Σ_a and Σ_g before inversion", gt=0)
    kfac_inversion_device: Literal["cpu", "device"] = option(
        "cpu", help="where the inverses are computed: cpu · device (they live on the training device either way)"
    )
    pairing: Literal["grit", "kfac"] = option(
        "grit", help="grit: ∇A ← Σ_a⁻¹ ∇A, ∇B ← ∇B Σ_g⁻¹ · kfac: the factors swapped"
    )
    ng_warmup_steps: int = option(0, help="optimizer steps before preconditioning starts", min=0)
    clip_order: Literal["after", "before"] = option(
        "after",
        help="after: precondition → clip → step · before: clip → precondition → step (the published integration)",
    )
    reprojection_freq: int = option(50, help="reproject A and B onto the top eigenvectors every N steps", min=1)
    reprojection_k: int = option(8, help="eigenvectors kept per factor (before rank adaptation)", min=1)
    reprojection_warmup_steps: int = option(0, help="steps before the first reprojection", min=0)
    use_two_sided_reprojection: bool = option(
        True, help="project both A (on Σ_a's basis) and B (on Σ_g's); false: A only"
    )
    enable_rank_adaptation: bool = option(True, help="choose k per module by the energy threshold below")
    rank_adaptation_threshold: float = option(
        0.99, help="keep the fewest eigenvectors holding this share of the spectrum's energy", gt=0, max=1
    )
    min_lora_rank: int = option(4, help="rank adaptation never keeps fewer directions", min=1)
    rank_adaptation_start_step: int = option(0, help="steps before rank adaptation starts", min=0)
    reproject_optimizer_state: bool = option(True, help="project Adam's moments with the parameters at reprojection")
    lambda_kfac: float = option(
        1e-5, help="weight of the Fisher-weighted penalty on A and B (through Σ_a, Σ_g) added to the loss", min=0
    )
    lambda_reproj: float = option(
        1e-4, help="weight of the penalty on the parts of A and B outside the reprojection bases", min=0
    )
    regularizer_warmup_steps: int = option(
        0, help="linear ramp (step/warmup) of both regularisers; 0 = full at once", min=0
    )
    adaptive: bool = option(
        True, help="adapt the K-FAC and reprojection periods to the loss history (1.5× while it improves, else 0.75×)"
    )
    adaptive_damping: bool = option(
        True,
        help="with adaptive: damping + the loss history's sample std (more than 10 losses), clamped to [1e-6, 1e-2]",
    )
    log_top_eigs: int = option(8, help="top eigenvalues of Σ_a, Σ_g per module written to grit.csv", min=0)
    export_compressed: bool = option(False, help="also write the adapter at each module's adapted rank at the end")

    def check(self, config: RunConfig) -> None:
        """LoRA factors to precondition, hooks outside a compiled graph and gradients that are not loss-scaled."""
        adapter = config.method.adapter
        if config.train.compile:
            raise ConfigError(
                "train.compile cannot run with method.gradient.kind=grit: its forward hooks record Σ_a inside the "
                "compiled graph, and torch.compile gets them wrong; set train.compile=false"
            )
        if adapter.kind not in ("lora", "dual_rank_lora"):
            raise ConfigError(
                f"method.gradient.kind=grit needs a LoRA-like adapter (method.adapter.kind=lora or dual_rank_lora), "
                f"not {adapter.kind}"
            )
        if config.train.mixed_precision == "fp16":
            raise ConfigError(
                "method.gradient.kind=grit cannot run with train.mixed_precision=fp16 (loss scaling would scale Σ_g); "
                "use bf16"
            )


# ---- core sections --------------------------------------------------------------------------------


TASK_FORMATS = ("classification", "regression", "sft", "chat", "text")


@dataclass(frozen=True)
class SplitsConfig:
    """Which split of the source trains and which evaluates; eval null holds out the end of train."""

    train: str = option("train", help="the split that trains")
    eval: str | None = option(
        "validation", help="the split that evaluates; null: the last 10 % of train (at most 500 rows) is held out"
    )


@dataclass(frozen=True)
class TaskConfig:
    """A task as data: a built-in name (its packaged definition fills the rest), or any name with `format` set.

    Every key the user sets overrides the packaged definition; see docs/data.md for each format's columns.
    """

    name: str = required(help="a built-in task (configs/tasks/, e.g. glue/sst2, gsm8k), or any name with format set")
    path: str | None = required(
        help="a file, a glob or a directory of json/jsonl/csv/tsv/parquet files; null: the hub or a generator"
    )
    max_length: int = required(
        help="tokens per example (per packed row with packing); longer ones are truncated", min=8
    )
    train_samples: int | None = required(
        help="the first N training examples; null: all (synthetic tasks generate 2000/500, arithmetic 2000/200)", min=1
    )
    eval_samples: int | None = required(help="the first N evaluation examples; null: all", min=1)
    format: Literal["classification", "regression", "sft", "chat", "text"] | None = option(
        None, help="classification · regression · sft · chat · text; null: the built-in task's"
    )
    hub: str | None = option(None, help="a hub dataset id (read with datasets.load_dataset)")
    subset: str | None = option(None, help="the hub dataset's configuration name")
    splits: SplitsConfig = option(SplitsConfig, help="which split trains and which evaluates")
    columns: dict[str, str | None] | None = option(
        None, help="role → column name (docs/data.md); null: the format's default column names"
    )
    roles: dict[str, str] | None = option(
        None, help="chat: loralab role (system/user/assistant) → the data's role name"
    )
    keys: dict[str, str] | None = option(
        None, help="chat: {role: <key of a message's role>, content: <key of its text>}"
    )
    label_names: list[str | int] | None = option(
        None, help="classification: the labels in class order; null: the sorted distinct labels"
    )
    metrics: list[str] | None = option(None, help="metric names to report; null: the format's defaults")
    template: str | None = option(
        None, help="sft prompt: alpaca · plain · chat · gsm8k · squad · xsum, or a string with '{prompt}'"
    )
    chat_template: str | None = option(
        None, help="chat: a Jinja template string or file; null: the tokenizer's own (else loralab's default)"
    )
    truncation: Literal["right", "left", "error"] = option(
        "right", help="right keeps the start, left keeps the end, error refuses an example longer than max_length"
    )
    packing: bool = option(
        False, help="sft/chat/text on a causal LM: concatenate examples into rows of max_length tokens"
    )
    group_by_length: bool = option(
        False, help="batches of similar length (seeded order), the cheap alternative to packing"
    )


@dataclass(frozen=True)
class ModelConfig:
    """The base model and how it is loaded."""

    name: str = required(
        help="a preset (minilm, tiny-llama, tiny-gpt2, tiny-bert, tiny-roberta), a local directory or a hub id"
    )
    kind: Literal["auto", "seq_cls", "causal_lm", "masked_diffusion"] = required(
        help="auto follows the task's format · seq_cls (a classification/regression head) · causal_lm · "
        "masked_diffusion (an AutoModelForMaskedLM as a masked diffusion LM)"
    )
    dtype: Literal["float32", "bfloat16", "float16"] = required(help="dtype of the base weights")
    quantization: Literal["none", "nf4"] = required(help="none · nf4 (a 4-bit QLoRA base; CUDA only)")
    gradient_checkpointing: bool = required(help="recompute activations in backward to save memory")
    trust_remote_code: bool = required(help="let transformers run the checkpoint's own model code")
    dropout: float | None = required(
        help="overrides every dropout probability in the model's config; null keeps the checkpoint's", min=0, max=1
    )


@dataclass(frozen=True)
class MethodConfig:
    """A method: a preset that fills the adapter and the gradient rule, each chosen by its `kind`."""

    name: str = required(
        help="a preset in configs/methods/ that fills adapter and gradient; a change of kind drops the other "
        "kind's keys"
    )
    adapter: Any = required(help="what trains and how it is inserted, chosen by method.adapter.kind")
    gradient: Any = required(help="what happens between backward and the optimizer step, by method.gradient.kind")


@dataclass(frozen=True)
class DiffusionConfig:
    """The masked diffusion LM (model.kind=masked_diffusion): forward process, loss weight, sampler."""

    schedule: Literal["loglinear", "cosine", "linear"] = required(
        help="mask rate 1 − α_t: loglinear eps + (1 − eps) t · cosine 1 − cos(πt/2) · linear 1 − exp(−σ(t))"
    )
    loss_weight: Literal["elbo", "uniform"] = required(
        help="elbo: −α'_t/(1 − α_t) (about 1/t for loglinear) · uniform: 1"
    )
    time_conditioning: Literal["none", "add"] = required(
        help="none (the mask ratio tells the noise level) · add (an embedding of t added to the inputs)"
    )
    eps: float = required(help="t ~ U[eps, 1], drawn antithetically across the batch", gt=0, lt=1)
    sigma_min: float = required(help="linear schedule: σ(t) = sigma_min + t (sigma_max − sigma_min)", gt=0)
    sigma_max: float = required(help="linear schedule: σ at t = 1; larger than sigma_min", gt=0)
    response_length: int = required(
        help="response slot: the target tokens, then EOS padding (trained, so length is learned)", min=1
    )
    steps: int = required(help="sampler steps T (t from 1 to 0); a multiple of the number of blocks", min=1)
    temperature: float = required(help="0 = greedy; > 0 samples with float64 Gumbel noise", min=0)
    block_length: int | None = required(
        help="semi-autoregressive blocks of the response; must divide response_length; null = one block", min=1
    )

    def check(self, config: RunConfig) -> None:
        """A masked diffusion run: no packing, no gradient rule, and sampler blocks that tile the response slot."""
        if config.model.kind != "masked_diffusion":
            return
        if config.task.packing:
            raise ConfigError("task.packing covers causal LMs; model.kind=masked_diffusion pads its response slots")
        if config.method.gradient.kind != "none":
            raise ConfigError(
                f"method.gradient.kind={config.method.gradient.kind} is not supported with model.kind=masked_diffusion "
                "(its statistics assume a per-token task loss); use method.gradient.kind=none"
            )
        if self.sigma_max <= self.sigma_min:
            raise ConfigError("diffusion.sigma_max must be larger than diffusion.sigma_min")
        block = self.block_length
        if block is not None and self.response_length % block:
            raise ConfigError(
                f"diffusion.block_length ({block}) must divide diffusion.response_length ({self.response_length})"
            )
        blocks = self.response_length // (block or self.response_length)
        if self.steps % blocks:
            raise ConfigError(f"diffusion.steps ({self.steps}) must be a multiple of the number of blocks ({blocks})")


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation: AdamW with a warmup schedule, clipping, accumulation, evaluation and checkpoint cadence."""

    epochs: float = required(help="passes over the training set (fractions allowed)", gt=0)
    max_steps: int | None = required(help="stop after N optimizer steps (wins over epochs); null: epochs decide", min=1)
    batch_size: int = required(help="examples per optimizer step, split into grad_accum micro-batches", min=1)
    lr: float = required(help="peak learning rate of AdamW", gt=0)
    weight_decay: float = required(help="AdamW weight decay (never on biases and norms)", min=0)
    warmup_ratio: float = required(help="share of the steps with a linear warmup from 0", min=0, max=1)
    scheduler: Literal["linear", "cosine", "constant"] = required(help="learning-rate decay after the warmup")
    grad_accum: int = required(help="micro-batches per optimizer step; must divide batch_size", min=1)
    max_grad_norm: float | None = required(help="clip the global gradient norm to this; null = no clipping", gt=0)
    mixed_precision: Literal["no", "bf16", "fp16"] = required(
        help="autocast of the forward: no · bf16 · fp16 (loss-scaled); needs model.dtype=float32"
    )
    eval_every: int | None = required(
        help="evaluate every N steps as well as at the end; null: never in between", min=1
    )
    eval_each_epoch: bool = required(help="evaluate at the end of every epoch")
    checkpoint_every: int | None = required(
        help="checkpoint every N steps (always at the end); null: at the end", min=1
    )
    keep_last: int = required(help="checkpoints kept in the run directory", min=1)
    max_bad_steps: int = required(help="abort after this many non-finite losses", min=0)
    deterministic: bool = required(help="torch deterministic algorithms (slower, bit-reproducible on one device)")
    compile: bool = option(
        False,
        help="torch.compile the model for the training forwards (docs/gpu.md; refused with grit and route vectorized)",
    )

    def check(self, config: RunConfig) -> None:
        """Micro-batches tile the batch; autocast needs float32 weights."""
        if self.batch_size % self.grad_accum:
            raise ConfigError(
                f"train.batch_size ({self.batch_size}) must be a multiple of train.grad_accum ({self.grad_accum})"
            )
        if self.mixed_precision != "no" and config.model.dtype != "float32":
            raise ConfigError(f"train.mixed_precision={self.mixed_precision} needs model.dtype=float32 weights")


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation during training and in `loralab eval` (GSM8K-style keys: profile, fewshot, backend)."""

    views: list[Literal["full", "core"]] = required(
        help="adapter views evaluated: [full], or [core, full] for a dual_rank_lora adapter (core/<metric>, "
        "full/<metric>)"
    )
    max_samples: int | None = required(help="evaluate the first N examples; null: all", min=1)
    batch_size: int = required(help="examples per evaluation batch", min=1)
    backend: Literal["hf", "vllm"] = required(
        help="generation: hf (transformers generate) · vllm (loralab eval / edit --eval only; the gpu extra)"
    )
    max_new_tokens: int = required(
        help="generated tokens in training-time evaluation; GSM8K in loralab eval uses the profile's (256 / 512)", min=1
    )
    profile: Literal["lm-eval", "paper_math"] = required(
        help="GSM8K-style tasks: lm-eval (strict_match, flexible_extract) · paper_math (accuracy)"
    )
    fewshot: int | None = required(
        help="GSM8K shots in loralab eval / edit --eval (null: the profile's, 5); training evaluates zero-shot", min=0
    )

    def check(self, config: RunConfig) -> None:
        """The core view exists only on a dual-rank adapter."""
        if "core" in self.views and config.method.adapter.kind != "dual_rank_lora":
            raise ConfigError(
                f"eval.views=core needs method.adapter.kind=dual_rank_lora, not {config.method.adapter.kind}"
            )


@dataclass(frozen=True)
class IOConfig:
    """Where runs go and what happens when the run directory exists."""

    root: str = required(help="directory under which run directories are created")
    overwrite: Literal["error", "resume", "skip", "force", "ask"] = required(
        help="an existing run directory: error · resume (from its last checkpoint) · skip · force (replace) · ask"
    )


@dataclass(frozen=True)
class WandbConfig:
    """Weights & Biases (`log.trackers: [wandb]`): offline files in the run directory, or online to a project."""

    project: str | None = option(None, help="null: wandb's default (WANDB_PROJECT, else its own)")
    entity: str | None = option(None, help="null: the logged-in account's default entity")
    mode: Literal["offline", "online"] = option(
        "offline", help="offline (files in the run directory; wandb sync uploads them) · online (logs live)"
    )


@dataclass(frozen=True)
class LogConfig:
    """Metrics files and trackers; parameters are the resolved config's dotted keys."""

    csv: bool = required(help="write metrics.csv in the run directory")
    trackers: list[Literal["tensorboard", "wandb", "swanlab", "mlflow"]] = required(
        help="tensorboard · wandb · swanlab · mlflow, all writing inside the run directory by default; fail-open: "
        "one that fails is reported once and dropped"
    )
    every: int = required(help="log training metrics every N optimizer steps", min=1)
    wandb: WandbConfig = option(WandbConfig, help="the wandb tracker's settings")


@dataclass(frozen=True)
class LrGridConfig:
    """A log grid of learning rates: `points` values 10^e for e evenly spaced in [min_exp, max_exp]."""

    min_exp: float = required(help="exponent of the smallest learning rate")
    max_exp: float = required(help="exponent of the largest learning rate")
    points: int = required(help="learning rates in the grid", min=1)


@dataclass(frozen=True)
class HierarchicalConfig:
    """hpo.mode=hierarchical: the baseline's lr first, then the method's knobs near it (the Shake-to-Align
    scaffold's tuning protocol)."""

    baseline_method: str = required(help="method preset whose learning rate is tuned first")
    method: str = required(help="method preset whose knobs are tuned near the best baseline lr")
    knobs: dict[str, Any] | None = required(
        help="dotted key → candidates; null: method.gradient.{lambda_n, lambda_o, eta, k, gamma_hi}, 4 each"
    )
    lr_grid: LrGridConfig = required(help="the log grid of learning rates")
    warmup_grid: list[float] = required(help="warmup ratios tried")
    epochs: list[float] = required(help="epochs of stages s1, s2, s3 (with train.max_steps set: multiples of it)")
    score_weights: list[float] = required(help="s3 score: weights of the eval curve's best, final and mean value")
    baseline_lr_points: int = required(help="evenly chosen grid points the baseline stage tries", min=1)
    lr_neighbor_points: int = required(
        help="grid points around the best baseline lr that the method's stages try (clipped at the ends)", min=1
    )
    keep_s1: int = required(help="s1 (one knob at a time): candidates kept per knob", min=1)
    combine_s2: int = required(help="s2 (product of the kept candidates): combinations kept for s3", min=1)
    seeds_s3: int = required(help="s3 seeds: seed, seed+1, …", min=1)


SHAKE_ALIGN_KNOBS: dict[str, list[float]] = {
    "method.gradient.lambda_n": [0.1, 0.2, 0.4, 0.8],
    "method.gradient.lambda_o": [0.1, 0.2, 0.4, 0.8],
    "method.gradient.eta": [0.05, 0.1, 0.2, 0.4],
    "method.gradient.k": [2.0, 4.0, 8.0, 16.0],
    "method.gradient.gamma_hi": [0.1, 0.3, 0.5, 1.0],
}


@dataclass(frozen=True)
class HpoConfig:
    """`loralab hpo`: an Optuna study over `space` (or the hierarchical stages); not part of the run hash."""

    mode: Literal["single", "hierarchical"] = required(
        help="single (one study over space) · hierarchical (the baseline's lr, then the method near it)"
    )
    sampler: Literal["grid", "tpe", "random"] = required(
        help="grid (every point once; every dimension a choice) · tpe · random"
    )
    pruner: Literal["none", "median", "hyperband"] = required(
        help="none · median · hyperband, fed each evaluation of a trial's first seed"
    )
    storage: str | None = required(
        help="null = sqlite:///<io.root>/hpo.db; any Optuna RDB URL; a *.log / *.jsonl path = a journal file"
    )
    study_name: str | None = required(help="null = <task>-<model>-<method>[-<schedule>]")
    schedule: str | None = required(
        help="null · preeval · final (configs/schedules/, applied over the --config files, under --set)"
    )
    metric: str | None = required(help="the trial's value; null = the task's first metric (e.g. accuracy)")
    direction: Literal["maximize", "minimize"] = required(help="whether the metric is maximised or minimised")
    space: dict[str, Any] = required(
        help="dotted key: {log_uniform: [lo, hi]} · {uniform: [lo, hi]} · {int: [lo, hi]} · {choice: [...]} · [...]"
    )
    seeds: list[int] | None = required(help="run seeds per trial (the value is their mean); null = the config's seed")
    source_study: str | None = required(help="the study top_k reads; null = this study's name under preeval")
    seed: int = required(help="sampler seed")
    hierarchical: HierarchicalConfig = required(help="hpo.mode=hierarchical: the Shake-to-Align scaffold's protocol")
    top_k: int = required(help="> 0: run the top-k configs of source_study instead of a search (schedule final)", min=0)
    n_trials: int | None = required(
        help="finished trials wanted (complete + pruned + failed by an error); null = the grid's size", min=1
    )
    timeout: float | None = required(help="seconds after which a worker starts no new trial; null: none", gt=0)
    startup_trials: int = required(help="median pruner: trials that complete before pruning starts", min=0)
    heartbeat_interval: int = required(help="seconds between a running trial's heartbeats", min=1)
    grace_period: int | None = required(
        help="seconds without a heartbeat before a trial is failed and retried; null = 2× heartbeat_interval", min=1
    )


@dataclass(frozen=True)
class RunConfig:
    """A whole run: the seeds and one dataclass per section."""

    seed: int = required(help="seed of the model's initialisation and of the run (names the seed directory)", min=0)
    data_seed: int | None = required(help="seed of the order of training batches; null = seed", min=0)
    task: TaskConfig = required(help="what data trains and evaluates (docs/data.md)")
    model: ModelConfig = required(help="the base model")
    method: MethodConfig = required(help="the adapter and the gradient rule")
    diffusion: DiffusionConfig = required(help="model.kind=masked_diffusion only (then part of the run hash)")
    train: TrainConfig = required(help="the optimisation")
    eval: EvalConfig = required(help="evaluation")
    io: IOConfig = required(help="where runs go")
    log: LogConfig = required(help="metrics and trackers")
    hpo: HpoConfig = required(help="loralab hpo (Optuna); not part of the run hash")

    @property
    def effective_data_seed(self) -> int:
        """The seed of the data order: `data_seed`, or `seed` when unset."""
        return self.seed if self.data_seed is None else self.data_seed
