"""Layer-wise similarity of the base model's and the adapted model's hidden states on the same probe texts.

Per layer (0 = the embeddings) over the non-padding tokens: the mean cosine similarity of each token's two
hidden vectors, and linear CKA (Kornblith et al., 2019) of the two token × hidden matrices,
‖Yᶜᵀ Xᶜ‖_F² / (‖Xᶜᵀ Xᶜ‖_F ‖Yᶜᵀ Yᶜ‖_F) with column-centred Xᶜ, Yᶜ — 1 when they agree up to rotation and scale.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def hidden_states(model: nn.Module, batch: dict) -> tuple[Tensor, ...]:
    """Every layer's hidden states (embeddings first) of one forward pass."""
    model.eval()
    with torch.inference_mode():
        output = model(**batch, output_hidden_states=True)
    return output.hidden_states


def linear_cka(X: Tensor, Y: Tensor) -> float:
    """Linear CKA of two n × d matrices (rows: the same tokens); 1.0 when both are constant."""
    X, Y = X.double() - X.double().mean(0), Y.double() - Y.double().mean(0)
    denominator = torch.linalg.matrix_norm(X.T @ X) * torch.linalg.matrix_norm(Y.T @ Y)
    if denominator == 0:
        return 1.0
    return float(torch.linalg.matrix_norm(Y.T @ X) ** 2 / denominator)


def compare_representations(base: nn.Module, adapted: nn.Module, batch: dict) -> list[dict]:
    """[{layer, cosine, cka}] per hidden-state layer of the two models on `batch`."""
    mask = batch["attention_mask"].bool()
    layers = []
    for index, (h_base, h_adapted) in enumerate(
        zip(hidden_states(base, batch), hidden_states(adapted, batch), strict=True)
    ):
        X, Y = h_base[mask].double(), h_adapted[mask].double()
        cosine = torch.nn.functional.cosine_similarity(X, Y, dim=-1).mean()
        layers.append({"layer": index, "cosine": float(cosine), "cka": linear_cka(X, Y)})
    return layers
