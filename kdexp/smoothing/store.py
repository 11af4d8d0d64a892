"""The MLM's top-k token distributions of a whole tokenised split, stored once and read by row.

``q_t`` depends only on the input and the MLM (not on the student), so a sweep over
students, seeds and methods can compute it once per (MLM, tokenised split, ``tau``, ``k``).
The store is *ragged*: the real (non-padding) tokens of every example, one after the
other, ``T`` rows in all, with ``offsets[i]:offsets[i + 1]`` the rows of example ``i``:

- ``probs``: ``[T, k]`` float16, the renormalised top-k probabilities of ``q_t``;
- ``token_ids``: ``[T, k]`` int32, their token ids;
- ``offsets``: ``[N + 1]`` int64.

That is ``6·k`` bytes per token (``k = 64``: 384 bytes), against ``2·|V|`` bytes per token
for a float16 dense ``q_t`` (``|V| = 30,522``: 61 kB, 160 times more), which is why the
exact dense form is never stored but computed live. Special tokens are stored like every
real token (2–3 rows per example), which keeps the lookup a plain slice; they are kept
one-hot when smoothing anyway.

Reading a batch rebuilds ``[B, L, k]`` (zeros at padding, which stays one-hot) and
renormalises each row in float32, so the float16 rounding never changes the total mass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

import torch
from torch import Tensor

from kdexp.hardware import Hardware
from kdexp.model_internals import model_inputs
from kdexp.smoothing.heads import masked_lm_head
from kdexp.smoothing.smoothing import TokenDistributions, mlm_token_distributions

if TYPE_CHECKING:
    from transformers import PreTrainedModel

BYTES_PER_TOKEN_AND_K = 2 + 4  # float16 probability + int32 token id


def store_bytes(num_tokens: int, top_k: int) -> int:
    """Size of a store of ``num_tokens`` real tokens with ``top_k`` entries each (offsets excluded)."""
    return num_tokens * top_k * BYTES_PER_TOKEN_AND_K


@torch.no_grad()
def topk_distributions_at(
    mlm: PreTrainedModel,
    input_ids: Tensor,
    attention_mask: Tensor,
    token_type_ids: Tensor | None,
    positions: Tensor,
    top_k: int,
    temperature: float = 1.0,
    chunk_size: int = 1024,
) -> TokenDistributions:
    """Top-k ``q_t`` at the ``P`` selected positions, as sparse ``[1, P, k]`` distributions.

    The vocabulary projection (`kdexp.smoothing.heads`) runs ``chunk_size`` positions at a time,
    so the peak is ``chunk_size x |V|`` logits (125 MB for 1,024 x 30,522), not ``P x |V|``
    (500 MB for a batch of 32 x 128 tokens).
    """
    inputs = model_inputs(
        {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}, mlm.base_model
    )
    head = masked_lm_head(mlm)
    hidden_states = mlm.base_model(**inputs).last_hidden_state[positions]
    parts = [
        mlm_token_distributions(head(hidden_states[start : start + chunk_size]).unsqueeze(0), temperature, top_k)
        for start in range(0, hidden_states.shape[0], chunk_size)
    ]
    if not parts:
        raise ValueError("no positions selected")
    return TokenDistributions(
        torch.cat([part.probs for part in parts], dim=1),
        torch.cat([part.sparse_token_ids for part in parts], dim=1),
        parts[0].vocab_size,
    )


@dataclass(frozen=True)
class TopKTokenStore:
    """Top-k ``q_t`` of every real token of a split, ragged by example (see the module docstring)."""

    offsets: Tensor
    probs: Tensor
    token_ids: Tensor
    vocab_size: int

    def __post_init__(self) -> None:
        if self.probs.shape != self.token_ids.shape or self.probs.dim() != 2:
            raise ValueError(
                f"probs and token_ids must both be [T, k]: {tuple(self.probs.shape)}, {tuple(self.token_ids.shape)}"
            )
        if int(self.offsets[-1]) != self.probs.shape[0]:
            raise ValueError(f"offsets end at {int(self.offsets[-1])} but the store has {self.probs.shape[0]} rows")

    @property
    def top_k(self) -> int:
        return int(self.probs.shape[1])

    @property
    def num_rows(self) -> int:
        return int(self.offsets.numel() - 1)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.offsets, self.probs, self.token_ids))

    def tensors(self) -> dict[str, Tensor]:
        return {"offsets": self.offsets, "probs": self.probs, "token_ids": self.token_ids}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], vocab_size: int) -> "TopKTokenStore":
        return cls(tensors["offsets"], tensors["probs"], tensors["token_ids"], vocab_size)

    def distributions(self, idx: Tensor, attention_mask: Tensor) -> TokenDistributions:
        """``q_t`` for the batch of rows ``idx`` padded like ``attention_mask`` ``[B, L]``: sparse ``[B, L, k]``.

        The batch must be right-padded (real tokens first) with as many real tokens per row
        as the store holds for it; anything else means the store was built from other data.
        """
        idx = idx.to("cpu", torch.long)
        mask = attention_mask.to("cpu").bool()
        starts = self.offsets[idx]
        lengths = self.offsets[idx + 1] - starts
        positions = torch.arange(mask.shape[1])
        real = positions.unsqueeze(0) < lengths.unsqueeze(1)
        if not torch.equal(real, mask):
            raise ValueError(
                "the MLM distribution store does not match this batch (token counts or padding differ): "
                "it was built from another tokenisation of the split"
            )
        rows = torch.where(real, starts.unsqueeze(1) + positions, torch.zeros_like(starts).unsqueeze(1))
        probs = self.probs[rows].float() * real.unsqueeze(-1)
        probs = probs / probs.sum(dim=-1, keepdim=True).clamp_min(1e-12)
        token_ids = self.token_ids[rows].long() * real.unsqueeze(-1)
        return TokenDistributions(probs, token_ids, self.vocab_size)


@torch.no_grad()
def build_topk_store(
    mlm: PreTrainedModel,
    batches: Iterable[dict[str, Tensor]],
    lengths: list[int],
    top_k: int,
    temperature: float = 1.0,
    hardware: Hardware | None = None,
) -> TopKTokenStore:
    """Run the MLM over ``batches`` (with ``idx``, ``input_ids``, ``attention_mask``) and keep top-k ``q_t``.

    ``lengths[i]`` is the number of real tokens of row ``i``; every row must come in one batch
    (under DDP: in one batch of one process, `kdexp.inference.length_sorted_loader` with the
    same ``hardware``; the rows are put back together on every process).
    """
    hardware = hardware or Hardware()
    lengths_tensor = torch.tensor(lengths, dtype=torch.long)
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.long)
    offsets[1:] = lengths_tensor.cumsum(0)
    total = int(offsets[-1])
    probs = torch.zeros(total, top_k, dtype=torch.float16)
    token_ids = torch.zeros(total, top_k, dtype=torch.int32)
    filled = torch.zeros(len(lengths), dtype=torch.int32)
    vocab_size = int(mlm.config.vocab_size)
    with hardware.inference():
        for batch in batches:
            attention_mask = batch["attention_mask"]
            real = attention_mask.bool()
            if not torch.equal(real.sum(dim=1), lengths_tensor[batch["idx"]]):
                raise ValueError("a batch's real-token counts differ from the lengths given for its rows")
            q = topk_distributions_at(
                mlm,
                hardware.to_device(batch["input_ids"]),
                hardware.to_device(attention_mask),
                hardware.to_device(batch["token_type_ids"]) if "token_type_ids" in batch else None,
                hardware.to_device(real),
                top_k,
                temperature,
            )
            vocab_size = q.vocab_size
            # Rows of the batch in order, each row's real tokens left to right: the store's layout.
            starts = offsets[batch["idx"]]
            target = (starts.unsqueeze(1) + torch.arange(real.shape[1])).masked_select(real)
            probs[target] = q.probs[0].cpu().half()
            token_ids[target] = q.sparse_token_ids[0].cpu().int()
            filled[batch["idx"]] = 1
    for rows in (probs, token_ids, filled):
        hardware.combine_rows(rows)
    if not bool((filled == 1).all()):
        raise ValueError(f"the batches covered {int((filled > 0).sum())} of {len(lengths)} rows")
    return TopKTokenStore(offsets, probs, token_ids, vocab_size)
