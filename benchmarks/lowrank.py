"""The thin SVD of a LoRA update B A against the dense SVD of ΔW, and a whole spectral edit, timed.

At Llama-2-7B's MLP shape (ΔW 4096×11008, r 64, fp32) the two sides take the same B and A: `thin_svd` (QR of
each factor, SVD of the r×r core; lowrank.py) and `torch.linalg.svd(B @ A, full_matrices=False)` including the
product. Rounds alternate between the sides; the singular values of both are compared so the speed is not bought
with accuracy. Then a full edit of `--modules` such modules (thin SVD, the abs_select rule on a random g,
rebuilt factors cast back to bf16), calibration excluded, is timed once as a whole.

    python benchmarks/lowrank.py [--device cpu|cuda] [--rounds 3] [--modules 64]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from common import print_markdown
from loralab.edit import EditRule, edit_sigma
from loralab.lowrank import rebuild_factors, thin_svd

D_OUT, D_IN, RANK = 4096, 11008, 64


def timed(function: Callable[[], object], device: torch.device) -> tuple[float, object]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = function()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def factors(device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    B = torch.randn(D_OUT, RANK, generator=generator) / RANK**0.5
    A = torch.randn(RANK, D_IN, generator=generator) / D_IN**0.5
    return B.to(device), A.to(device)


def compare_svds(device: torch.device, rounds: int, thin_repeats: int) -> None:
    B, A = factors(device, 0)
    thin_svd(B, A)  # warm-up (kernels, allocator)
    times: dict[str, list[float]] = {"thin SVD (QR + r×r SVD)": [], "dense torch.linalg.svd(B @ A)": []}
    dense_values = thin_values = None
    for round_ in range(rounds):
        sides = list(times)[round_ % 2 :] + list(times)[: round_ % 2]
        for side in sides:
            if side.startswith("thin"):
                for _ in range(thin_repeats):
                    seconds, (_, thin_values, _) = timed(lambda: thin_svd(B, A), device)
                    times[side].append(seconds)
            else:
                seconds, (_, dense_values, _) = timed(lambda: torch.linalg.svd(B @ A, full_matrices=False), device)
                times[side].append(seconds)
    error = (torch.linalg.norm(thin_values - dense_values[:RANK]) / torch.linalg.norm(dense_values[:RANK])).item()
    thin, dense = (statistics.median(v) for v in times.values())
    print(f"ΔW {D_OUT}×{D_IN}, r {RANK}, fp32 on {device}; {rounds} rounds, medians; σ relative difference {error:.1e}")
    rows = [
        [side, f"{statistics.median(v) * 1e3:.2f}", f"{min(v) * 1e3:.2f}", f"{max(v) * 1e3:.2f}", str(len(v))]
        for side, v in times.items()
    ]
    print_markdown(["side", "median ms", "min ms", "max ms", "calls"], rows)
    print(f"\nspeed-up of the thin SVD: {dense / thin:.0f}×\n")


def full_edit(device: torch.device, modules: int) -> None:
    """Every module: thin SVD, abs_select on a random g, factors rebuilt and cast to bf16 (what spectral_edit does)."""
    rule, generator = EditRule(), torch.Generator().manual_seed(0)
    weights = [factors(device, seed) for seed in range(modules)]
    gs = [torch.randn(RANK, generator=generator) for _ in range(modules)]

    def edit_all() -> None:
        for (B, A), g in zip(weights, gs, strict=True):
            U, S, Vh = thin_svd(B, A)
            sigma, _ = edit_sigma(S, g, rule, generator)
            B2, A2 = rebuild_factors(U, sigma.to(U), Vh)
            B2.to(torch.bfloat16).cpu(), A2.to(torch.bfloat16).cpu()

    seconds, _ = timed(edit_all, device)
    print(f"full edit of {modules} modules at {D_OUT}×{D_IN}, r {RANK} (calibration excluded): {seconds:.2f} s")
    print(f"({seconds / modules * 1e3:.1f} ms per module)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=2, help="dense SVDs taken (each round: 1 dense, 5 thin)")
    parser.add_argument("--modules", type=int, default=64)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    compare_svds(device, args.rounds, thin_repeats=5)
    full_edit(device, args.modules)


if __name__ == "__main__":
    main()
