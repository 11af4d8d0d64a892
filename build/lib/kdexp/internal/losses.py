"""The internal-representation terms of Aguilar et al. (AAAI 2020), per matched layer pair.

The losses themselves (attention KL, [CLS] cosine, hidden-state MSE, projections) are the
toolkit's (:mod:`kdexp.losses.features`); this module names them per pair ``(j, m(j))``
(``attention_kl/s0_t1``) and gives each its weight, for :func:`kdexp.losses.weighted_sum`.
Pairs are summed, not averaged, so a stacked stage with ``s + 1`` pairs carries the losses of
all its layers, as in the paper.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from kdexp.internal.layer_map import LayerPair
from kdexp.losses.features import (
    HEAD_MISMATCH_RULES,
    HeadMismatch,
    Projections,
    attention_kl,
    cls_cosine_loss,
    hidden_mse,
    layer_attention,
    layer_output,
)

__all__ = ["HEAD_MISMATCH_RULES", "InternalProjections", "internal_terms", "internal_weights"]

KINDS = ("attention_kl", "cls_cosine", "hidden_mse")


class InternalProjections(Projections):
    """One learned ``W`` per matched pair (identity where widths agree)."""

    def __init__(self, layer_pairs: Sequence[LayerPair], student_width: int, teacher_width: int) -> None:
        super().__init__([str(pair) for pair in layer_pairs], student_width, teacher_width)

    def forward(self, pair: LayerPair, student_hidden: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(str(pair), student_hidden)


def internal_weights(
    active_pairs: Sequence[LayerPair], attention_weight: float, cls_weight: float, hidden_mse_weight: float
) -> dict[str, float]:
    """``{"attention_kl/s0_t1": attention_weight, ...}`` for every active pair and non-zero weight."""
    weights = dict(zip(KINDS, (attention_weight, cls_weight, hidden_mse_weight)))
    return {f"{kind}/{pair}": w for pair in active_pairs for kind, w in weights.items() if w != 0}


def internal_terms(
    active_pairs: Sequence[LayerPair],
    student_hidden_states: Sequence[Tensor],
    teacher_hidden_states: Sequence[Tensor],
    attention_mask: Tensor,
    projections: InternalProjections,
    student_attentions: Sequence[Tensor] | None = None,
    teacher_attentions: Sequence[Tensor] | None = None,
    kinds: Sequence[str] = ("attention_kl", "cls_cosine"),
    head_mismatch: HeadMismatch = "error",
) -> dict[str, Tensor]:
    """Unweighted terms ``<kind>/s{j}_t{m(j)}`` for each active pair and kind.

    ``attention_kl``: ``KL(A_T[m(j)] || A_S[j])``; ``cls_cosine``: ``1 - cos(h_T[m(j)][CLS],
    W_j h_S[j][CLS])``; ``hidden_mse``: ``MSE(W_j h_S[j], h_T[m(j)])`` over real tokens. Layer
    ``j`` reads ``hidden_states[j + 1]`` and ``attentions[j]``; [CLS] is position 0. Teacher
    tensors should come from a ``no_grad`` forward.
    """
    unknown = set(kinds) - set(KINDS)
    if unknown or not kinds:
        raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {list(kinds)}")
    if len(active_pairs) == 0:
        raise ValueError("internal distillation needs at least one active layer pair")
    if "attention_kl" in kinds and (student_attentions is None or teacher_attentions is None):
        raise ValueError(
            "attention KL is weighted but attentions are missing; run both forwards with attentions "
            "(kdexp.model_internals.forward_with_internals(..., need_attentions=True))"
        )
    terms: dict[str, Tensor] = {}
    for pair in active_pairs:
        student_hidden = projections(pair, layer_output(student_hidden_states, pair.student))
        teacher_hidden = layer_output(teacher_hidden_states, pair.teacher)
        if "attention_kl" in kinds:
            assert student_attentions is not None and teacher_attentions is not None
            terms[f"attention_kl/{pair}"] = attention_kl(
                layer_attention(student_attentions, pair.student),
                layer_attention(teacher_attentions, pair.teacher),
                attention_mask,
                head_mismatch,
            )
        if "cls_cosine" in kinds:
            terms[f"cls_cosine/{pair}"] = cls_cosine_loss(student_hidden[:, 0], teacher_hidden[:, 0])
        if "hidden_mse" in kinds:
            terms[f"hidden_mse/{pair}"] = hidden_mse(student_hidden, teacher_hidden, attention_mask)
    return terms
