"""How much the ε guard moves Shake-to-Align's statistics on a real model's gradients (docs/methods/shake_align.md).

Trains the `ours` preset (default `compat: fixed`) on a pretrained model for a few steps; at every step, before the
rule corrects anything, the C2 statistics of every block are computed twice from the same buffered votes: with
loralab's max(·, 1e-12) and with the published scaffold's additive 1e-8 (`compat: upstream`). Prints the vote
norms, the largest change of C_r, C_R and A_b over blocks, and whether the step's triggered blocks (the fresh
statistics under the preset's percentile trigger) differ. Vote norms are those of the core part, which C_r divides by.

    python benchmarks/shake_guards.py [--model minilm] [--task synthetic/entailment] [--steps 6] [--batch 32]
                                      [--lr 2e-5]
"""

from __future__ import annotations

import argparse

import torch

from loralab.config import load_config
from loralab.data.collate import collate
from loralab.gradient.shake_align import triggered_blocks
from loralab.gradient.votes import C2Stats, c2_values
from loralab.training.loop import BatchOrder, model_loss
from loralab.training.optim import build_optimizer
from loralab.training.recipe import prepare


def guarded_statistics(rule, upstream: bool) -> dict[str, C2Stats]:
    """Fresh C2 statistics of every block from the rule's buffered votes, under one compat mode's guards."""
    weights, votes = rule.window_weights(), rule.vote_rows()
    result = {}
    for name, block in rule.buffers.items():
        grams = (votes @ (m @ m.T).double() @ votes.T for m in block.parts(weights))
        result[name] = C2Stats(*c2_values(*grams, upstream=upstream).tolist())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--task", default="synthetic/entailment")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-5, help="the scaffold's RTE protocol lr")
    args = parser.parse_args()
    config = load_config(
        [],
        [
            f"model.name={args.model}",
            f"task.name={args.task}",
            "method.name=ours",
            f"train.batch_size={args.batch}",
            f"train.lr={args.lr}",
            f"task.train_samples={args.batch * args.steps}",
            "io.root=/tmp/shake_guards",
        ],
    )
    parts = prepare(config)
    optimizer = build_optimizer(parts.model, config.train)
    order = BatchOrder(len(parts.features), config.train.batch_size, config.seed)
    trigger, changed_steps = config.method.gradient.trigger, 0
    print(
        "step | core vote norm min..max | max |ΔC_r| | max |ΔC_R| | max |ΔA_b| | triggered fixed | triggered upstream"
    )
    for step in range(args.steps):
        batch = collate([parts.features[i] for i in order.batch(0, step)], parts.tokenizer.pad_token_id)
        parts.rule.begin_step(batch["labels"].shape[0])
        parts.rule.compute_gradients(parts.model, batch, model_loss, lambda loss: loss.backward())
        weights = parts.rule.window_weights()
        core_norms = torch.cat([block.parts(weights)[0].norm(dim=1) for block in parts.rule.buffers.values()])
        fixed, upstream = guarded_statistics(parts.rule, False), guarded_statistics(parts.rule, True)
        gaps = [max(abs(getattr(fixed[b], f) - getattr(upstream[b], f)) for b in fixed) for f in ("C_r", "C_R", "A_b")]
        chosen = [
            triggered_blocks({b: s.metric(trigger.metric) for b, s in stats.items()}, trigger)
            for stats in (fixed, upstream)
        ]
        changed_steps += chosen[0] != chosen[1]
        print(
            f"{step + 1} | {float(core_norms.min()):.1e}..{float(core_norms.max()):.1e} | "
            + " | ".join(f"{gap:.1e}" for gap in gaps)
            + f" | {len(chosen[0])} | {len(chosen[1])} (same: {chosen[0] == chosen[1]})"
        )
        parts.rule.before_step(step)
        torch.nn.utils.clip_grad_norm_([p for p in parts.model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    print(f"steps whose triggered blocks differ: {changed_steps} of {args.steps}")


if __name__ == "__main__":
    main()
