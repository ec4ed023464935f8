"""The thin SVD of a LoRA update B A against the dense SVD of ΔW, and a whole spectral edit, timed.

At Llama-2-7B's MLP shape by default (ΔW 4096×11008, r 64, fp32) the two sides take the same B and A:
`thin_svd` (QR of each factor, SVD of the r×r core; lowrank.py) and `torch.linalg.svd(B @ A, full_matrices=False)`
including the product. Rounds alternate between the sides (one dense call, five thin ones per round); the
singular values of both are compared so the speed is not bought with accuracy. Then a full edit of `--modules`
such modules (thin SVD, the abs_select rule on a random g, rebuilt factors cast back to bf16), calibration
excluded, is timed once as a whole.

    python benchmarks/lowrank.py [--device cpu|cuda] [--rounds 2] [--modules 64] [--shape 4096 11008 64] [--json PATH]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from common import Target, add_output_arguments, comparison, finish
from loralab.edit import EditRule, edit_sigma
from loralab.lowrank import rebuild_factors, thin_svd

THIN, DENSE = "thin SVD (QR + r×r SVD)", "dense torch.linalg.svd(B @ A)"
Shape = tuple[int, int, int]  # d_out, d_in, rank


def timed(function: Callable[[], object], device: torch.device) -> tuple[float, object]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = function()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def factors(shape: Shape, device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    d_out, d_in, rank = shape
    generator = torch.Generator().manual_seed(seed)
    B = torch.randn(d_out, rank, generator=generator) / rank**0.5
    A = torch.randn(rank, d_in, generator=generator) / d_in**0.5
    return B.to(device), A.to(device)


def compare_svds(shape: Shape, device: torch.device, rounds: int, thin_repeats: int) -> tuple[dict, float]:
    """Seconds per call of each side over `rounds` rotating rounds, and the relative difference of their σ."""
    B, A = factors(shape, device, 0)
    thin_svd(B, A)  # warm-up (kernels, allocator)
    times: dict[str, list[float]] = {THIN: [], DENSE: []}
    dense_values = thin_values = None
    for round_ in range(rounds):
        sides = list(times)[round_ % 2 :] + list(times)[: round_ % 2]
        for side in sides:
            if side == THIN:
                for _ in range(thin_repeats):
                    seconds, (_, thin_values, _) = timed(lambda: thin_svd(B, A), device)
                    times[side].append(seconds)
            else:
                seconds, (_, dense_values, _) = timed(lambda: torch.linalg.svd(B @ A, full_matrices=False), device)
                times[side].append(seconds)
    rank = shape[2]
    error = (torch.linalg.norm(thin_values - dense_values[:rank]) / torch.linalg.norm(dense_values[:rank])).item()
    return times, error


def full_edit(shape: Shape, device: torch.device, modules: int) -> float:
    """Seconds of an edit of every module: thin SVD, abs_select on a random g, factors rebuilt and cast to bf16
    (what spectral_edit does)."""
    rule, generator = EditRule(), torch.Generator().manual_seed(0)
    weights = [factors(shape, device, seed) for seed in range(modules)]
    gs = [torch.randn(shape[2], generator=generator) for _ in range(modules)]

    def edit_all() -> None:
        for (B, A), g in zip(weights, gs, strict=True):
            U, S, Vh = thin_svd(B, A)
            sigma, _ = edit_sigma(S, g, rule, generator)
            B2, A2 = rebuild_factors(U, sigma.to(U), Vh)
            B2.to(torch.bfloat16).cpu(), A2.to(torch.bfloat16).cpu()

    seconds, _ = timed(edit_all, device)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=2, help="dense SVDs taken (each round: 1 dense, 5 thin)")
    parser.add_argument("--modules", type=int, default=64)
    parser.add_argument("--shape", type=int, nargs=3, default=(4096, 11008, 64), metavar=("D_OUT", "D_IN", "RANK"))
    add_output_arguments(parser)
    args = parser.parse_args()
    device, shape = torch.device(args.device), tuple(args.shape)
    torch.manual_seed(0)
    times, error = compare_svds(shape, device, args.rounds, thin_repeats=5)
    seconds = full_edit(shape, device, args.modules)
    d_out, d_in, rank = shape
    setup = (
        f"ΔW {d_out}×{d_in}, r {rank}, fp32 on {device}; {args.rounds} rounds (1 dense, 5 thin calls each); "
        f"σ relative difference {error:.1e}; torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    svds = comparison("thin vs dense SVD of B A", "ms", times, THIN, {DENSE: Target(">=", 50)})
    speedup = statistics.median(times[DENSE]) / statistics.median(times[THIN])
    notes = [
        f"speed-up of the thin SVD: {speedup:.0f}×",
        f"full edit of {args.modules} modules (calibration excluded): {seconds:.2f} s "
        f"({seconds / args.modules * 1e3:.1f} ms per module)",
    ]
    finish(args, setup, [svds], notes)


if __name__ == "__main__":
    main()
