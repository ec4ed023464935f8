"""Sequence packing and length-grouped batches: the packed layout, per-example losses of a packed forward against
each example alone (tiny Llama), the loop's loss on packed rows, the length-grouped order, GRIT's token counts."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import QUIET, assert_close_scaled, grit_parts
from loralab.data.collate import IGNORE_INDEX, collate
from loralab.data.packing import collate_packed, pack
from loralab.models.presets import build_tiny
from loralab.training.loop import BatchOrder, LengthGroupedOrder, model_loss

LENGTHS = [7, 12, 5, 9, 15, 4, 11]  # best fit decreasing into rows of 34: [15, 12, 7] (full), [11, 9, 5, 4] (5 short)
MAX_LENGTH = 34


def features_of(lengths: list[int], vocab: int = 256, seed: int = 0) -> list[dict]:
    """Random SFT-shaped examples: ids ≥ 5, the first third of each a prompt (labels IGNORE_INDEX)."""
    generator = torch.Generator().manual_seed(seed)
    features = []
    for length in lengths:
        ids = torch.randint(5, vocab, (length,), generator=generator).tolist()
        prompt = length // 3
        features.append(
            {"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:], "attention_mask": [1] * length}
        )
    return features


def test_pack_layout_on_hand_made_features():
    features = [
        {"input_ids": [11, 12, 13], "labels": [-100, 12, 13], "attention_mask": [1] * 3},
        {"input_ids": [21, 22, 23, 24], "labels": [21, 22, 23, 24], "attention_mask": [1] * 4},
        {"input_ids": [31, 32], "labels": [-100, -100], "attention_mask": [1] * 2},
        {"input_ids": [41, 42, 43, 44, 45], "labels": [-100, -100, 43, 44, 45], "attention_mask": [1] * 5},
        {"input_ids": [51], "labels": [51], "attention_mask": [1]},
        {"input_ids": list(range(60, 68)), "labels": list(range(60, 68)), "attention_mask": [1] * 8},
    ]
    # longest first: 8 opens row 0 (full), 5 row 1 (room 3), 4 row 2 (room 4); 3 fills row 1, 2 and 1 go to row 2
    rows = pack(features, 8)
    assert rows == [
        {
            "input_ids": list(range(60, 68)),
            "labels": [-100, *range(61, 68)],
            "position_ids": list(range(8)),
            "lengths": [8],
        },
        {
            "input_ids": [41, 42, 43, 44, 45, 11, 12, 13],
            "labels": [-100, -100, 43, 44, 45, -100, 12, 13],
            "position_ids": [0, 1, 2, 3, 4, 0, 1, 2],
            "lengths": [5, 3],
        },
        {
            "input_ids": [21, 22, 23, 24, 31, 32, 51],
            "labels": [-100, 22, 23, 24, -100, -100, -100],
            "position_ids": [0, 1, 2, 3, 0, 1, 0],
            "lengths": [4, 2, 1],
        },
    ]
    assert pack(features, 8) == rows  # deterministic
    with pytest.raises(ValueError, match="does not fit"):
        pack(features, 7)


def reference_best_fit_decreasing(lengths: list[int], max_length: int) -> list[list[int]]:
    """Best fit decreasing the plain way: for each example, longest first, scan every row for the tightest fit."""
    rows: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        rooms = [max_length - sum(lengths[j] for j in row) for row in rows]
        fitting = [r for r, room in enumerate(rooms) if room >= lengths[i]]
        if fitting:
            rows[min(fitting, key=lambda r: rooms[r])].append(i)  # min keeps the earliest of equal rooms
        else:
            rows.append([i])
    return rows


def examples_in(row: dict) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """A packed row cut back into its examples' (input_ids, labels) by its `lengths`."""
    offsets = np.cumsum([0, *row["lengths"]])
    return [(tuple(row["input_ids"][a:b]), tuple(row["labels"][a:b])) for a, b in itertools.pairwise(offsets)]


def test_pack_is_best_fit_decreasing_of_whole_examples():
    lengths = [int(n) for n in np.random.default_rng(0).integers(1, 40, size=200)]
    features = features_of(lengths)
    rows = pack(features, 40)
    assert all(sum(row["lengths"]) == len(row["input_ids"]) == len(row["labels"]) <= 40 for row in rows)
    packed = [example for row in rows for example in examples_in(row)]
    wanted = [(tuple(f["input_ids"]), (IGNORE_INDEX, *f["labels"][1:])) for f in features]
    assert sorted(packed) == sorted(wanted)  # every example exactly once, its first label ignored
    reference = reference_best_fit_decreasing(lengths, 40)
    assert len(rows) == len(reference) >= -(-sum(lengths) // 40)
    assert [[e for e, _ in examples_in(row)] for row in rows] == [[wanted[i][0] for i in row] for row in reference]
    assert pack(features, 40) == rows


def test_collate_packed_pads_as_a_block_of_its_own():
    rows = pack(features_of(LENGTHS), MAX_LENGTH)
    batch = collate_packed(rows, pad_token_id=0)
    assert set(batch) == {"input_ids", "labels", "position_ids", "token_mask"}  # no attention_mask
    assert batch["input_ids"].shape == (2, 34)
    assert batch["input_ids"][1, 29:].tolist() == [0] * 5
    assert batch["labels"][1, 29:].tolist() == [IGNORE_INDEX] * 5
    assert batch["position_ids"][1].tolist() == [*range(11), *range(9), *range(5), *range(4), *range(5)]
    assert batch["token_mask"].tolist() == [[1] * 34, [1] * 29 + [0] * 5]
    dispatched = collate(rows, pad_token_id=0)  # callers keep calling `collate`
    assert all(torch.equal(dispatched[key], batch[key]) for key in batch) and set(dispatched) == set(batch)
    assert "attention_mask" in collate(features_of(LENGTHS), pad_token_id=0)  # unpacked features as before


@pytest.fixture(scope="module")
def llama():
    return build_tiny("tiny-llama", "causal_lm", None).eval()


def token_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Per position t the NLL of token t + 1 given the logits at t ([..., tokens − 1])."""
    return F.cross_entropy(logits[..., :-1, :].transpose(-1, -2), ids[..., 1:], reduction="none")


def per_example_nll(model, batch: dict, rows: list[dict], position_ids: torch.Tensor | None) -> list[float]:
    """Each example's summed NLL (its tokens 1 … n−1) read off one forward of the whole batch."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=position_ids, use_cache=False).logits
    nll, sums = token_nll(logits, batch["input_ids"]), []
    for r, row in enumerate(rows):
        offsets = np.cumsum([0, *row["lengths"]])
        sums += [float(nll[r, start : end - 1].sum()) for start, end in itertools.pairwise(offsets)]
    return sums


def alone_nll(model, features: list[dict]) -> list[float]:
    """Each example's summed NLL from a forward of that example alone."""
    sums = []
    for feature in features:
        ids = torch.tensor([feature["input_ids"]])
        with torch.no_grad():
            sums.append(float(token_nll(model(input_ids=ids).logits, ids).sum()))
    return sums


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_forward_gives_each_example_its_own_loss(llama, attention):
    llama.set_attn_implementation(attention)
    features = features_of(LENGTHS, vocab=llama.config.vocab_size)
    rows = pack(features, MAX_LENGTH)
    assert [row["lengths"] for row in rows] == [[15, 12, 7], [11, 9, 5, 4]]
    batch = collate_packed(rows, pad_token_id=0)
    by_length = {len(f["input_ids"]): f for f in features}  # LENGTHS are distinct
    alone = alone_nll(llama, [by_length[n] for row in rows for n in row["lengths"]])  # in packed order
    packed = per_example_nll(llama, batch, rows, batch["position_ids"])
    assert max(abs(p - a) for p, a in zip(packed, alone, strict=True)) <= 1e-5
    # the same concatenation without position restarts (one causal sequence per row) mixes the examples
    plain = per_example_nll(llama, batch, rows, None)
    assert max(abs(p - a) for p, a in zip(plain, alone, strict=True)) > 1e-2


def test_loop_loss_on_packed_rows_is_the_token_mean_of_the_examples_alone(llama):
    """`model_loss` (what the loop and every rule call) on a collated packed batch, `token_mask` and all: the mean
    NLL over the examples' labelled tokens, each example alone. Also catches a KV cache blocking the packed mask."""
    llama.set_attn_implementation("sdpa")
    features = features_of(LENGTHS, vocab=llama.config.vocab_size)
    batch = collate(pack(features, MAX_LENGTH), pad_token_id=0)
    total, count = 0.0, 0
    with torch.no_grad():
        loss = float(model_loss(llama, batch))
        for f in features:
            ids, labels = torch.tensor([f["input_ids"]]), torch.tensor(f["labels"][1:])
            nll = token_nll(llama(input_ids=ids).logits, ids)[0]
            total, count = total + float(nll[labels != IGNORE_INDEX].sum()), count + int((labels != IGNORE_INDEX).sum())
    assert loss == pytest.approx(total / count, abs=1e-6)


def within_batch_range(order, lengths: np.ndarray, epoch: int) -> float:
    """Mean over an epoch's batches of (longest − shortest) example."""
    return float(np.mean([np.ptp(lengths[order.batch(epoch, p)]) for p in range(order.steps_per_epoch)]))


def test_length_grouped_order():
    lengths = np.clip(np.random.default_rng(1).lognormal(np.log(128), 0.8, size=1003), 8, 512).astype(int)
    order = LengthGroupedOrder(lengths.tolist(), 8, seed=3)
    assert order.steps_per_epoch == 126
    epochs = []
    for epoch in (0, 1):
        batches = [order.batch(epoch, p) for p in range(order.steps_per_epoch)]
        assert sorted(i for b in batches for i in b) == list(range(1003))  # every example once
        assert sorted(len(b) for b in batches)[0] == 1003 % 8 and {len(b) for b in batches} == {3, 8}
        assert all(np.all(np.diff(lengths[b]) <= 0) for b in batches)  # a slice of a length-sorted mega-batch
        epochs.append(batches)
    assert epochs[0] != epochs[1]
    again = LengthGroupedOrder(lengths.tolist(), 8, seed=3)  # a fresh order (as after a resume) at any position
    assert again.batch(1, 57) == epochs[1][57] and again.batch(0, 3) == epochs[0][3]
    assert LengthGroupedOrder(lengths.tolist(), 8, seed=4).batch(0, 0) != epochs[0][0]
    grouped, shuffled = within_batch_range(order, lengths, 0), within_batch_range(BatchOrder(1003, 8, 3), lengths, 0)
    assert grouped < 0.25 * shuffled


def test_grit_counts_the_same_tokens_packed_and_padded(tmp_path):
    """One recorded forward/backward through the rule over the same examples: the packed batch's `token_mask`
    keeps its padding out, so the counts (and, the packing being exact, Σ_a and Σ_g) equal the padded batch's."""
    stats, batches = [], []
    for mode in ("padded", "packed"):
        parts = grit_parts(tmp_path / mode, "model.name=tiny-llama", "task.name=synthetic/arithmetic", *QUIET)
        parts.model.train()
        features = features_of(LENGTHS, vocab=parts.model.config.vocab_size)
        batch = collate(features if mode == "padded" else pack(features, MAX_LENGTH), parts.tokenizer.pad_token_id)
        parts.rule.compute_gradients(parts.model, batch, model_loss, lambda loss: loss.backward())
        stats.append(parts.rule.stats)
        batches.append(batch)
    assert (batches[0]["attention_mask"] == 0).any() and (batches[1]["token_mask"] == 0).any()
    padded, packed = stats
    for name in padded.a:
        assert padded.a[name].count == padded.g[name].count == sum(LENGTHS)
        assert packed.a[name].count == packed.g[name].count == sum(LENGTHS)
        assert_close_scaled(packed.a[name].value, padded.a[name].value.double())
        assert_close_scaled(packed.g[name].value, padded.g[name].value.double())
