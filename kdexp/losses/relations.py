"""Relation losses: how consecutive layers' representations relate, matched between student and teacher.

The FSP matrix (Yim et al. 2017, "flow of solution procedure") of two layers' states
``H_a, H_b`` (``[n, D]``, the ``n`` real tokens of an example) is ``G = H_aᵀ H_b / n``, a
``D × D`` matrix. The loss is the mean squared difference of the student's and the teacher's
matrices, per example, averaged over the batch.

``||AᵀB − CᵀD||²_F = Σ (AAᵀ ∘ BBᵀ) − 2 Σ (ACᵀ ∘ BDᵀ) + Σ (CCᵀ ∘ DDᵀ)``: computed through
``n × n`` Gram products, never forming a ``D × D`` matrix, which is cheaper whenever the
sequence is shorter than the width (BERT-base: D = 768, n ≤ 128).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdexp.losses.precision import full_precision


def _masked(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    if hidden.ndim != 3 or attention_mask.shape != hidden.shape[:2]:
        raise ValueError(
            f"expected states [B, L, D] and a mask [B, L], got {list(hidden.shape)} and {list(attention_mask.shape)}"
        )
    return hidden.float() * attention_mask.to(torch.float32).unsqueeze(-1)


@full_precision
def fsp_matrix(first: Tensor, second: Tensor, attention_mask: Tensor) -> Tensor:
    """``G = H_aᵀ H_b / n`` per example over its real tokens: ``[B, D, D]`` (for tests and small D)."""
    a, b = _masked(first, attention_mask), _masked(second, attention_mask)
    tokens = attention_mask.to(torch.float32).sum(dim=1).clamp_min(1.0)
    return torch.einsum("bld,ble->bde", a, b) / tokens[:, None, None]


@full_precision
def fsp_loss(
    student_first: Tensor, student_second: Tensor, teacher_first: Tensor, teacher_second: Tensor, attention_mask: Tensor
) -> Tensor:
    """Mean over the batch of ``||G_S − G_T||²_F / D²``, the FSP matrices of a student and a teacher layer pair.

    All four states are ``[B, L, D]`` with the same ``D`` (project the student's first); padded
    positions are excluded and each example's matrix is divided by its own token count.
    """
    shapes = {tuple(t.shape) for t in (student_first, student_second, teacher_first, teacher_second)}
    if len(shapes) != 1:
        raise ValueError(f"FSP needs four states of one shape [B, L, D] (project the student first), got {shapes}")
    a, b = _masked(student_first, attention_mask), _masked(student_second, attention_mask)
    c, d = _masked(teacher_first, attention_mask), _masked(teacher_second, attention_mask)
    width = a.shape[-1]
    tokens = attention_mask.to(torch.float32).sum(dim=1).clamp_min(1.0)

    def gram(x: Tensor, y: Tensor) -> Tensor:
        return x @ y.transpose(1, 2)  # [B, L, L]

    squared = (
        (gram(a, a) * gram(b, b)).sum(dim=(1, 2))
        - 2 * (gram(a, c) * gram(b, d)).sum(dim=(1, 2))
        + (gram(c, c) * gram(d, d)).sum(dim=(1, 2))
    )
    return (squared.clamp_min(0.0) / tokens.pow(2) / (width * width)).mean()
