"""GradientRuleTrainer (transformers' Trainer running a loralab rule) against plain autograd on a tiny RoBERTa:
precondition → clip (and GRIT's clip-first quirk), gradient accumulation, the step loss `after_step` receives and
the rule metrics in the logs, rule state across a checkpoint and resume."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers import TrainingArguments

from loralab.adapters.lora import peft_lora_views
from loralab.config import load_config
from loralab.config.schema import GritOptions
from loralab.data.collate import collate
from loralab.gradient.base import GradientRule, NoRule
from loralab.gradient.grit import Grit
from loralab.gradient.shake_align import ShakeAlign
from loralab.integrations.hf import RULE_STATE, GradientRuleTrainer
from loralab.models.presets import build_tiny
from loralab.training.optim import build_optimizer, build_scheduler
from loralab.training.recipe import prepare, run_training

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")

EXAMPLES, LENGTH, MAX_NORM, NEVER = 4, 8, 1e-2, 10**6
QUIET = {"cov_update_freq": NEVER, "kfac_update_freq": NEVER, "reprojection_freq": NEVER}
QUIET |= {"lambda_kfac": 0.0, "lambda_reproj": 0.0, "adaptive": False}
DUE = {"cov_update_freq": 1, "kfac_update_freq": 1, "kfac_min_samples": 1, "reprojection_freq": NEVER}


def lora_model() -> nn.Module:
    """Tiny RoBERTa classifier with LoRA r=4 on query/value, no dropout, B drawn at random (non-zero gradients)."""
    config = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["query", "value"])
    model = get_peft_model(build_tiny("tiny-roberta", "seq_cls", 2, dropout=0.0), config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for view in peft_lora_views(model).values():
            view.B.copy_(0.02 * torch.randn(view.B.shape, generator=generator))
    return model


def dataset() -> list[dict[str, Tensor]]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(10, 200, (EXAMPLES, LENGTH), generator=generator)
    labels = torch.tensor([0, 1, 1, 0])
    mask = torch.ones(LENGTH, dtype=torch.long)
    return [{"input_ids": ids[i], "attention_mask": mask, "labels": labels[i]} for i in range(EXAMPLES)]


def full_batch() -> dict[str, Tensor]:
    rows = dataset()
    return {key: torch.stack([row[key] for row in rows]) for key in rows[0]}


def trainer_for(tmp_path, model: nn.Module, rule: GradientRule, **overrides) -> GradientRuleTrainer:
    """SGD with lr 1 under a constant schedule, so an update is minus the final gradient."""
    settings = {
        "output_dir": str(tmp_path),
        "report_to": [],
        "use_cpu": True,
        "save_strategy": "no",
        "logging_steps": 1,
        "disable_tqdm": True,
        "per_device_train_batch_size": EXAMPLES,
        "max_steps": 1,
        "lr_scheduler_type": "constant",
        "max_grad_norm": MAX_NORM,
        "remove_unused_columns": False,
        "seed": 0,
    }
    args = TrainingArguments(**(settings | overrides))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    return GradientRuleTrainer(model=model, args=args, train_dataset=dataset(), optimizers=(optimizer, None), rule=rule)


@torch.no_grad()
def batch_loss(model: nn.Module) -> float:
    """The mean loss over all examples."""
    return float(model(**full_batch()).loss)


def trainable(model: nn.Module) -> dict[str, Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def reference_gradients(model: nn.Module) -> dict[str, Tensor]:
    """Plain autograd on a copy: the gradient of the mean loss over all examples."""
    model = copy.deepcopy(model)
    model(**full_batch()).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def norm(tensors: dict[str, Tensor]) -> float:
    return math.sqrt(sum(float(t.square().sum()) for t in tensors.values()))


def clipped(grads: dict[str, Tensor]) -> dict[str, Tensor]:
    """torch's global-norm clip: scale by max_norm / (norm + 1e-6) when that is below 1."""
    scale = min(1.0, MAX_NORM / (norm(grads) + 1e-6))
    return {name: g * scale for name, g in grads.items()}


def preconditioned(grads: dict[str, Tensor], inverses: dict[str, tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
    """GRIT pairing: ∇A ← Σ_a⁻¹ ∇A and ∇B ← ∇B Σ_g⁻¹; every other gradient as it is."""
    result = dict(grads)
    for module, (inverse_a, inverse_g) in inverses.items():
        a, b = f"{module}.lora_A.default.weight", f"{module}.lora_B.default.weight"
        result[a], result[b] = inverse_a @ grads[a], grads[b] @ inverse_g
    return result


def relative_distance(ours: dict[str, Tensor], theirs: dict[str, Tensor]) -> float:
    return norm({name: ours[name] - theirs[name] for name in theirs}) / norm(theirs)


def spd(rank: int, generator: torch.Generator) -> Tensor:
    """An SPD matrix with eigenvalues over [30, 1000], like (Σ + λI)⁻¹ for small Σ: LoRA's share of the norm grows."""
    basis, _ = torch.linalg.qr(torch.randn(rank, rank, generator=generator))
    return basis @ torch.diag(torch.linspace(30.0, 1000.0, rank)) @ basis.T


@pytest.mark.parametrize("clip_order", ["after", "before"])
def test_preconditioning_and_clipping_follow_the_rule_order(tmp_path, clip_order):
    model = lora_model()
    rule = Grit(GritOptions(clip_order=clip_order, **QUIET))
    trainer = trainer_for(tmp_path, model, rule)
    generator = torch.Generator().manual_seed(2)
    inverses = {name: (spd(4, generator), spd(4, generator)) for name in rule.modules}
    for name, (inverse_a, inverse_g) in inverses.items():
        rule.modules[name].inverse_a, rule.modules[name].inverse_g = inverse_a, inverse_g
    before = trainable(model)
    grads = reference_gradients(model)
    assert len(inverses) == 4 and any("classifier" in name for name in grads)
    assert min(norm(grads), norm(preconditioned(grads, inverses))) > 10 * MAX_NORM  # clipping bites either way

    trainer.train()

    update = {name: p - before[name] for name, p in trainable(model).items()}
    precondition_then_clip = {n: -g for n, g in clipped(preconditioned(grads, inverses)).items()}
    clip_then_precondition = {n: -g for n, g in preconditioned(clipped(grads), inverses).items()}
    expected, other = (
        (precondition_then_clip, clip_then_precondition)
        if clip_order == "after"
        else (clip_then_precondition, precondition_then_clip)
    )
    assert relative_distance(update, expected) < 1e-4
    assert relative_distance(update, other) > 0.1
    assert rule.clip_first == (clip_order == "before")


def test_gradient_accumulation_gives_the_full_batch_update(tmp_path):
    model = lora_model()
    before = trainable(model)
    expected = {name: -g for name, g in reference_gradients(model).items()}
    for accumulation in (1, 2):
        trained = copy.deepcopy(model)
        trainer = trainer_for(
            tmp_path / str(accumulation),
            trained,
            NoRule(),
            per_device_train_batch_size=EXAMPLES // accumulation,
            gradient_accumulation_steps=accumulation,
            max_grad_norm=0.0,  # no clipping: a wrong 1/GA scale would show
        )
        trainer.train()
        update = {name: p - before[name] for name, p in trainable(trained).items()}
        assert relative_distance(update, expected) < 1e-5, accumulation
        first = next(row for row in trainer.state.log_history if "loss" in row)
        assert first["loss"] == pytest.approx(batch_loss(model), rel=1e-6)


def test_after_step_gets_the_step_loss_and_metrics_reach_the_logs(tmp_path):
    model = lora_model()
    initial_loss = batch_loss(model)
    rule = Grit(GritOptions(**DUE))
    trainer = trainer_for(
        tmp_path, model, rule, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3
    )

    trainer.train()

    rows = [row for row in trainer.state.log_history if "loss" in row]
    assert len(rows) == 3 and len(rule.losses) == 3
    assert list(rule.losses) == pytest.approx([row["loss"] for row in rows], rel=1e-6)
    assert rule.losses[0] == pytest.approx(initial_loss, rel=1e-6)
    assert all(row["grit/inverted"] == 4.0 for row in rows)  # after_step's metrics, every step
    assert "grit/ng_grad_norm" not in rows[0]  # no inverse existed before step 1
    assert all(row["grit/ng_grad_norm"] > 0 for row in rows[1:])  # before_step's metric once they do


def test_rule_state_is_saved_with_checkpoints_and_restored_on_resume(tmp_path):
    straight = Grit(GritOptions(**DUE))
    trainer_for(tmp_path / "straight", lora_model(), straight, max_steps=3).train()

    first = Grit(GritOptions(**DUE))
    trainer_for(tmp_path / "resumed", lora_model(), first, max_steps=2, save_strategy="steps", save_steps=2).train()
    saved = torch.load(tmp_path / "resumed" / "checkpoint-2" / RULE_STATE, weights_only=True)
    assert saved["losses"] == list(first.losses) and saved["steps_done"] == 2

    resumed = Grit(GritOptions(**DUE))
    trainer_for(tmp_path / "resumed", lora_model(), resumed, max_steps=3).train(resume_from_checkpoint=True)

    assert list(resumed.losses) == pytest.approx(list(straight.losses), rel=1e-6)
    for name, state in straight.modules.items():
        torch.testing.assert_close(resumed.modules[name].inverse_a, state.inverse_a)
        torch.testing.assert_close(resumed.modules[name].inverse_g, state.inverse_g)


@pytest.mark.slow
def test_shake_align_on_a_dual_rank_model_matches_loralabs_loop(tmp_path):
    """The split travels with loralab's dual-rank model: 3 corrected steps through the HF trainer give the adapter
    loralab's own loop gives (one batch of all 8 examples per step, one example per vote, so the order HF's sampler
    puts the examples in changes no statistic)."""
    steps = 3
    config = load_config(
        [],
        [
            "model.name=tiny-roberta",
            "task.name=synthetic/entailment",
            "task.train_samples=8",
            "task.eval_samples=8",
            "model.dropout=0",
            "train.batch_size=8",
            "train.lr=1e-2",
            "train.warmup_ratio=0",
            f"train.max_steps={steps}",
            "method.name=ours",
            "method.adapter.r=2",
            "method.adapter.R=6",
            "method.adapter.dropout=0",
            "method.gradient.samples_per_vote=1",
            "method.gradient.trigger.percentile_p=50",
            f"io.root={tmp_path / 'runs'}",
        ],
    )
    ours = run_training(config, show_progress=False)
    expected = load_file(str(ours.directory / "adapter" / "adapter_model.safetensors"))

    parts = prepare(config)
    optimizer = build_optimizer(parts.model, config.train)
    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"),
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        per_device_train_batch_size=8,
        max_steps=steps,
        max_grad_norm=config.train.max_grad_norm,
        remove_unused_columns=False,
        seed=config.seed,
    )
    rule = ShakeAlign(config.method.gradient)
    trainer = GradientRuleTrainer(
        model=parts.model,
        args=args,
        train_dataset=parts.features,
        data_collator=lambda rows: collate(rows, parts.tokenizer.pad_token_id),
        optimizers=(optimizer, build_scheduler(optimizer, config.train, steps)),
        rule=rule,
    )
    assert {view.split for view in rule.views.values()} == {2}
    trainer.train()
    assert trainer.rule_metrics["shake/votes"] == 8 and trainer.rule_metrics["shake/trigger_rate"] > 0
    trained = get_peft_model_state_dict(parts.model)
    assert sorted(trained) == sorted(expected) and any("lora_A" in name for name in expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(trained[name], tensor, rtol=1e-4, atol=1e-6)
