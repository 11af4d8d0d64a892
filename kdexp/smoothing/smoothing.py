"""Text smoothing (Wu et al. 2020, arXiv 2005.03848), independent of any training framework.

Symbols follow the paper and ``docs/methods/text_smoothing.md``:

- ``x_t``: the token id at position ``t``;
- ``q_t = softmax(MLM(x)_t / tau)``: the masked language model's distribution over the
  vocabulary ``V`` at position ``t``, read from the *unmasked* input;
- ``p_t = lam * q_t + (1 - lam) * onehot(x_t)``: the smoothed token distribution
  (``lam`` is ``smooth_rate``); special tokens and padding stay ``onehot(x_t)``;
- ``e_t = p_t . W``: the student's input embedding, with ``W`` (``[V, H]``) the
  student's word-embedding matrix. The student adds position and segment embeddings
  as usual, e.g. ``model(inputs_embeds=e, attention_mask=..., token_type_ids=...)``.

A full ``|V|``-wide ``q_t`` per token is large, so ``q_t`` can be truncated to its
``top_k`` most probable tokens and renormalised. Truncation moves the embedding by
exactly ``lam * (1 - m_t) * (mu_tail - mu_head)``, where ``m_t`` is the probability
mass ``q_t`` gives its top ``k`` tokens, ``mu_head`` the mean embedding under the
renormalised head and ``mu_tail`` the mean embedding under the renormalised tail
(see :func:`topk_embedding_error_bound`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kdexp.losses.precision import full_precision


@dataclass(frozen=True)
class TokenDistributions:
    """One probability distribution over the vocabulary per token position.

    Two storage forms, so that callers handle a single type:

    - dense (``token_ids is None``): ``probs`` is ``[B, L, V]``;
    - sparse (top-k): ``probs`` and ``token_ids`` are ``[B, L, K]``; the distribution at a
      position is ``sum_j probs[..., j] * onehot(token_ids[..., j])``. An id may appear
      more than once at a position (the smoothed form appends ``x_t`` to the ``k`` MLM
      tokens); its probabilities then add up.

    ``vocab_size`` is ``V`` in both forms.
    """

    probs: Tensor
    token_ids: Tensor | None
    vocab_size: int

    def __post_init__(self) -> None:
        if self.token_ids is None:
            if self.probs.shape[-1] != self.vocab_size:
                raise ValueError(
                    f"dense distributions need a last dimension of vocab_size={self.vocab_size}, "
                    f"got shape {tuple(self.probs.shape)}"
                )
        elif self.token_ids.shape != self.probs.shape:
            raise ValueError(
                f"sparse distributions need probs and token_ids of one shape, got "
                f"{tuple(self.probs.shape)} and {tuple(self.token_ids.shape)}"
            )

    @property
    def is_dense(self) -> bool:
        return self.token_ids is None

    @property
    def sparse_token_ids(self) -> Tensor:
        """``token_ids`` of the sparse form; the dense form has none (ValueError)."""
        if self.token_ids is None:
            raise ValueError("dense distributions have no token ids")
        return self.token_ids

    def to_dense(self) -> Tensor:
        """The ``[B, L, V]`` form (materialises the full vocabulary: for tests and small ``V``)."""
        if self.token_ids is None:
            return self.probs
        dense = self.probs.new_zeros(*self.probs.shape[:-1], self.vocab_size)
        return dense.scatter_add(-1, self.token_ids, self.probs)


@full_precision
def mlm_token_distributions(
    mlm_logits: Tensor, temperature: float = 1.0, top_k: int | None = None
) -> TokenDistributions:
    """``q_t = softmax(MLM(x)_t / tau)`` from MLM logits ``[B, L, V]``; ``tau`` is ``temperature``.

    With ``top_k``, keep the ``k`` most probable tokens per position and renormalise
    them to sum to one (sparse form); without it, return the exact dense form.
    Computed in float32 whatever the logits' dtype.
    """
    if temperature <= 0:
        raise ValueError(f"temperature (tau) must be positive, got {temperature}")
    vocab_size = mlm_logits.shape[-1]
    scaled_logits = mlm_logits.float() / temperature
    if top_k is None:
        return TokenDistributions(scaled_logits.softmax(dim=-1), None, vocab_size)
    if not 1 <= top_k <= vocab_size:
        raise ValueError(f"top_k must be in [1, {vocab_size}] (the vocabulary size), got {top_k}")
    # softmax is monotone, so the k largest logits are the k most probable tokens, and a
    # softmax over just those logits is the renormalised truncation of q_t.
    top_logits, top_ids = scaled_logits.topk(top_k, dim=-1)
    return TokenDistributions(top_logits.softmax(dim=-1), top_ids, vocab_size)


def special_or_padding_mask(input_ids: Tensor, attention_mask: Tensor, special_token_ids: Iterable[int]) -> Tensor:
    """Boolean ``[B, L]`` mask of the positions that must stay one-hot: special tokens and padding."""
    special_ids = torch.tensor(sorted(set(special_token_ids)), dtype=input_ids.dtype, device=input_ids.device)
    return (attention_mask == 0) | torch.isin(input_ids, special_ids)


def smooth_token_distributions(
    distributions: TokenDistributions,
    input_ids: Tensor,
    keep_one_hot_mask: Tensor,
    smooth_rate: float = 0.5,
) -> TokenDistributions:
    """``p_t = lam * q_t + (1 - lam) * onehot(x_t)``, with ``lam`` = ``smooth_rate``.

    Positions where ``keep_one_hot_mask`` is true (special tokens, padding) get
    ``p_t = onehot(x_t)`` exactly, as does every position when ``smooth_rate == 0``.
    The result has the form of ``distributions``: dense ``[B, L, V]``, or sparse with
    ``K = k + 1`` entries (the ``k`` MLM tokens weighted by ``lam``, then ``x_t``
    weighted by ``1 - lam``).
    """
    if not 0.0 <= smooth_rate <= 1.0:
        raise ValueError(f"smooth_rate (lam) must be in [0, 1], got {smooth_rate}")
    positions_shape = distributions.probs.shape[:-1]
    if input_ids.shape != positions_shape or keep_one_hot_mask.shape != positions_shape:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)} and keep_one_hot_mask {tuple(keep_one_hot_mask.shape)} "
            f"must match the distributions' positions {tuple(positions_shape)}"
        )
    q = distributions.probs
    # Per-position rate: lam where smoothing applies, 0 where the token stays one-hot;
    # 0 * q_t is exactly 0, so those positions are exactly one-hot.
    rate = smooth_rate * (~keep_one_hot_mask.bool()).to(q.dtype).unsqueeze(-1)
    token_ids = input_ids.unsqueeze(-1)
    if distributions.token_ids is None:
        smoothed = torch.scatter_add(rate * q, -1, token_ids, 1.0 - rate)
        return TokenDistributions(smoothed, None, distributions.vocab_size)
    return TokenDistributions(
        torch.cat([rate * q, 1.0 - rate], dim=-1),
        torch.cat([distributions.token_ids, token_ids], dim=-1),
        distributions.vocab_size,
    )


@full_precision
def smoothed_inputs_embeds(smoothed: TokenDistributions, word_embeddings_weight: Tensor) -> Tensor:
    """``e_t = p_t . W``: ``[B, L, H]`` input embeddings from the student's word-embedding matrix ``W``.

    Dense form: one matmul. Sparse form: a weighted sum of the ``K`` gathered rows of
    ``W`` (``embedding_bag``, which never builds ``[B, L, V]`` nor ``[B, L, K, H]``).
    Gradients flow to ``W``; pass ``model.get_input_embeddings().weight``.
    """
    vocab_size, hidden_size = word_embeddings_weight.shape
    if smoothed.vocab_size != vocab_size:
        raise ValueError(
            f"the distributions cover {smoothed.vocab_size} tokens but the word-embedding matrix has "
            f"{vocab_size} rows: the MLM teacher and the student must share one vocabulary"
        )
    probs = smoothed.probs.to(word_embeddings_weight.dtype)
    if smoothed.token_ids is None:
        return probs @ word_embeddings_weight
    positions_shape = probs.shape[:-1]
    num_entries = probs.shape[-1]
    embeds = F.embedding_bag(
        smoothed.token_ids.reshape(-1, num_entries),
        word_embeddings_weight,
        per_sample_weights=probs.reshape(-1, num_entries),
        mode="sum",
    )
    return embeds.reshape(*positions_shape, hidden_size)


@full_precision
def topk_retained_mass(mlm_logits: Tensor, top_k: int, temperature: float = 1.0) -> Tensor:
    """``m_t``: the probability mass ``q_t`` gives its ``top_k`` most probable tokens, ``[B, L]``."""
    q = (mlm_logits.float() / temperature).softmax(dim=-1)
    return q.topk(top_k, dim=-1).values.sum(dim=-1)


def topk_embedding_error_bound(
    retained_mass: Tensor, word_embeddings_weight: Tensor, smooth_rate: float = 0.5
) -> Tensor:
    """Bound on ``||e_exact_t - e_topk_t||_2`` at a smoothed position, from its retained mass ``m_t``.

    The truncation error is ``lam * (q_t - q~_t) . W`` with ``q~_t`` the renormalised
    head of ``q_t``, and ``q_t - q~_t = (1 - m_t) * (r_t - q~_t)`` with ``r_t`` the
    renormalised tail. ``r_t . W`` and ``q~_t . W`` are convex combinations of rows of
    ``W``, so they differ by at most ``2 * max_v ||W[v]||``:

        ``||e_exact_t - e_topk_t|| = lam * (1 - m_t) * ||(r_t - q~_t) . W||
                                   <= 2 * lam * (1 - m_t) * max_v ||W[v]||``

    It vanishes at ``k = V`` (``m_t = 1``). Positions kept one-hot have no error at all.
    """
    max_row_norm = word_embeddings_weight.detach().float().norm(dim=-1).max()
    return 2.0 * smooth_rate * (1.0 - retained_mass).clamp_min(0.0) * max_row_norm


@dataclass(frozen=True)
class TopKEmbeddingError:
    """How far the top-k smoothed embeddings are from the exact ones, over smoothed positions."""

    top_k: int
    max_abs_difference: float
    relative_l2_difference: float
    max_l2_difference: float
    max_l2_bound: float
    min_retained_mass: float
    mean_retained_mass: float


def measure_topk_embedding_error(
    mlm_logits: Tensor,
    input_ids: Tensor,
    keep_one_hot_mask: Tensor,
    word_embeddings_weight: Tensor,
    top_ks: Sequence[int],
    smooth_rate: float = 0.5,
    temperature: float = 1.0,
) -> list[TopKEmbeddingError]:
    """Compare ``e_topk`` against the exact ``e`` for each ``k`` in ``top_ks``, over the smoothed positions.

    ``relative_l2_difference`` is ``||E_topk - E_exact||_F / ||E_exact||_F``; ``max_l2_bound``
    is the largest per-position value of :func:`topk_embedding_error_bound`. Holds
    ``[N, V]`` floats for the ``N`` smoothed positions. Near ``k = V`` the measured
    difference is float32 round-off (about ``1e-5`` for ``V = 30522``), which can exceed
    the vanishing bound.
    """
    smoothed_positions = ~keep_one_hot_mask.bool()
    if not smoothed_positions.any():
        raise ValueError("keep_one_hot_mask keeps every position one-hot: there is no smoothing to measure")
    with torch.no_grad():
        weight = word_embeddings_weight.detach().float()
        # The smoothed positions as a batch of one sequence, none of them kept one-hot.
        logits = mlm_logits[smoothed_positions].unsqueeze(0)
        token_ids = input_ids[smoothed_positions].unsqueeze(0)
        nothing_kept = torch.zeros_like(token_ids, dtype=torch.bool)
        exact_distributions = mlm_token_distributions(logits, temperature)
        exact = smoothed_inputs_embeds(
            smooth_token_distributions(exact_distributions, token_ids, nothing_kept, smooth_rate), weight
        )
        errors = []
        for top_k in top_ks:
            truncated_distributions = mlm_token_distributions(logits, temperature, top_k)
            truncated = smoothed_inputs_embeds(
                smooth_token_distributions(truncated_distributions, token_ids, nothing_kept, smooth_rate), weight
            )
            difference = truncated - exact
            retained_mass = exact_distributions.probs.gather(-1, truncated_distributions.sparse_token_ids).sum(dim=-1)
            bound = topk_embedding_error_bound(retained_mass, weight, smooth_rate)
            errors.append(
                TopKEmbeddingError(
                    top_k=top_k,
                    max_abs_difference=difference.abs().max().item(),
                    relative_l2_difference=(difference.norm() / exact.norm()).item(),
                    max_l2_difference=difference.norm(dim=-1).max().item(),
                    max_l2_bound=bound.max().item(),
                    min_retained_mass=retained_mass.min().item(),
                    mean_retained_mass=retained_mass.mean().item(),
                )
            )
        return errors
