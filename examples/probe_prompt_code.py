"""How much of the label a linear read-out finds in trajectory LoRA's prompt code, before any training.

Trajectory LoRA conditions on c, the mean over the prompt tokens of the frozen backbone's final hidden states.
This fits a logistic regression (scikit-learn) from that mean to the label on the training prompts and scores it
on the held-out ones: an upper bound for what the position-free β(c) path can carry.

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
from loralab.diffusion.data import prompt_and_response
from loralab.models import load_model


def prompt_codes(encoder, tokenizer, prompts: list[str], max_length: int, batch: int = 64) -> np.ndarray:
    """Mean final hidden state over each prompt's tokens (what trajectory LoRA pools into c)."""
    codes = []
    for start in range(0, len(prompts), batch):
        inputs = tokenizer(
            prompts[start : start + batch], return_tensors="pt", padding=True, truncation=True, max_length=max_length
        )
        with torch.no_grad():
            hidden = encoder(**inputs).last_hidden_state
        mask = inputs["attention_mask"][..., None].float()
        codes.append(((hidden * mask).sum(1) / mask.sum(1)).numpy())
    return np.concatenate(codes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="src/loralab/configs/experiments/lora_diffusion.yaml")
    parser.add_argument("--train-samples", type=int, default=800)
    args = parser.parse_args()
    config = load_config([args.config], [f"task.train_samples={args.train_samples}"])
    spec, task = get_task(config.task.name), load_task(config.task)
    model, tokenizer = load_model(replace(config.model, kind="auto"), "seq_cls", spec.num_labels)
    encoder = model.base_model.eval()
    evaluated = task.eval[: config.eval.max_samples]
    codes = {
        name: prompt_codes(encoder, tokenizer, [prompt_and_response(spec, e)[0] for e in examples], 64)
        for name, examples in (("train", task.train), ("eval", evaluated))
    }
    labels = {"train": [e.label for e in task.train], "eval": [e.label for e in evaluated]}
    majority = max(np.mean(labels["eval"]), 1 - np.mean(labels["eval"]))
    print(f"majority class {majority:.3f}")
    for strength in (0.1, 1.0, 10.0, 100.0):
        probe = LogisticRegression(C=strength, max_iter=3000).fit(codes["train"], labels["train"])
        print(f"C={strength:g}: held-out accuracy {probe.score(codes['eval'], labels['eval']):.3f}")


if __name__ == "__main__":
    main()
