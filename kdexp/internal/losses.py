"""Losses for distillation from internal representations (Aguilar et al., AAAI 2020).

Symbols follow the paper: ``A_T``/``A_S`` are teacher/student self-attention
probabilities, ``h_T``/``h_S`` hidden states, ``W`` the learned projection of student
hidden states to the teacher width, ``m(j)`` the teacher layer matched to student
layer ``j``.

Layer indexing (Hugging Face ``BertModel`` with ``output_hidden_states=True`` and
``output_attentions=True``): ``hidden_states[0]`` is the embedding output and
``hidden_states[i + 1]`` the output of transformer layer ``i``; ``attentions[i]`` is
layer ``i``. Here "layer ``j``" always means transformer layer ``j`` (0-based), so its
representation is ``hidden_states[j + 1]`` and its attention ``attentions[j]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdexp.internal.layer_map import LayerPair

HeadMismatch = Literal["error", "average"]
HEAD_MISMATCH_RULES: tuple[str, ...] = ("error", "average")

# Floor under log A_S. Reached by the exact zeros on padded keys (where A_T is zero too,
# so the term vanishes) and by student probabilities that underflow.
PROBABILITY_FLOOR = 1e-12


def _real_token_mask(attention_mask: Tensor, batch_size: int, seq_len: int) -> Tensor:
    """``attention_mask`` ([B, L], 1 = real token) as float32, after a shape check."""
    if attention_mask.shape != (batch_size, seq_len):
        raise ValueError(
            f"attention_mask must have shape [B, L] = [{batch_size}, {seq_len}], got {list(attention_mask.shape)}"
        )
    return attention_mask.to(torch.float32)


def reconcile_attention_heads(
    student_attentions: Tensor, teacher_attentions: Tensor, head_mismatch: HeadMismatch = "error"
) -> tuple[Tensor, Tensor]:
    """Make ``A_S`` and ``A_T`` comparable head by head.

    Equal head counts are returned unchanged (compared per head). When ``H_S != H_T``:
    ``"average"`` replaces both by their head-averaged map ``[B, 1, L, L]`` (a mean of
    probability rows is again a probability row); ``"error"`` raises, because there is
    no canonical pairing of heads.
    """
    if head_mismatch not in HEAD_MISMATCH_RULES:
        raise ValueError(f"head_mismatch must be one of {HEAD_MISMATCH_RULES}, got {head_mismatch!r}")
    student_heads, teacher_heads = student_attentions.shape[1], teacher_attentions.shape[1]
    if student_heads == teacher_heads:
        return student_attentions, teacher_attentions
    if head_mismatch == "error":
        raise ValueError(
            f"student has {student_heads} attention heads and teacher has {teacher_heads}; attention KL "
            "compares heads one to one. Pass head_mismatch='average' to compare head-averaged attention maps"
        )
    return student_attentions.mean(dim=1, keepdim=True), teacher_attentions.mean(dim=1, keepdim=True)


def attention_kl(
    student_attentions: Tensor,
    teacher_attentions: Tensor,
    attention_mask: Tensor,
    head_mismatch: HeadMismatch = "error",
) -> Tensor:
    """``KL(A_T row || A_S row)`` averaged over heads and real query positions.

    Args:
        student_attentions: ``A_S``, ``[B, H_S, L, L]`` attention probabilities (each
            row, over keys, sums to 1).
        teacher_attentions: ``A_T``, ``[B, H_T, L, L]``.
        attention_mask: ``[B, L]``, 1 = real token, 0 = padding. Padded query rows are
            excluded; padded keys carry probability 0 in both maps and contribute 0.
        head_mismatch: rule when ``H_S != H_T``, see :func:`reconcile_attention_heads`.

    Returns:
        Scalar: the per-row KL, averaged over heads, then averaged over all real query
        positions of the batch (each real token weighs the same).
    """
    if student_attentions.ndim != 4 or teacher_attentions.ndim != 4:
        raise ValueError(
            "attentions must be [B, H, L, L], got student "
            f"{list(student_attentions.shape)} and teacher {list(teacher_attentions.shape)}"
        )
    if (
        student_attentions.shape[0] != teacher_attentions.shape[0]
        or student_attentions.shape[2:] != teacher_attentions.shape[2:]
    ):
        raise ValueError(
            "student and teacher attentions must agree in batch and sequence sizes, got student "
            f"{list(student_attentions.shape)} and teacher {list(teacher_attentions.shape)}"
        )
    batch_size, _, seq_len, _ = student_attentions.shape
    query_mask = _real_token_mask(attention_mask, batch_size, seq_len)
    student_probs, teacher_probs = reconcile_attention_heads(
        student_attentions.float(), teacher_attentions.float(), head_mismatch
    )
    # xlogy gives 0 where A_T = 0, so padded keys add nothing; the floor keeps log A_S
    # finite there (its gradient is then zero, which is right: A_T puts no mass on them).
    row_kl = (
        torch.xlogy(teacher_probs, teacher_probs)
        - teacher_probs * student_probs.clamp_min(PROBABILITY_FLOOR).log()
    ).sum(dim=-1)
    kl_per_query = row_kl.mean(dim=1)
    # clamp_min avoids a host sync for an emptiness check; tokenized inputs always have [CLS].
    return (kl_per_query * query_mask).sum() / query_mask.sum().clamp_min(1.0)


def cls_cosine_loss(student_cls: Tensor, teacher_cls: Tensor) -> Tensor:
    """``mean_b [1 - cos(h_T[CLS], W h_S[CLS])]``.

    Args:
        student_cls: ``W h_S[CLS]``, ``[B, D_T]``; the projection ``W`` must already be
            applied (see :class:`InternalProjections`).
        teacher_cls: ``h_T[CLS]``, ``[B, D_T]``.
    """
    if student_cls.shape != teacher_cls.shape or student_cls.ndim != 2:
        raise ValueError(
            "[CLS] vectors must both be [B, D] with the same D (project the student first), got student "
            f"{list(student_cls.shape)} and teacher {list(teacher_cls.shape)}"
        )
    cosine = F.cosine_similarity(teacher_cls.float(), student_cls.float(), dim=-1)
    return (1.0 - cosine).mean()


def hidden_mse(student_hidden: Tensor, teacher_hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean squared error between ``W h_S`` and ``h_T`` over real tokens.

    Args:
        student_hidden: projected student states ``[B, L, D_T]``.
        teacher_hidden: teacher states ``[B, L, D_T]``.
        attention_mask: ``[B, L]``, 1 = real token; padded positions are excluded.

    Returns:
        Scalar: squared error averaged over real tokens and the ``D_T`` features.
    """
    if student_hidden.shape != teacher_hidden.shape or student_hidden.ndim != 3:
        raise ValueError(
            "hidden states must both be [B, L, D] with the same D (project the student first), got student "
            f"{list(student_hidden.shape)} and teacher {list(teacher_hidden.shape)}"
        )
    batch_size, seq_len, width = student_hidden.shape
    token_mask = _real_token_mask(attention_mask, batch_size, seq_len)
    squared_error = (student_hidden.float() - teacher_hidden.float()).pow(2).sum(dim=-1)
    return (squared_error * token_mask).sum() / (token_mask.sum().clamp_min(1.0) * width)


class InternalProjections(nn.Module):
    """The projections ``W`` of student hidden states to the teacher width, one per pair.

    Each matched pair gets its own learned ``Linear(D_S, D_T)`` when the widths differ,
    and an identity when they are equal (no parameters).
    """

    def __init__(self, layer_pairs: Sequence[LayerPair], student_width: int, teacher_width: int) -> None:
        super().__init__()
        self.student_width = student_width
        self.teacher_width = teacher_width
        self.by_pair = nn.ModuleDict(
            {
                str(pair): nn.Linear(student_width, teacher_width)
                if student_width != teacher_width
                else nn.Identity()
                for pair in layer_pairs
            }
        )

    def forward(self, pair: LayerPair, student_hidden: Tensor) -> Tensor:
        """``W_pair h_S``: project the last dimension of ``student_hidden`` from ``D_S`` to ``D_T``."""
        key = str(pair)
        if key not in self.by_pair:
            raise KeyError(f"no projection for layer pair {pair}; known pairs: {list(self.by_pair.keys())}")
        return self.by_pair[key](student_hidden)


def layer_output(hidden_states: Sequence[Tensor], layer: int) -> Tensor:
    """Output of transformer layer ``layer`` (0-based): ``hidden_states[layer + 1]``.

    ``hidden_states`` is the Hugging Face tuple whose entry 0 is the embedding output.
    """
    if not 0 <= layer < len(hidden_states) - 1:
        raise IndexError(
            f"layer {layer} out of range for {len(hidden_states)} hidden states "
            f"(embedding output + {len(hidden_states) - 1} layers)"
        )
    return hidden_states[layer + 1]


def layer_attention(attentions: Sequence[Tensor], layer: int) -> Tensor:
    """Attention probabilities of transformer layer ``layer`` (0-based): ``attentions[layer]``."""
    if not 0 <= layer < len(attentions):
        raise IndexError(f"layer {layer} out of range for {len(attentions)} attention maps")
    return attentions[layer]


class InternalLoss(NamedTuple):
    """Weighted total to back-propagate and detached values to log.

    ``components`` keys: ``"attention_kl"``, ``"cls_cosine"``, ``"hidden_mse"`` (sums
    over active pairs, unweighted; present only when their weight is non-zero), the
    same names suffixed with ``"/s{j}_t{m(j)}"`` per pair, and ``"total"``.
    """

    total: Tensor
    components: dict[str, Tensor]


def internal_distillation_loss(
    active_pairs: Sequence[LayerPair],
    student_hidden_states: Sequence[Tensor],
    teacher_hidden_states: Sequence[Tensor],
    attention_mask: Tensor,
    projections: InternalProjections,
    student_attentions: Sequence[Tensor] | None = None,
    teacher_attentions: Sequence[Tensor] | None = None,
    attention_weight: float = 1.0,
    cls_weight: float = 1.0,
    hidden_mse_weight: float = 0.0,
    head_mismatch: HeadMismatch = "error",
) -> InternalLoss:
    """Sum over active pairs ``(j, m(j))`` of the weighted internal losses.

    ``total = sum_j [attention_weight * KL(A_T[m(j)] || A_S[j])
    + cls_weight * (1 - cos(h_T[m(j)][CLS], W_j h_S[j][CLS]))
    + hidden_mse_weight * MSE(W_j h_S[j], h_T[m(j)])]``.

    Pairs are summed, not averaged, so a stacked stage with ``s + 1`` pairs carries the
    losses of all its layers, as in the paper. Layer ``j`` reads ``hidden_states[j + 1]``
    and ``attentions[j]`` (see module docstring); [CLS] is sequence position 0. A
    component with weight 0 is skipped, so attentions may be ``None`` when
    ``attention_weight == 0``. Teacher tensors should come from a ``no_grad`` forward.
    """
    if len(active_pairs) == 0:
        raise ValueError("internal_distillation_loss needs at least one active layer pair")
    use_attention, use_cls, use_hidden = attention_weight != 0, cls_weight != 0, hidden_mse_weight != 0
    if not (use_attention or use_cls or use_hidden):
        raise ValueError("all internal loss weights are zero; nothing to distil")
    if use_attention and (student_attentions is None or teacher_attentions is None):
        raise ValueError(
            "attention_weight is non-zero but attentions are missing; run both forwards with attentions "
            "(kdexp.internal.internals.forward_with_internals(..., need_attentions=True))"
        )
    totals: dict[str, list[Tensor]] = {"attention_kl": [], "cls_cosine": [], "hidden_mse": []}
    per_pair: dict[str, Tensor] = {}
    weighted_terms: list[Tensor] = []
    for pair in active_pairs:
        student_hidden = projections(pair, layer_output(student_hidden_states, pair.student))
        teacher_hidden = layer_output(teacher_hidden_states, pair.teacher)
        pair_losses: dict[str, tuple[float, Tensor]] = {}
        if use_attention:
            pair_losses["attention_kl"] = (
                attention_weight,
                attention_kl(
                    layer_attention(student_attentions, pair.student),
                    layer_attention(teacher_attentions, pair.teacher),
                    attention_mask,
                    head_mismatch,
                ),
            )
        if use_cls:
            pair_losses["cls_cosine"] = (cls_weight, cls_cosine_loss(student_hidden[:, 0], teacher_hidden[:, 0]))
        if use_hidden:
            pair_losses["hidden_mse"] = (
                hidden_mse_weight,
                hidden_mse(student_hidden, teacher_hidden, attention_mask),
            )
        for name, (weight, value) in pair_losses.items():
            weighted_terms.append(weight * value)
            totals[name].append(value)
            per_pair[f"{name}/{pair}"] = value.detach()
    total = torch.stack(weighted_terms).sum()
    components = {name: torch.stack(values).sum().detach() for name, values in totals.items() if values}
    components.update(per_pair)
    components["total"] = total.detach()
    return InternalLoss(total=total, components=components)
