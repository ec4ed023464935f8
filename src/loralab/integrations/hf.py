"""A transformers `Trainer` that runs a loralab GradientRule in the order of loralab's own loop.

Per optimizer step: `begin_step` (the step's exact example count) → `compute_gradients` per micro-batch →
`before_step` after the last micro-batch → HF's clipping → optimizer step → scheduler → `after_step` with the step
loss. A rule with `clip_first` (GRIT's `clip_order: before`, the published HF order) preconditions after clipping.
The rule's state is saved as `loralab_rule.pt` in every checkpoint and loaded again on resume.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput, get_last_checkpoint

from loralab.adapters.dual_rank import model_lora_views
from loralab.gradient.base import GradientRule, host_metrics

RULE_STATE = "loralab_rule.pt"


def batch_rows(batch: dict) -> int:
    """The number of examples in a collated batch: the leading dimension of its first tensor."""
    return next(value for value in batch.values() if isinstance(value, Tensor)).shape[0]


class GradientRuleTrainer(Trainer):
    """A Trainer (same arguments, plus `rule=`) whose backward passes and gradient edits go through `rule`.

    Shake-to-Align needs the dual-rank split: a model from loralab's dual-rank adapter carries it; mark any other
    PEFT LoRA of rank R with `loralab.adapters.dual_rank.record_split(model, r)`.

    Each micro-batch's mean loss is weighted by its share of the step's examples (1/gradient_accumulation_steps
    when micro-batches are equal), as in loralab's loop; HF's `num_items_in_batch` token normalization is not used.
    """

    def __init__(self, *args: Any, rule: GradientRule, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rule = rule
        self.rule_metrics: dict[str, float] = {}
        self.pending_examples = self.step_examples = 0  # pending: counted for a step whose first batch is ahead
        self.step_loss = torch.zeros(())
        self.resume_dir: str | None = None
        rule.attach(self.model, model_lora_views(self.model))  # after super(): the model sits on its device now
        self.add_callback(RuleCallback(self))

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> TrainOutput:
        """Remember the checkpoint a resume starts from, so the rule's state is loaded from it as well."""
        if resume_from_checkpoint is True:
            self.resume_dir = get_last_checkpoint(self.args.output_dir)
        else:
            self.resume_dir = resume_from_checkpoint or None
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: torch.device) -> tuple[list, Any]:
        """HF's prefetch of one optimizer step's micro-batches; their rows are the step's example count."""
        batches, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        self.pending_examples = sum(batch_rows(batch) for batch in batches)
        return batches, num_items_in_batch

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Tensor | int | None = None
    ) -> Tensor:
        """Forward and backward one micro-batch through the rule; `before_step` after the step's last one.

        HF sets `sync_gradients` before this call, so it is True exactly on the step's last micro-batch, where
        preconditioning must happen: HF clips right after this returns. Returns the weighted loss HF logs.
        """
        model.train()
        inputs = self._prepare_inputs(inputs)
        if self.pending_examples:
            self.rule.begin_step(self.pending_examples)
            self.step_examples, self.pending_examples = self.pending_examples, 0
            self.step_loss = torch.zeros((), device=self.args.device)
        weight = batch_rows(inputs) / self.step_examples
        loss = self.rule.compute_gradients(
            model, inputs, self.micro_batch_loss, lambda value: self.accelerator.backward(value * weight)
        )
        weighted = (loss * weight).detach()
        self.step_loss = self.step_loss + weighted
        if self.accelerator.sync_gradients and not self.rule.clip_first:
            self.rule_metrics = self.rule.before_step(self.state.global_step)
        return weighted

    def micro_batch_loss(self, model: nn.Module, batch: dict) -> Tensor:
        """HF's `compute_loss` (mean over the micro-batch) on a shallow copy, since it may pop `labels`."""
        with self.compute_loss_context_manager():
            return self.compute_loss(model, dict(batch))

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Training-loss rows also carry the rule's latest metrics."""
        if "loss" in logs:
            logs = {**logs, **host_metrics(self.rule_metrics)}
        super().log(logs, *args, **kwargs)


class RuleCallback(TrainerCallback):
    """The rule's hooks on HF's events: optimizer and resume, clip-first preconditioning, after_step, saving."""

    def __init__(self, trainer: GradientRuleTrainer) -> None:
        self.trainer = trainer

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        rule, resume_dir = self.trainer.rule, self.trainer.resume_dir
        rule.bind_optimizer(kwargs["optimizer"])
        if resume_dir is not None and (Path(resume_dir) / RULE_STATE).is_file():
            rule.load_state_dict(torch.load(Path(resume_dir) / RULE_STATE, weights_only=True))

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.trainer.rule.clip_first:  # HF has clipped already: precondition the clipped gradient
            self.trainer.rule_metrics = self.trainer.rule.before_step(state.global_step)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        trainer = self.trainer
        trainer.rule_metrics |= trainer.rule.after_step(state.global_step, float(trainer.step_loss))

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if args.should_save:
            checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            torch.save(self.trainer.rule.state_dict(), checkpoint / RULE_STATE)
