"""A decision-only view of a fine-tuned teacher: texts in, top-1 labels out, nothing else.

DBKD's setting is a black-box teacher (an API, a model behind a service) that answers each
query with its top-1 decision. :class:`DecisionTeacher` enforces it: its only public
operation is :meth:`DecisionTeacher.decide`, which returns a ``LongTensor`` of argmax labels.
The model, its tokenizer and every float it computes stay inside a closure built by
:func:`_make_decider`; the object has ``__slots__`` and no attribute that holds the model or
logits, so the methods that receive it cannot read logits by accident.

Queries are tokenised with the teacher's own tokenizer (truncated to ``max_length``) and packed
flat (`EncodedQueries`, a few bytes a token), then run in length-sorted batches under a token
budget (`kdexp.inference`) and padded per batch; the answers are returned in the order of the input.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kdexp.hardware import Hardware
from kdexp.inference import PassBatching, PassProgress, length_sorted_batches
from kdexp.model_internals import forward_arguments

if TYPE_CHECKING:
    from kdexp.teacher import Teacher

log = logging.getLogger(__name__)

Query = str | tuple[str, str]


# Queries tokenised per call of the tokenizer: its Python lists live only this long.
ENCODE_BATCH = 8192


@dataclass(frozen=True)
class EncodedQueries:
    """Tokenised queries packed flat: row ``i``'s token ids are ``ids[offsets[i]:offsets[i + 1]]`` (and its
    segment ids in ``segments``, for models that take them). 5 bytes a token, where the tokenizer's Python
    lists take about 100: MNLI's 3.9M queries of one DBKD stage fit in memory chunk by chunk."""

    ids: np.ndarray
    segments: np.ndarray | None
    offsets: np.ndarray

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def batch(self, rows: Sequence[int], pad_token_id: int) -> dict[str, torch.Tensor]:
        """Rows ``rows`` padded to the longest: ``input_ids``, ``attention_mask`` (and ``token_type_ids``)."""
        lengths = self.lengths[list(rows)]
        input_ids = np.full((len(rows), int(lengths.max())), pad_token_id, dtype=np.int64)
        segments = np.zeros_like(input_ids) if self.segments is not None else None
        for slot, row in enumerate(rows):
            start, stop = self.offsets[row], self.offsets[row + 1]
            input_ids[slot, : stop - start] = self.ids[start:stop]
            if segments is not None:
                segments[slot, : stop - start] = self.segments[start:stop]  # type: ignore[index]
        batch = {"input_ids": torch.from_numpy(input_ids),
                 "attention_mask": torch.from_numpy((np.arange(input_ids.shape[1]) < lengths[:, None]).astype(np.int64))}
        if segments is not None:
            batch["token_type_ids"] = torch.from_numpy(segments)
        return batch


def encode_queries(tokenizer: Any, queries: Sequence[Query], max_length: int, with_segments: bool) -> EncodedQueries:
    """Tokenise ``queries`` (texts or pairs, truncated to ``max_length``), `ENCODE_BATCH` at a time, packed flat."""
    ids: list[np.ndarray] = []
    segments: list[np.ndarray] = []
    lengths: list[np.ndarray] = []
    for start in range(0, len(queries), ENCODE_BATCH):
        part = queries[start:start + ENCODE_BATCH]
        texts = [part] if isinstance(part[0], str) else [[q[0] for q in part], [q[1] for q in part]]
        encoded = tokenizer(*texts, truncation=True, max_length=max_length, return_attention_mask=False,
                            return_token_type_ids=with_segments)
        lengths.append(np.fromiter(map(len, encoded["input_ids"]), dtype=np.int64, count=len(part)))
        ids.append(np.fromiter(itertools.chain.from_iterable(encoded["input_ids"]), dtype=np.int32))
        if with_segments:
            segments.append(np.fromiter(itertools.chain.from_iterable(encoded["token_type_ids"]), dtype=np.int8))
    offsets = np.zeros(len(queries) + 1, dtype=np.int64)
    np.cumsum(np.concatenate(lengths), out=offsets[1:])
    return EncodedQueries(np.concatenate(ids), np.concatenate(segments) if with_segments else None, offsets)


def _make_decider(
    load_model: Callable[[], torch.nn.Module],
    tokenizer: Any,
    max_length: int,
    batching: PassBatching,
    hardware: Hardware,
) -> Callable[[Sequence[Query]], torch.Tensor]:
    """A function ``queries -> LongTensor`` of top-1 labels; the model is loaded on first use.

    Under DDP every process answers its share of the batches (`Hardware.shard`) and every
    process returns all the answers (`Hardware.combine_rows`).
    """
    holder: list[torch.nn.Module] = []

    def decide(queries: Sequence[Query]) -> torch.Tensor:
        if not holder:
            holder.append(hardware.to_device(load_model().eval().requires_grad_(False)))
        model = holder[0]
        queries = list(queries)
        out = torch.zeros(len(queries), dtype=torch.long)
        if not queries:
            return out
        encoded = encode_queries(tokenizer, queries, max_length, "token_type_ids" in forward_arguments(type(model)))
        plan = hardware.shard(length_sorted_batches(encoded.lengths, batching))
        progress = PassProgress(f"teacher decisions ({len(queries)} queries)", sum(len(rows) for rows in plan))
        with hardware.inference():
            for rows in plan:
                batch = hardware.to_device(encoded.batch(rows, tokenizer.pad_token_id or 0))
                out[torch.tensor(rows)] = model(**batch).logits.argmax(dim=-1).cpu()
                progress.update(len(rows))
        progress.close()
        return hardware.combine_rows(out)

    return decide


class DecisionTeacher:
    """A teacher that answers only with its top-1 decision.

    Args:
        decide_fn: the closure that runs the hidden model (see :meth:`from_teacher`).
        key: the teacher's cache key (identifies it in query-cache keys).
        num_labels: number of classes ``C``.
        identity: what determines the answers besides the model (tokenizer, maximum length),
            used in the query-cache key.
    """

    __slots__ = ("_decide_fn", "key", "num_labels", "identity", "hardware", "queries_answered", "calls")

    def __init__(self, decide_fn: Callable[[Sequence[Query]], torch.Tensor], key: str, num_labels: int,
                 identity: dict[str, Any] | None = None, hardware: Hardware | None = None):
        self._decide_fn = decide_fn
        self.key = key
        self.num_labels = num_labels
        self.identity = dict(identity or {})
        self.hardware = hardware or Hardware()  # where the answers are computed (several processes share them)
        self.queries_answered = 0
        self.calls = 0

    @classmethod
    def from_teacher(cls, teacher: "Teacher", max_length: int, batch_size: int | None = None) -> "DecisionTeacher":
        """Wrap a fine-tuned :class:`~kdexp.teacher.Teacher` (its model is loaded on the first query)."""
        from kdexp.data import tokenizer_fingerprint

        batching = PassBatching(teacher.eval_tokens_per_batch, batch_size or teacher.eval_batch_size)
        decide_fn = _make_decider(teacher.load_model, teacher.tokenizer, max_length, batching, teacher.hardware)
        identity = {"tokenizer": tokenizer_fingerprint(teacher.tokenizer), "max_length": max_length,
                    **teacher.pass_key_parts(), **batching.key_parts()}
        return cls(decide_fn, teacher.key, teacher.task.num_labels, identity, teacher.hardware)

    def decide(self, queries: Sequence[Query]) -> torch.Tensor:
        """Top-1 labels (``LongTensor [len(queries)]``) for texts or ``(text_a, text_b)`` pairs."""
        labels = self._decide_fn(queries)
        if labels.dtype != torch.long:  # the contract, whatever the closure does
            raise TypeError(f"a decision teacher must answer with integer labels, got {labels.dtype}")
        self.queries_answered += len(labels)
        self.calls += 1
        return labels

    def __repr__(self) -> str:
        return f"DecisionTeacher(key={self.key!r}, num_labels={self.num_labels}, queries_answered={self.queries_answered})"
