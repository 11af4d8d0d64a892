"""Losses between internal representations of a student and its teacher.

Symbols: ``A_T``/``A_S`` teacher/student self-attention probabilities, ``h_T``/``h_S`` hidden
states, ``W`` a learned projection of student states to the teacher width.

Layer indexing (Hugging Face encoders with ``output_hidden_states=True`` and
``output_attentions=True``): ``hidden_states[0]`` is the embedding output and
``hidden_states[i + 1]`` the output of transformer layer ``i``; ``attentions[i]`` is layer
``i``. "Layer ``j``" always means transformer layer ``j`` (0-based).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdexp.losses.precision import full_precision

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


ATTENTION_HEAD_REDUCTIONS = ("mean", "sum")


@full_precision
def attention_kl(
    student_attentions: Tensor,
    teacher_attentions: Tensor,
    attention_mask: Tensor,
    head_mismatch: HeadMismatch = "error",
    heads: str = "mean",
) -> Tensor:
    """``KL(A_T row || A_S row)`` averaged (or summed) over heads, averaged over real query positions.

    Args:
        student_attentions: ``A_S``, ``[B, H_S, L, L]`` attention probabilities (each
            row, over keys, sums to 1).
        teacher_attentions: ``A_T``, ``[B, H_T, L, L]``.
        attention_mask: ``[B, L]``, 1 = real token, 0 = padding. Padded query rows are
            excluded; padded keys carry probability 0 in both maps and contribute 0.
        head_mismatch: rule when ``H_S != H_T``, see :func:`reconcile_attention_heads`.
        heads: ``mean`` (the KL per head, averaged) or ``sum`` (summed over heads, as a loss
            written ``sum_h KL`` reads).

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
        torch.xlogy(teacher_probs, teacher_probs) - teacher_probs * student_probs.clamp_min(PROBABILITY_FLOOR).log()
    ).sum(dim=-1)
    if heads not in ATTENTION_HEAD_REDUCTIONS:
        raise ValueError(f"heads must be one of {ATTENTION_HEAD_REDUCTIONS}, got {heads!r}")
    kl_per_query = row_kl.mean(dim=1) if heads == "mean" else row_kl.sum(dim=1)
    # clamp_min avoids a host sync for an emptiness check; tokenized inputs always have [CLS].
    return (kl_per_query * query_mask).sum() / query_mask.sum().clamp_min(1.0)


@full_precision
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


@full_precision
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


class Projections(nn.Module):
    """Learned projections ``W`` of student states to the teacher width, one per named match.

    A match gets its own ``Linear(D_S, D_T)`` when the widths differ and an identity (no
    parameters) when they are equal.
    """

    def __init__(self, names: Sequence[str], student_width: int, teacher_width: int) -> None:
        super().__init__()
        self.student_width = student_width
        self.teacher_width = teacher_width
        self.by_name = nn.ModuleDict(
            {
                name: nn.Linear(student_width, teacher_width) if student_width != teacher_width else nn.Identity()
                for name in names
            }
        )

    def forward(self, name: str, student_hidden: Tensor) -> Tensor:
        """``W_name h_S``: project the last dimension of ``student_hidden`` from ``D_S`` to ``D_T``."""
        if name not in self.by_name:
            raise KeyError(f"no projection named {name}; known: {list(self.by_name.keys())}")
        return self.by_name[name](student_hidden)


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


@full_precision
def hidden_cosine_loss(student_hidden: Tensor, teacher_hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """``1 - cos(W h_S[t], h_T[t])`` averaged over the real tokens ``t`` of the batch.

    DistilBERT's cosine-embedding loss (Sanh et al. 2019; ``nn.CosineEmbeddingLoss`` with target 1
    over the positions the attention mask keeps), without a host sync for the selection.

    Args:
        student_hidden: projected student states ``[B, L, D_T]``.
        teacher_hidden: teacher states ``[B, L, D_T]``.
        attention_mask: ``[B, L]``, 1 = real token; padded positions are excluded.
    """
    if student_hidden.shape != teacher_hidden.shape or student_hidden.ndim != 3:
        raise ValueError(
            "hidden states must both be [B, L, D] with the same D (project the student first), got student "
            f"{list(student_hidden.shape)} and teacher {list(teacher_hidden.shape)}"
        )
    batch_size, seq_len, _ = student_hidden.shape
    token_mask = _real_token_mask(attention_mask, batch_size, seq_len)
    cosine = F.cosine_similarity(student_hidden.float(), teacher_hidden.float(), dim=-1)  # [B, L]
    return ((1.0 - cosine) * token_mask).sum() / token_mask.sum().clamp_min(1.0)


@full_precision
def patience_loss(student_cls: Tensor, teacher_cls: Tensor, normalize: bool = True) -> Tensor:
    """PKD's patient-teacher loss (Sun et al. 2019) over ``M`` matched layers' [CLS] vectors.

    ``mean_{b, j, d} (h_S[j][CLS]/||h_S[j][CLS]||₂ − h_T[m(j)][CLS]/||h_T[m(j)][CLS]||₂)²``: the
    paper's ``Σ_j ||·||²₂`` per example divided by ``M·D``, averaged over the batch, which is the
    reduction of the authors' code (``F.mse_loss`` over ``[B, M, D]``) that their ``β`` grid
    {10, 100, 500, 1000} is set against. ``normalize=False`` compares the raw vectors.

    Args:
        student_cls: ``W h_S[j][CLS]`` stacked over the matched layers, ``[B, M, D_T]`` (projected first).
        teacher_cls: ``h_T[m(j)][CLS]``, ``[B, M, D_T]``.
    """
    if student_cls.shape != teacher_cls.shape or student_cls.ndim != 3:
        raise ValueError(
            "[CLS] vectors must both be [B, M, D] (M matched layers, the same D: project the student first), "
            f"got student {list(student_cls.shape)} and teacher {list(teacher_cls.shape)}"
        )
    student, teacher = student_cls.float(), teacher_cls.float()
    if normalize:
        student, teacher = F.normalize(student, p=2, dim=-1), F.normalize(teacher, p=2, dim=-1)
    return (student - teacher).pow(2).mean()
