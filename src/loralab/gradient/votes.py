"""Votes: windows of an optimizer batch, per-window gradient buffers, combined votes and the C2 statistics.

A vote v_k is the gradient of the mean loss over window k; w_k is window k's share of the batch loss (its share of
the examples, or of the predicted tokens for a causal LM), so Σ_k w_k v_k is the batch gradient. Buffers hold each
window's *share* c_k = w_k v_k of the batch gradient (what a hook or a backward yields); statistics use
v_k = c_k / w_k. Everything the statistics need is in the vote Gram matrices (docs/methods/shake_align.md).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import Tensor

EPS = 1e-12  # guards only true zeros: a small gradient must not look like disagreement
UPSTREAM_EPS = 1e-8  # the published scaffold's additive guard (`compat: upstream`)


def guard(denominator: Tensor, upstream: bool = False) -> Tensor:
    """max(d, 1e-12), which changes only true zeros, or the scaffold's d + 1e-8 (docs/methods/shake_align.md)."""
    return denominator + UPSTREAM_EPS if upstream else denominator.clamp_min(EPS)


def vote_windows(examples: int, samples_per_vote: int, allow_tail: bool) -> list[tuple[int, int]]:
    """[start, end) of each window; a short last window is kept, or merged into the previous one."""
    bounds = [(start, min(start + samples_per_vote, examples)) for start in range(0, examples, samples_per_vote)]
    if not allow_tail and len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < samples_per_vote:
        bounds[-2:] = [(bounds[-2][0], examples)]
    return bounds


def vote_matrix(singles: int, keep_single: bool, combine: bool, size: int, limit: int) -> Tensor:
    """Rows = votes as 0/1 combinations of the single votes: the singles, then sums of `size` of them."""
    rows = [[i] for i in range(singles)] if keep_single else []
    if combine:
        combos = list(itertools.combinations(range(singles), size))
        rows += [list(c) for c in (combos[:limit] if limit > 0 else combos)]
    matrix = torch.zeros(len(rows), singles, dtype=torch.float64)
    for row, members in enumerate(rows):
        matrix[row, members] = 1.0
    return matrix


def loss_units(batch: dict) -> int | Tensor:
    """What the task loss averages over: examples (classification, a host int) or predicted tokens (causal LM, a
    0-dim tensor on the labels' device, so that counting does not wait for the device)."""
    labels = batch["labels"]
    if labels.dim() == 1:
        return labels.shape[0]
    return (labels[:, 1:] != -100).sum()


@dataclass
class BlockVotes:
    """Per-window shares of one LoRA block's A (V×R×d_in) and B (V×d_out×R) gradients, in fp32."""

    A: Tensor
    B: Tensor
    split: int

    @classmethod
    def zeros(cls, windows: int, A: Tensor, B: Tensor, split: int) -> BlockVotes:
        return cls(
            torch.zeros((windows, *A.shape), dtype=torch.float32, device=A.device),
            torch.zeros((windows, *B.shape), dtype=torch.float32, device=B.device),
            split,
        )

    def parts(self, weights: Tensor) -> tuple[Tensor, Tensor]:
        """Single votes v_k = c_k / w_k as rows, split into the core and the extension parameters (a window without
        loss units, w_k = 0, gives a zero vote)."""
        r, count = self.split, self.A.shape[0]
        scale = inverse_weights(weights).to(self.A).view(-1, 1)
        core = torch.cat([self.A[:, :r].reshape(count, -1), self.B[:, :, :r].reshape(count, -1)], dim=1)
        extension = torch.cat([self.A[:, r:].reshape(count, -1), self.B[:, :, r:].reshape(count, -1)], dim=1)
        return core * scale, extension * scale


def inverse_weights(weights: Tensor) -> Tensor:
    """1 / w_k, and 0 where w_k = 0 (a window with no predicted token has no vote)."""
    return torch.where(weights > 0, 1.0 / weights.clamp_min(torch.finfo(weights.dtype).tiny), 0.0)


def flatten_parts(A: Tensor, B: Tensor, split: int) -> tuple[Tensor, Tensor]:
    """(g_r, g_hi) of one block's A, B tensors: A rows then B columns, each flattened row-major."""
    core = torch.cat([A[:split].reshape(-1), B[:, :split].reshape(-1)])
    extension = torch.cat([A[split:].reshape(-1), B[:, split:].reshape(-1)])
    return core, extension


def unflatten_parts(core: Tensor, extension: Tensor, A: Tensor, B: Tensor, split: int) -> None:
    """Write (g_r, g_hi) back into A and B in place (the inverse of `flatten_parts`)."""
    a_core, a_ext = A[:split].numel(), A[split:].numel()
    A[:split].copy_(core[:a_core].view_as(A[:split]))
    B[:, :split].copy_(core[a_core:].view_as(B[:, :split]))
    A[split:].copy_(extension[:a_ext].view_as(A[split:]))
    B[:, split:].copy_(extension[a_ext:].view_as(B[:, split:]))


@dataclass(frozen=True)
class C2Stats:
    """Vote consistency of the core (C_r) and of the full gradient (C_R); the core's consensus share (A_b)."""

    C_r: float
    C_R: float
    A_b: float

    def metric(self, name: str) -> float:
        return 1.0 - self.A_b if name == "misalign" else getattr(self, name)


def mean_pairwise_cosine(gram: Tensor, upstream: bool = False) -> Tensor:
    """Mean over pairs i<j of gram[i,j] / guard(√(gram[i,i]·gram[j,j])), as a 0-dim tensor on gram's device."""
    norms = gram.diagonal().clamp_min(0).sqrt()
    i, j = torch.triu_indices(gram.shape[0], gram.shape[0], offset=1, device=gram.device)
    return (gram[i, j] / guard(norms[i] * norms[j], upstream)).mean()


def c2_values(gram_core: Tensor, gram_extension: Tensor, upstream: bool = False) -> Tensor:
    """C_r, C_R and A_b (a 3-vector on the device, no host read) from the Gram matrices of the core and extension
    parts of the votes (V ≥ 2); `upstream` takes the scaffold's additive guards."""
    gram_full = gram_core + gram_extension
    consensus_core = gram_core.sum().clamp_min(0).sqrt()
    consensus_full = gram_full.sum().clamp_min(0).sqrt()
    A_b = consensus_core / guard(consensus_full, upstream)
    cosines = [mean_pairwise_cosine(gram_core, upstream), mean_pairwise_cosine(gram_full, upstream)]
    return torch.stack([*cosines, A_b])


def c2_statistics(gram_core: Tensor, gram_extension: Tensor, upstream: bool = False) -> C2Stats:
    """`c2_values` on the host."""
    return C2Stats(*c2_values(gram_core, gram_extension, upstream).tolist())
