"""How much of the label linear read-outs find in what trajectory LoRA sees, before any training.

Trajectory LoRA (`apply_to: final`) conditions on c, the mean of the frozen backbone's final hidden states over
the prompt tokens, and perturbs the final hidden states h of the response slot. This feeds each prompt followed
by a slot of two [MASK] tokens (the label word + one EOS), and fits logistic regressions (scikit-learn) on the
training prompts, scored on the held-out ones:

- from c to the label: what the position-free β(c) path can carry;
- from h at the first slot position to the label: what the frozen encoder already routes into the slot;
- from h to the slot position (first or second): whether the two slot positions can be told apart at all,
  beside their cosine similarity and their distance against the spread of h between prompts.

    python examples/probe_prompt_code.py [--config src/loralab/configs/experiments/lora_diffusion.yaml]
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from loralab.config import load_config
from loralab.data import get_task, load_task
from loralab.diffusion.data import encode_prompt, prompt_and_response
from loralab.models import load_model

SLOT = 2


def final_states(encoder, tokenizer, prompts: list[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """c (the mean over the prompt tokens) and the slot's hidden states, [prompts, SLOT, hidden], per prompt."""
    codes, slots = [], []
    for prompt in prompts:
        ids = encode_prompt(tokenizer, prompt, max_length - SLOT) + [tokenizer.mask_token_id] * SLOT
        with torch.no_grad():
            hidden = encoder(input_ids=torch.tensor([ids])).last_hidden_state[0]
        codes.append(hidden[:-SLOT].mean(dim=0).numpy())
        slots.append(hidden[-SLOT:].numpy())
    return np.stack(codes), np.stack(slots)


def held_out_accuracy(features: dict[str, np.ndarray], labels: dict[str, list], strength: float) -> float:
    """A logistic regression fitted on the training split, scored on the held-out one."""
    probe = LogisticRegression(C=strength, max_iter=3000).fit(features["train"], labels["train"])
    return float(probe.score(features["eval"], labels["eval"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="src/loralab/configs/experiments/lora_diffusion.yaml")
    parser.add_argument("--train-samples", type=int, default=800)
    args = parser.parse_args()
    config = load_config([args.config], [f"task.train_samples={args.train_samples}"])
    spec, task = get_task(config.task.name), load_task(config.task)
    model, tokenizer = load_model(replace(config.model, kind="auto"), "seq_cls", spec.num_labels)
    encoder = model.base_model.eval()
    splits = {"train": task.train, "eval": task.eval[: config.eval.max_samples]}
    states = {
        name: final_states(encoder, tokenizer, [prompt_and_response(spec, e)[0] for e in examples], 64)
        for name, examples in splits.items()
    }
    labels = {name: [e.label for e in examples] for name, examples in splits.items()}
    majority = max(np.mean(labels["eval"]), 1 - np.mean(labels["eval"]))
    print(f"majority class {majority:.3f}")
    codes = {split: code for split, (code, _) in states.items()}
    first_slot = {split: slots[:, 0] for split, (_, slots) in states.items()}
    for strength in (0.1, 1.0, 10.0):
        from_code, from_slot = (held_out_accuracy(f, labels, strength) for f in (codes, first_slot))
        print(f"C={strength:g}: label from c {from_code:.3f}, label from the first slot state {from_slot:.3f}")
    first, second = states["eval"][1][:, 0], states["eval"][1][:, 1]
    cosine = (first * second).sum(1) / np.linalg.norm(first, axis=1) / np.linalg.norm(second, axis=1)
    distance = np.linalg.norm(first - second, axis=1).mean()
    spread = np.linalg.norm(first - first.mean(axis=0), axis=1).mean()
    print(f"slot positions: cosine {cosine.mean():.4f} (min {cosine.min():.4f}), distance {distance:.2f}")
    print(f"  against a spread between prompts of {spread:.2f}")
    both = {split: np.concatenate([slots[:, 0], slots[:, 1]]) for split, (_, slots) in states.items()}
    positions = {split: [0] * len(slots) + [1] * len(slots) for split, (_, slots) in states.items()}
    print(f"slot position from h: held-out accuracy {held_out_accuracy(both, positions, 1.0):.3f}")


if __name__ == "__main__":
    main()
