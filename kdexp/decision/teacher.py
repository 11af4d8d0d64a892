"""A decision-only view of a fine-tuned teacher: texts in, top-1 labels out, nothing else.

DBKD's setting is a black-box teacher (an API, a model behind a service) that answers each
query with its top-1 decision. :class:`DecisionTeacher` enforces it: its only public
operation is :meth:`DecisionTeacher.decide`, which returns a ``LongTensor`` of argmax labels.
The model, its tokenizer and every float it computes stay inside a closure built by
:func:`_make_decider`; the object has ``__slots__`` and no attribute that holds the model or
logits, so the methods that receive it cannot read logits by accident.

Queries are tokenised with the teacher's own tokenizer (truncated to ``max_length``), all at
once, then run in length-sorted batches under a token budget (`kdexp.inference`) and padded
per batch; the answers are returned in the order of the input.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from kdexp.hardware import Hardware
from kdexp.inference import PassBatching, PassProgress, length_sorted_batches
from kdexp.model_internals import forward_arguments

if TYPE_CHECKING:
    from kdexp.teacher import Teacher

log = logging.getLogger(__name__)

Query = str | tuple[str, str]


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
        if isinstance(queries[0], str):
            encoded = tokenizer(queries, truncation=True, max_length=max_length)
        else:
            encoded = tokenizer([q[0] for q in queries], [q[1] for q in queries], truncation=True,
                                max_length=max_length)
        encoded = {k: v for k, v in encoded.items() if k in forward_arguments(type(model))}
        lengths = [len(ids) for ids in encoded["input_ids"]]
        plan = hardware.shard(length_sorted_batches(lengths, batching))
        progress = PassProgress(f"teacher decisions ({len(queries)} queries)", sum(len(rows) for rows in plan))
        with hardware.inference():
            for rows in plan:
                batch = tokenizer.pad({k: [v[r] for r in rows] for k, v in encoded.items()}, return_tensors="pt")
                out[torch.tensor(rows)] = model(**hardware.to_device(dict(batch))).logits.argmax(dim=-1).cpu()
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
