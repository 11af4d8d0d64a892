"""The loss toolkit: every loss returns unweighted terms; `weighted_sum` combines them.

- :mod:`kdexp.losses.logits`: task loss (CE, MSE for regression), soft-label KD, KD to given targets.
- :mod:`kdexp.losses.features`: hidden-state MSE, attention KL, [CLS] cosine, hidden-state cosine (DistilBERT),
  PKD's patience loss, learned projections.
- :mod:`kdexp.losses.relations`: FSP (Gram) matrices of consecutive layers, without D×D matrices.

A method returns its terms by name (`{"ce": ..., "kd": ..., "attention_kl/s0_t1": ...}`) and its
weights by name (constants from its YAML, a phase schedule's, or an agent's action, as tensors);
the base logs every term as `train/loss/<name>`, so runs of different methods compare in wandb.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from kdexp.losses.features import (
    Projections,
    attention_kl,
    cls_cosine_loss,
    hidden_cosine_loss,
    hidden_mse,
    layer_attention,
    layer_output,
    patience_loss,
)
from kdexp.losses.logits import (
    hinton_weights,
    kd_terms,
    output_kd,
    regression_kd,
    soft_label_kd,
    soft_target_kd,
    task_loss,
)
from kdexp.losses.relations import fsp_loss, fsp_matrix

Terms = dict[str, torch.Tensor]


def weighted_sum(terms: Mapping[str, torch.Tensor], weights: Mapping[str, float | torch.Tensor]) -> torch.Tensor:
    """`Σ_k w_k · L_k` over the weighted terms, in the order of `weights`.

    A term without a weight is only logged; a weight without a term is an error (a typo in a
    term name would otherwise silently drop a loss). Weights may be tensors (an agent's action),
    and gradients flow through the terms, not into the weights' own graph unless they carry one.
    """
    missing = [name for name in weights if name not in terms]
    if missing:
        raise KeyError(f"weights for unknown loss terms {missing}; terms: {sorted(terms)}")
    if not weights:
        raise ValueError("weighted_sum needs at least one weight")
    total: torch.Tensor | None = None
    for name, weight in weights.items():
        term = weight * terms[name]
        total = term if total is None else total + term
    assert total is not None
    return total


__all__ = [
    "Projections",
    "Terms",
    "attention_kl",
    "cls_cosine_loss",
    "fsp_loss",
    "fsp_matrix",
    "hidden_cosine_loss",
    "hidden_mse",
    "hinton_weights",
    "kd_terms",
    "layer_attention",
    "layer_output",
    "output_kd",
    "patience_loss",
    "regression_kd",
    "soft_label_kd",
    "soft_target_kd",
    "task_loss",
    "weighted_sum",
]
