"""Typed schema of a run's configuration: one frozen dataclass per section.

Core sections take their defaults from the packaged `configs/base.yaml`; the option classes of each
adapter kind and gradient-rule kind carry their own defaults, since the kind is chosen at run time.
Field metadata states ranges (`min`, `max`, `gt`) that validation enforces.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


def bounded(default: Any = None, help: str = "", **limits: float) -> Any:
    """A dataclass field with a default, its one-line help and numeric limits (min, max, gt, lt) to validate."""
    return field(default=default, metadata={"help": help, **limits})


def required(help: str = "", **limits: float) -> Any:
    """A field with no default (given by base.yaml), its one-line help and numeric limits checked by validation."""
    return field(metadata={"help": help, **limits})


# ---- adapter options (method.adapter) -------------------------------------------------------------


@dataclass(frozen=True)
class LoraOptions:
    """PEFT LoRA: rank, scaling, targets (list, regex or preset standard|extended|all-linear)."""

    kind: Literal["lora"] = "lora"
    r: int = bounded(8, min=1)
    alpha: float = bounded(16.0, gt=0)
    dropout: float = bounded(0.05, min=0, lt=1)
    target_modules: str | list[str] = "standard"
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: bool | str = True
    layers_to_transform: list[int] | None = None
    bias: Literal["none", "all", "lora_only"] = "none"


@dataclass(frozen=True)
class FullOptions:
    """Full fine-tuning: every parameter trains."""

    kind: Literal["full"] = "full"


@dataclass(frozen=True)
class BitfitOptions:
    """BitFit: only bias terms train (LayerNorm weights too when `train_layernorm`)."""

    kind: Literal["bitfit"] = "bitfit"
    train_layernorm: bool = False


@dataclass(frozen=True)
class PeftOptions:
    """Any PEFT method by its config class's type name (e.g. IA3, LOHA, VERA) and keyword arguments."""

    kind: Literal["peft"] = "peft"
    peft_type: str = "IA3"
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DualRankOptions:
    """One PEFT LoRA of rank R whose first r components are the core and the rest the extension."""

    kind: Literal["dual_rank_lora"] = "dual_rank_lora"
    r: int = bounded(8, min=1)
    R: int = bounded(32, min=2)
    alpha: float = bounded(16.0, gt=0)
    dropout: float = bounded(0.1, min=0, lt=1)
    target_modules: str | list[str] = "all-linear"
    scaling: Literal["core", "full", "rslora"] = "core"
    hi_init_std: float = bounded(0.02, min=0)


@dataclass(frozen=True)
class TrajectoryLoraOptions:
    """LoRA-Diffusion: per-phase banks of FiLM-conditioned low-rank modules that perturb hidden states."""

    kind: Literal["trajectory_lora"] = "trajectory_lora"
    ranks: list[int] = field(default_factory=lambda: [64, 32, 8])  # early, mid, late
    scales: list[float] = field(default_factory=lambda: [1.0, 0.5, 0.25])
    modules_per_phase: int = bounded(2, min=1)
    cond_dim: int = bounded(256, min=1)
    apply_to: Literal["final", "every_layer"] = "final"
    cond_norm: Literal["none", "standardize"] = "none"  # standardize: per-feature, before the projection
    lambda_rank: float = bounded(0.01, min=0)
    lambda_orth: float = bounded(0.001, min=0)


@dataclass(frozen=True)
class HoulsbyOptions:
    """Houlsby bottleneck adapters after every attention and FFN output projection (identity at init)."""

    kind: Literal["houlsby"] = "houlsby"
    bottleneck: int = bounded(64, min=1)
    init_std: float = bounded(1e-3, min=0)


@dataclass(frozen=True)
class PrefixOptions:
    """Prefix tuning: trainable key/value prefixes in every attention layer, MLP-reparameterised in training."""

    kind: Literal["prefix"] = "prefix"
    num_virtual_tokens: int = bounded(32, min=1)
    projection: bool = True
    projection_hidden: int | None = bounded(None, min=1)


ADAPTER_OPTIONS: dict[str, type] = {
    "lora": LoraOptions,
    "trajectory_lora": TrajectoryLoraOptions,
    "dual_rank_lora": DualRankOptions,
    "full": FullOptions,
    "bitfit": BitfitOptions,
    "peft": PeftOptions,
    "houlsby": HoulsbyOptions,
    "prefix": PrefixOptions,
}


# ---- gradient-rule options (method.gradient) ------------------------------------------------------


@dataclass(frozen=True)
class NoRuleOptions:
    """No gradient rule: plain backward, clip, step."""

    kind: Literal["none"] = "none"


@dataclass(frozen=True)
class HistoryOptions:
    """Smoothing of the C2 statistics over steps: a weighted window (enabled) or an EMA over `ema_H` steps."""

    enabled: bool = True
    window_steps: int = bounded(4, min=1)
    weighting: Literal["exp", "uniform", "linear"] = "exp"
    exp_beta: float = bounded(0.7, min=0, lt=1)


@dataclass(frozen=True)
class TriggerOptions:
    """Which blocks get corrected: the worst by percentile of a metric, or those past a threshold."""

    mode: Literal["percentile", "threshold"] = "percentile"
    metric: Literal["C_r", "C_R", "A_b", "misalign"] = "C_R"
    percentile_p: float = bounded(90.0, min=0, max=100)
    threshold: float = 0.30


@dataclass(frozen=True)
class CorrectionOptions:
    mode: Literal["both", "direction_only", "none"] = "both"


@dataclass(frozen=True)
class DebugOptions:
    every_steps: int = bounded(10, min=0)  # per-block rows into shake_align.csv every N steps; 0 = never


@dataclass(frozen=True)
class ShakeAlignOptions:
    """Gradient Shake-to-Align: vote statistics per block, then in-place correction of triggered blocks."""

    kind: Literal["shake_align"] = "shake_align"
    route: Literal["vectorized", "microbatch"] = "vectorized"
    samples_per_vote: int = bounded(8, min=1)
    allow_tail: bool = True
    combine_votes: bool = False
    combine_size: int = bounded(2, min=2)
    combine_max: int = bounded(0, min=0)
    keep_single_votes: bool = True
    history: HistoryOptions = field(default_factory=HistoryOptions)
    ema_H: int = bounded(4, min=1)
    trigger: TriggerOptions = field(default_factory=TriggerOptions)
    k: float = bounded(8.0, min=0)
    lambda_n: float = bounded(0.4, min=0)
    lambda_o: float = bounded(0.4, min=0)
    alpha_min: float = bounded(0.1, min=0, max=1)
    gamma_r: float = bounded(0.3, min=0)
    gamma_hi: float = bounded(0.3, min=0)
    beta_max: float = bounded(0.5, min=0, max=1)
    eta: float = bounded(0.2, min=0)
    rho_max: float = bounded(0.5, min=0, max=1)
    agree_tau: float = bounded(1.0, min=0, max=1)
    correction: CorrectionOptions = field(default_factory=CorrectionOptions)
    compat: Literal["fixed", "upstream"] = "fixed"
    debug: DebugOptions = field(default_factory=DebugOptions)


@dataclass(frozen=True)
class GritOptions:
    """GRIT: rank-space K-FAC natural gradient, Fisher-guided reprojection, dynamic rank (published defaults)."""

    kind: Literal["grit"] = "grit"
    cov_update_freq: int = bounded(15, min=1)
    cov_ema: float | None = bounded(None, gt=0, lt=1)
    count_padding: bool = False
    kfac_update_freq: int = bounded(50, min=1)
    kfac_min_samples: int = bounded(64, min=1)
    kfac_damping: float = bounded(1e-3, gt=0)
    kfac_inversion_device: Literal["cpu", "device"] = "cpu"
    pairing: Literal["grit", "kfac"] = "grit"
    ng_warmup_steps: int = bounded(0, min=0)
    clip_order: Literal["after", "before"] = "after"
    reprojection_freq: int = bounded(50, min=1)
    reprojection_k: int = bounded(8, min=1)
    reprojection_warmup_steps: int = bounded(0, min=0)
    use_two_sided_reprojection: bool = True
    enable_rank_adaptation: bool = True
    rank_adaptation_threshold: float = bounded(0.99, gt=0, max=1)
    min_lora_rank: int = bounded(4, min=1)
    rank_adaptation_start_step: int = bounded(0, min=0)
    reproject_optimizer_state: bool = True
    lambda_kfac: float = bounded(1e-5, min=0)
    lambda_reproj: float = bounded(1e-4, min=0)
    regularizer_warmup_steps: int = bounded(0, min=0)
    adaptive: bool = True
    adaptive_damping: bool = True
    log_top_eigs: int = bounded(8, min=0)
    export_compressed: bool = False


GRADIENT_OPTIONS: dict[str, type] = {"none": NoRuleOptions, "shake_align": ShakeAlignOptions, "grit": GritOptions}


# ---- core sections --------------------------------------------------------------------------------


TASK_FORMATS = ("classification", "regression", "sft", "chat", "text")


@dataclass(frozen=True)
class SplitsConfig:
    """Which split of the source trains and which evaluates; eval null holds out the end of train."""

    train: str = "train"
    eval: str | None = "validation"


@dataclass(frozen=True)
class TaskConfig:
    """A task as data: a built-in name (its packaged definition fills the rest), or any name with `format` set.

    Every key the user sets overrides the packaged definition; see docs/data.md for each format's columns.
    """

    name: str  # a built-in task (configs/tasks/), or any name of your own with `format` set
    path: str | None  # a file, a glob or a directory of json/jsonl/csv/tsv/parquet files; null: hub or generator
    max_length: int = required(min=8)  # tokens per example (per packed row with `packing`)
    train_samples: int | None = required(min=1)  # the first N training examples; null: all
    eval_samples: int | None = required(min=1)  # the first N evaluation examples; null: all
    format: Literal["classification", "regression", "sft", "chat", "text"] | None = None  # null: a built-in's
    hub: str | None = None  # a hub dataset id (read with `datasets.load_dataset`)
    subset: str | None = None  # the hub dataset's configuration name
    splits: SplitsConfig = field(default_factory=SplitsConfig)
    columns: dict[str, str | None] | None = None  # role → column; null: the format's default column names
    roles: dict[str, str] | None = None  # chat: loralab role (system/user/assistant) → the data's role name
    keys: dict[str, str] | None = None  # chat: {role: <key of a message's role>, content: <key of its text>}
    label_names: list[str | int] | None = None  # classification: labels in class order; null: sorted distinct
    metrics: list[str] | None = None  # null: the format's defaults
    template: str | None = None  # sft prompt: alpaca | plain | chat | gsm8k | squad | xsum, or a '{prompt}' string
    chat_template: str | None = None  # chat: null = the tokenizer's own (or loralab's default); a Jinja string/file
    truncation: Literal["right", "left", "error"] = "right"  # right keeps the start, left the end; error refuses
    packing: bool = False  # sft/chat/text on a causal LM: concatenate examples into rows of max_length tokens
    group_by_length: bool = False  # batches of similar length (seeded), the cheap alternative to packing


@dataclass(frozen=True)
class ModelConfig:
    name: str
    kind: Literal["auto", "seq_cls", "causal_lm", "masked_diffusion"]
    dtype: Literal["float32", "bfloat16", "float16"]
    quantization: Literal["none", "nf4"]
    gradient_checkpointing: bool
    trust_remote_code: bool
    dropout: float | None = required(min=0, max=1)


@dataclass(frozen=True)
class MethodConfig:
    name: str
    adapter: Any
    gradient: Any


@dataclass(frozen=True)
class DiffusionConfig:
    """The masked diffusion LM (model.kind=masked_diffusion): forward process, loss weight, sampler."""

    schedule: Literal["loglinear", "cosine", "linear"]
    loss_weight: Literal["elbo", "uniform"]
    time_conditioning: Literal["none", "add"]
    eps: float = required(gt=0, lt=1)
    sigma_min: float = required(gt=0)
    sigma_max: float = required(gt=0)
    response_length: int = required(min=1)
    steps: int = required(min=1)
    temperature: float = required(min=0)
    block_length: int | None = required(min=1)


@dataclass(frozen=True)
class TrainConfig:
    epochs: float = required(gt=0)
    max_steps: int | None = required(min=1)
    batch_size: int = required(min=1)
    lr: float = required(gt=0)
    weight_decay: float = required(min=0)
    warmup_ratio: float = required(min=0, max=1)
    scheduler: Literal["linear", "cosine", "constant"] = required()
    grad_accum: int = required(min=1)
    max_grad_norm: float | None = required(gt=0)
    mixed_precision: Literal["no", "bf16", "fp16"] = required()
    eval_every: int | None = required(min=1)
    eval_each_epoch: bool = required()
    checkpoint_every: int | None = required(min=1)
    keep_last: int = required(min=1)
    max_bad_steps: int = required(min=0)
    deterministic: bool = required()
    compile: bool = False  # torch.compile the model for the training forwards (docs/gpu.md)


@dataclass(frozen=True)
class EvalConfig:
    views: list[Literal["full", "core"]]
    max_samples: int | None = required(min=1)
    batch_size: int = required(min=1)
    backend: Literal["hf", "vllm"] = required()
    max_new_tokens: int = required(min=1)
    profile: Literal["lm-eval", "paper_math"] = required()
    fewshot: int | None = required(min=0)


@dataclass(frozen=True)
class IOConfig:
    root: str
    overwrite: Literal["error", "resume", "skip", "force", "ask"]


@dataclass(frozen=True)
class WandbConfig:
    """Weights & Biases (`log.trackers: [wandb]`): offline files in the run directory, or online to a project."""

    project: str | None = None  # null: wandb's default (WANDB_PROJECT, else its own)
    entity: str | None = None  # null: the logged-in account's default entity
    mode: Literal["offline", "online"] = "offline"


@dataclass(frozen=True)
class LogConfig:
    csv: bool
    trackers: list[Literal["tensorboard", "wandb", "swanlab", "mlflow"]]
    every: int = required(min=1)
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass(frozen=True)
class LrGridConfig:
    """A log grid of learning rates: `points` values 10^e for e evenly spaced in [min_exp, max_exp]."""

    min_exp: float
    max_exp: float
    points: int = required(min=1)


@dataclass(frozen=True)
class HierarchicalConfig:
    """hpo.mode=hierarchical: the baseline's lr first, then the method's knobs near it (the Shake-to-Align
    scaffold's tuning protocol)."""

    baseline_method: str
    method: str
    knobs: dict[str, Any] | None  # dotted key → candidates; None = SHAKE_ALIGN_KNOBS
    lr_grid: LrGridConfig
    warmup_grid: list[float]
    epochs: list[float]  # stages s1, s2, s3
    score_weights: list[float]  # s3 score: weights of the curve's best, final and mean value
    baseline_lr_points: int = required(min=1)
    lr_neighbor_points: int = required(min=1)
    keep_s1: int = required(min=1)
    combine_s2: int = required(min=1)
    seeds_s3: int = required(min=1)


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

    mode: Literal["single", "hierarchical"]
    sampler: Literal["grid", "tpe", "random"]
    pruner: Literal["none", "median", "hyperband"]
    storage: str | None
    study_name: str | None
    schedule: str | None
    metric: str | None
    direction: Literal["maximize", "minimize"]
    space: dict[str, Any]
    seeds: list[int] | None
    source_study: str | None
    seed: int
    hierarchical: HierarchicalConfig
    top_k: int = required(min=0)
    n_trials: int | None = required(min=1)
    timeout: float | None = required(gt=0)
    startup_trials: int = required(min=0)
    heartbeat_interval: int = required(min=1)
    grace_period: int | None = required(min=1)


@dataclass(frozen=True)
class RunConfig:
    seed: int
    data_seed: int | None
    task: TaskConfig
    model: ModelConfig
    method: MethodConfig
    diffusion: DiffusionConfig
    train: TrainConfig
    eval: EvalConfig
    io: IOConfig
    log: LogConfig
    hpo: HpoConfig

    @property
    def effective_data_seed(self) -> int:
        """The seed of the data order: `data_seed`, or `seed` when unset."""
        return self.seed if self.data_seed is None else self.data_seed
