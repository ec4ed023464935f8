"""Masked diffusion LM: schedules, the forward process, the loss, the sampler, the MiniLM head."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from loralab.config import load_config
from loralab.data import get_task, load_task
from loralab.data.collate import collate
from loralab.diffusion import Schedule, load_diffusion_model, sample
from loralab.diffusion.data import encode_diffusion
from loralab.diffusion.model import forward_process
from loralab.diffusion.sampler import SamplerSettings, reveal_counts
from loralab.diffusion.schedule import sample_times

SCHEDULES = ["loglinear", "cosine", "linear"]


def diffusion_config(*overrides: str):
    return load_config([], ["model.name=tiny-bert", "model.kind=masked_diffusion", *overrides])


def tiny_diffusion(*overrides: str):
    config = diffusion_config(*overrides)
    return load_diffusion_model(config.model, config.diffusion)


def sentiment_batch(model, tokenizer, count: int = 6, response_length: int = 8) -> dict:
    spec = get_task("synthetic/sentiment")
    examples = load_task(diffusion_config(f"task.train_samples={count}").task).train
    features = encode_diffusion(examples, spec, tokenizer, 128, response_length)
    return collate(features, tokenizer.pad_token_id)


@pytest.mark.parametrize("kind", SCHEDULES)
def test_empirical_mask_rate_is_within_two_sigma_of_the_schedule(kind):
    schedule = Schedule(kind)
    generator = torch.Generator().manual_seed(0)
    draws = 20_000
    for t_value in (0.05, 0.3, 0.5, 0.8, 0.97):
        t = torch.full((draws,), t_value)
        masked = forward_process(torch.ones(draws, 4, dtype=torch.bool), t, schedule, generator)
        rate = float(schedule.mask_rate(torch.tensor(t_value)))
        sigma = math.sqrt(rate * (1 - rate) / masked.numel())
        assert abs(masked.float().mean().item() - rate) <= 2 * sigma + 1e-12


@pytest.mark.parametrize("kind", SCHEDULES)
def test_t_one_masks_the_whole_response_and_never_the_prompt(kind):
    response = torch.zeros(64, 20, dtype=torch.bool)
    response[:, 7:] = True
    masked = forward_process(response, torch.ones(64), Schedule(kind), torch.Generator().manual_seed(1))
    assert masked[:, 7:].all() and not masked[:, :7].any()
    small = forward_process(response, torch.full((64,), 0.5), Schedule(kind), torch.Generator().manual_seed(1))
    assert not small[:, :7].any()


@pytest.mark.parametrize("kind", SCHEDULES)
def test_elbo_weight_is_minus_alpha_prime_over_one_minus_alpha_by_autograd(kind):
    schedule = Schedule(kind)
    t = torch.tensor([0.01, 0.1, 0.33, 0.5, 0.77, 0.99], dtype=torch.float64, requires_grad=True)
    alpha = schedule.alpha(t)
    (derivative,) = torch.autograd.grad(alpha.sum(), t)
    expected = -derivative / (1 - alpha.detach())
    torch.testing.assert_close(schedule.weight(t.detach()), expected, rtol=1e-10, atol=0)
    torch.testing.assert_close(
        Schedule(kind, loss_weight="uniform").weight(t.detach()), torch.ones(6, dtype=torch.float64)
    )


def test_loglinear_weight_is_about_one_over_t_and_cosine_linear_alphas_follow_their_formulas():
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    torch.testing.assert_close(Schedule("loglinear", eps=1e-3).weight(t), 0.999 / (1e-3 + 0.999 * t))
    torch.testing.assert_close(Schedule("cosine").alpha(t), torch.cos(math.pi / 2 * t))
    sigma = 1e-4 + t * (20 - 1e-4)
    torch.testing.assert_close(Schedule("linear").alpha(t), torch.exp(-sigma))
    torch.testing.assert_close(Schedule("loglinear", eps=1e-3).mask_rate(t), 1e-3 + 0.999 * t)


def test_antithetic_times_cover_the_interval_evenly():
    t = sample_times(8, 1e-3, torch.Generator().manual_seed(3))
    assert ((t >= 1e-3) & (t <= 1)).all()
    gaps = torch.diff(torch.sort(t).values)
    torch.testing.assert_close(gaps, torch.full((7,), 0.999 / 8), rtol=0, atol=1e-6)


def test_the_loss_equals_a_direct_computation_with_the_same_draws():
    model, tokenizer = tiny_diffusion()
    model.eval()
    batch = sentiment_batch(model, tokenizer)
    loss = model.diffusion_loss(**batch, generator=torch.Generator().manual_seed(5)).loss

    generator = torch.Generator().manual_seed(5)
    response = batch["response_mask"].bool()
    t = sample_times(len(response), 1e-3, generator)
    masked = (torch.rand(response.shape, generator=generator) < (1e-3 + 0.999 * t)[:, None]) & response
    noisy = batch["input_ids"].masked_fill(masked, tokenizer.mask_token_id)
    logits = model.backbone(input_ids=noisy, attention_mask=batch["attention_mask"]).logits
    logits[..., tokenizer.mask_token_id] = float("-inf")
    total = 0.0
    for row, column in masked.nonzero().tolist():
        ce = F.cross_entropy(logits[row, column][None], batch["input_ids"][row, column][None])
        total += ce * 0.999 / (1e-3 + 0.999 * t[row])
    torch.testing.assert_close(loss, total / response.sum(), rtol=1e-5, atol=1e-6)


def test_subs_never_predicts_mask_and_response_slots_end_in_eos():
    model, tokenizer = tiny_diffusion()
    batch = sentiment_batch(model, tokenizer, count=4, response_length=12)
    ids = batch["input_ids"]
    logits = model.denoise(ids, batch["attention_mask"], ~batch["response_mask"].bool(), torch.ones(4))
    assert torch.isneginf(logits[..., tokenizer.mask_token_id]).all()
    for row in range(4):
        slot = ids[row][batch["response_mask"][row].bool()].tolist()
        words = tokenizer.decode([i for i in slot if i != tokenizer.eos_token_id])
        assert words in ("negative", "positive") and slot[-1] == tokenizer.eos_token_id
        assert len(slot) == 12


@pytest.mark.parametrize("kind", SCHEDULES)
def test_reveal_counts_follow_the_schedule_and_reveal_everything(kind):
    schedule = Schedule(kind)
    counts = reveal_counts(32, 16, schedule)
    assert sum(counts) == 32 and min(counts) >= 0
    masked = 32
    for i, count in enumerate(counts[:-1]):
        masked -= count
        assert masked == round(32 * float(schedule.mask_rate(torch.tensor(1 - (i + 1) / 16, dtype=torch.float64))))


@pytest.mark.parametrize(("temperature", "block_length"), [(0.0, None), (0.7, None), (0.0, 4)])
def test_sampler_reveals_all_never_changes_revealed_or_prompt_tokens(temperature, block_length):
    model, tokenizer = tiny_diffusion()
    model.eval()
    prompts = [tokenizer("the film was great.")["input_ids"], tokenizer("dull")["input_ids"]]
    states: list[torch.Tensor] = []
    settings = SamplerSettings(response_length=8, steps=8, temperature=temperature, block_length=block_length)
    model.eos_id = -1  # no EOS can be generated: every position of the slot must be revealed
    outputs = sample(model, prompts, settings, torch.Generator().manual_seed(0), states.append)
    mask = tokenizer.mask_token_id
    assert all(len(o) == 8 for o in outputs) and (states[-1] != mask).all()
    for before, after in itertools.pairwise(states):
        revealed = before != mask
        assert torch.equal(after[revealed], before[revealed])  # revealed and prompt tokens never change
        assert int((after != mask).sum()) > int(revealed.sum())
    for row, prompt in enumerate(prompts):
        assert states[-1][row, : len(prompt)].tolist() == prompt
    if block_length:  # block 1 is finished before block 2 starts
        first = [s[0, len(prompts[0]) : len(prompts[0]) + 4] for s in states]
        second = [s[0, len(prompts[0]) + 4 : len(prompts[0]) + 8] for s in states]
        done = next(i for i, f in enumerate(first) if (f != mask).all())
        assert all((s == mask).all() for s in second[: done + 1])


def test_sampler_output_is_cut_at_the_first_eos_and_later_blocks_are_skipped():
    model, tokenizer = tiny_diffusion()
    model.eval()
    prompt = tokenizer("a prompt")["input_ids"]
    eos = model.eos_id
    with torch.no_grad():  # make EOS the most likely token at every position
        model.backbone.cls.predictions.bias[eos] = 100.0
    calls: list[torch.Tensor] = []
    outputs = sample(model, [prompt], SamplerSettings(8, 8, 0.0, 4), None, calls.append)
    assert outputs == [[]]
    assert len(calls) == 4  # the first block's 4 steps; the second block is filled with EOS unsampled
    assert (calls[-1][0, len(prompt) + 4 :] == tokenizer.mask_token_id).all()
    with torch.no_grad():
        model.backbone.cls.predictions.bias[eos] = 0.0
        model.backbone.cls.predictions.bias[tokenizer.convert_tokens_to_ids("x")] = 50.0
    assert sample(model, [prompt], SamplerSettings(6, 6), None) == [[tokenizer.convert_tokens_to_ids("x")] * 6]


def test_time_conditioning_is_a_no_op_at_init_and_makes_logits_depend_on_t():
    plain, tokenizer = tiny_diffusion()
    timed, _ = tiny_diffusion("diffusion.time_conditioning=add")
    batch = sentiment_batch(plain, tokenizer, count=2)
    args = (batch["input_ids"], batch["attention_mask"], ~batch["response_mask"].bool())
    plain.eval(), timed.eval()
    torch.testing.assert_close(timed.denoise(*args, torch.full((2,), 0.9)), plain.denoise(*args, torch.full((2,), 0.9)))
    torch.nn.init.normal_(timed.time_embedding.mlp[2].weight)
    early, late = timed.denoise(*args, torch.full((2,), 0.9)), timed.denoise(*args, torch.full((2,), 0.1))
    assert (early - late)[torch.isfinite(early)].abs().max() > 1e-3
    assert set(timed.own_parameters()) == {f"time_embedding.{n}" for n, _ in timed.time_embedding.named_parameters()}


def test_minilm_gets_a_tied_decoder_and_an_identity_new_transform_that_trains():
    config = load_config([], ["model.kind=masked_diffusion"])
    model, tokenizer = load_diffusion_model(config.model, config.diffusion)
    head = model.backbone.cls.predictions
    assert head.decoder.weight is model.backbone.bert.embeddings.word_embeddings.weight
    assert set(model.head_parameters) == {
        "cls.predictions.bias",
        "cls.predictions.transform.dense.weight",
        "cls.predictions.transform.dense.bias",
        "cls.predictions.transform.LayerNorm.weight",
        "cls.predictions.transform.LayerNorm.bias",
    }
    torch.testing.assert_close(head.transform.dense.weight.detach(), torch.eye(384))
    assert float(head.transform.dense.bias.detach().abs().max()) == 0.0
    assert tokenizer.mask_token_id != tokenizer.pad_token_id and model.eos_id == tokenizer.sep_token_id


def modernbert_directory(tmp_path):
    """A tiny random ModernBERT masked LM saved with the byte tokenizer: a local model directory."""
    from transformers import AutoModelForMaskedLM, ModernBertConfig

    from loralab.models.tokenizer import byte_tokenizer

    tokenizer = byte_tokenizer("bert", 512)
    ids = {f"{name}_token_id": getattr(tokenizer, f"{name}_token_id") for name in ("pad", "bos", "eos", "cls", "sep")}
    config = ModernBertConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=512,
        global_attn_every_n_layers=1,
        **ids,
    )
    torch.manual_seed(0)
    AutoModelForMaskedLM.from_config(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    return str(tmp_path)


@pytest.mark.parametrize("backbone", ["tiny-roberta", "modernbert"])
def test_other_masked_lm_backbones_train_and_sample_with_trajectory_lora(tmp_path, backbone):
    from loralab.config.schema import TrajectoryLoraOptions
    from loralab.diffusion import TrajectoryLoraAdapter

    name = modernbert_directory(tmp_path) if backbone == "modernbert" else backbone
    model, tokenizer = tiny_diffusion(f"model.name={name}")
    assert not model.head_parameters  # these checkpoints carry their masked-LM head
    batch = sentiment_batch(model, tokenizer, count=4, response_length=6)
    model.eval()
    args = (batch["input_ids"], batch["attention_mask"], ~batch["response_mask"].bool(), torch.full((4,), 0.5))
    before = model.denoise(*args)
    model = TrajectoryLoraAdapter(TrajectoryLoraOptions(ranks=[4, 4, 4], apply_to="every_layer")).apply(model)
    torch.testing.assert_close(model.denoise(*args), before, rtol=0, atol=0)
    assert len(model.trajectory.sites) == 2
    model.train()
    loss = model(**batch).loss
    loss.backward()
    grads = [p.grad for p in model.trajectory.parameters() if p.grad is not None]
    assert torch.isfinite(loss) and any(float(g.abs().sum()) > 0 for g in grads)
    model.eval()
    prompts = [tokenizer("a short prompt")["input_ids"]]
    assert len(sample(model, prompts, SamplerSettings(response_length=6, steps=3))[0]) <= 6
