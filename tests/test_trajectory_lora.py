"""Trajectory LoRA: no-op at init, phase banks by t, FiLM formula, regularisers, on/off in sampling, save/load."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from loralab.config import load_config
from loralab.config.schema import TrajectoryLoraOptions
from loralab.diffusion import TrajectoryLoraAdapter, load_diffusion_adapter, load_diffusion_model, sample
from loralab.diffusion.model import Conditioning
from loralab.diffusion.sampler import SamplerSettings
from loralab.diffusion.trajectory_lora import phase_of, trajectory_disabled

OPTIONS = TrajectoryLoraOptions(ranks=[6, 4, 2], scales=[1.0, 0.5, 0.25], cond_dim=8)


def base():
    config = load_config([], ["model.name=tiny-bert", "model.kind=masked_diffusion"])
    return load_diffusion_model(config.model, config.diffusion)


def inputs(tokenizer, t: list[float]):
    texts = ["the movie was great.", "dull and boring", "a b c", "it was fine"][: len(t)]
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    prompt = encoded["attention_mask"].bool().clone()
    prompt[:, -3:] = False
    return encoded["input_ids"], encoded["attention_mask"], prompt, torch.tensor(t)


def randomize(module: torch.nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)


@pytest.mark.parametrize("apply_to", ["final", "every_layer"])
def test_trajectory_lora_is_a_no_op_at_init(apply_to):
    model, tokenizer = base()
    model.eval()
    args = inputs(tokenizer, [0.9, 0.5, 0.1])
    before = model.denoise(*args)
    adapted = TrajectoryLoraAdapter(TrajectoryLoraOptions(apply_to=apply_to)).apply(model)
    torch.testing.assert_close(adapted.denoise(*args), before, rtol=0, atol=0)
    sites = 2 if apply_to == "every_layer" else 1
    assert len(adapted.trajectory.sites) == sites
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("trajectory.") for n in trainable)


def test_phases_split_t_at_one_third_and_two_thirds():
    t = torch.tensor([1.0, 0.7, 2 / 3 + 1e-6, 2 / 3, 0.5, 1 / 3 + 1e-6, 1 / 3, 0.1, 1e-3])
    assert phase_of(t).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def film(member, h, c):
    """g(h, c) = W_up [(1 + γ(c)) ⊙ W_down h] + β(c), written out with matrices."""
    gamma = c @ member.gamma.weight.T + member.gamma.bias
    beta = c @ member.beta.weight.T + member.beta.bias
    return ((h @ member.down.weight.T) * (1 + gamma)) @ member.up.weight.T + beta


def test_each_sample_goes_through_the_bank_of_its_phase():
    model, _ = base()
    model = TrajectoryLoraAdapter(OPTIONS).apply(model)
    randomize(model.trajectory)
    h = torch.randn(3, 5, 64)
    prompt = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    t = torch.tensor([0.2, 0.9, 0.5])  # late, early, mid
    out = model.trajectory.perturb(0, h, Conditioning(t, prompt))
    banks = model.trajectory.sites[0]
    for row, phase in enumerate([2, 0, 1]):
        pooled = h[row][prompt[row]].mean(dim=0)
        c = pooled @ model.trajectory.condition.weight.T + model.trajectory.condition.bias
        bank = banks[phase]
        delta = bank.scale * sum(film(m, h[row], c) for m in bank.members)
        torch.testing.assert_close(out[row], h[row] + delta, rtol=1e-5, atol=1e-5)
        assert bank.members[0].down.weight.shape == (OPTIONS.ranks[phase], 64)


def test_a_standardized_prompt_code_uses_batch_statistics_in_training_and_running_ones_after():
    model, _ = base()
    model = TrajectoryLoraAdapter(dataclasses.replace(OPTIONS, cond_norm="standardize")).apply(model)
    randomize(model.trajectory)
    trajectory, condition = model.trajectory, model.trajectory.condition
    captured = []
    condition.register_forward_hook(lambda module, args, output: captured.append(args[0]))
    h = torch.randn(4, 5, 64) * 3 + torch.linspace(-2, 2, 64)  # a part every prompt shares, as in MiniLM
    prompt = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    pooled = torch.stack([h[row][prompt[row]].mean(dim=0) for row in range(4)])
    conditioning = Conditioning(torch.tensor([0.9, 0.5, 0.2, 0.7]), prompt)

    model.train()
    trajectory.perturb(0, h, conditioning)
    mean, variance = pooled.mean(dim=0), pooled.var(dim=0, unbiased=False)
    torch.testing.assert_close(captured[-1], (pooled - mean) / torch.sqrt(variance + 1e-5), rtol=1e-4, atol=1e-4)
    standardizer = trajectory.normalize[0]
    torch.testing.assert_close(standardizer.running_mean, 0.1 * mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(standardizer.running_var, 0.9 + 0.1 * pooled.var(dim=0), rtol=1e-5, atol=1e-6)

    expected = (pooled - 0.1 * mean) / torch.sqrt(0.9 + 0.1 * pooled.var(dim=0) + 1e-5)
    model.eval()
    trajectory.perturb(0, h, conditioning)
    torch.testing.assert_close(captured[-1], expected, rtol=1e-4, atol=1e-4)
    model.train()  # a batch of one has no spread of its own: the running statistics, unchanged
    trajectory.perturb(0, h[:1], Conditioning(conditioning.t[:1], prompt[:1]))
    torch.testing.assert_close(captured[-1], expected[:1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(standardizer.running_mean, 0.1 * mean, rtol=1e-5, atol=1e-6)


def test_regularisers_equal_a_direct_computation():
    model, _ = base()
    options = TrajectoryLoraOptions(ranks=[5, 3, 2], modules_per_phase=3, cond_dim=4, lambda_rank=0.3, lambda_orth=0.7)
    model = TrajectoryLoraAdapter(options).apply(model)
    randomize(model.trajectory, 1)
    rank, orth = 0.0, 0.0
    for bank in model.trajectory.sites[0]:
        downs = [m.down.weight for m in bank.members]
        rank += sum(
            float(m.down.weight.detach().square().sum() + m.up.weight.detach().square().sum()) for m in bank.members
        )
        for i in range(3):
            for j in range(i + 1, 3):
                orth += float(torch.linalg.matrix_norm(downs[i] @ downs[j].T) ** 2)
    expected = 0.3 * rank + 0.7 * orth
    assert float(model.trajectory.regularization_loss()) == pytest.approx(expected, rel=1e-5)
    assert float(model.regularization()) == pytest.approx(expected, rel=1e-5)


def train_a_little(model, tokenizer, steps: int = 40):
    from loralab.data import get_task, load_task
    from loralab.data.collate import collate
    from loralab.diffusion.data import encode_diffusion

    config = load_config([], ["task.train_samples=16"])
    features = encode_diffusion(load_task(config.task).train, get_task("synthetic/sentiment"), tokenizer, 128, 4)
    batch = collate(features, tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(0)
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    return losses


@pytest.mark.parametrize("cond_norm", ["none", "standardize"])
def test_a_trained_adapter_changes_generations_and_survives_save_and_load(tmp_path, cond_norm):
    options = dataclasses.replace(OPTIONS, cond_norm=cond_norm)
    model, tokenizer = base()
    model = TrajectoryLoraAdapter(options).apply(model)
    losses = train_a_little(model, tokenizer)
    assert sum(losses[-5:]) < sum(losses[:5])
    model.eval()
    prompts = [tokenizer(text)["input_ids"] for text in ["the movie was great.", "the plot was dull.", "so so"]]
    settings = SamplerSettings(response_length=4, steps=4)
    on = sample(model, prompts, settings)
    with trajectory_disabled(model):
        off = sample(model, prompts, settings)
    assert on != off

    TrajectoryLoraAdapter(options).save(model, tmp_path)
    saved = json.loads((tmp_path / "trajectory_lora.json").read_text())
    assert saved["ranks"] == [6, 4, 2] and saved["sites"] == 1 and saved["cond_norm"] == cond_norm
    fresh, _ = base()
    reloaded = load_diffusion_adapter(fresh, tmp_path)
    reloaded.eval()
    args = inputs(tokenizer, [0.9, 0.5, 0.1])
    torch.testing.assert_close(reloaded.denoise(*args), model.denoise(*args), rtol=0, atol=0)
    assert sample(reloaded, prompts, settings) == on
