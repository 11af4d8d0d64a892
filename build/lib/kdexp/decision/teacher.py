"""A decision-only view of a fine-tuned teacher: texts in, top-1 labels out, nothing else.

DBKD's setting is a black-box teacher (an API, a model behind a service) that answers each
query with its top-1 decision. :class:`DecisionTeacher` enforces it: its only public
operation is :meth:`DecisionTeacher.decide`, which returns a ``LongTensor`` of argmax labels.
The model, its tokenizer and every float it computes stay inside a closure built by
:func:`_make_decider`; the object has ``__slots__`` and no attribute that holds the model or
logits, so the methods that receive it cannot read logits by accident.

Queries are tokenised with the teacher's own tokenizer (truncated to ``max_length``), padded
per batch, and sorted by length inside each call so that batches hold texts of similar
length (less padding on CPU); the answers are returned in the order of the input.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from kdexp.teacher import Teacher

log = logging.getLogger(__name__)

Query = str | tuple[str, str]
PROGRESS_EVERY_SECONDS = 60.0


def _make_decider(
    load_model: Callable[[], torch.nn.Module],
    tokenizer: Any,
    max_length: int,
    batch_size: int,
    device: torch.device,
) -> Callable[[Sequence[Query]], torch.Tensor]:
    """A function ``queries -> LongTensor`` of top-1 labels; the model is loaded on first use."""
    holder: list[torch.nn.Module] = []

    @torch.no_grad()
    def decide(queries: Sequence[Query]) -> torch.Tensor:
        if not holder:
            holder.append(load_model().eval().requires_grad_(False).to(device))
        model = holder[0]
        queries = list(queries)
        out = torch.empty(len(queries), dtype=torch.long)
        if not queries:
            return out
        pairs = not isinstance(queries[0], str)
        lengths = [len(q) if isinstance(q, str) else len(q[0]) + len(q[1]) for q in queries]
        order = sorted(range(len(queries)), key=lengths.__getitem__)
        started = last_report = time.perf_counter()
        for start in range(0, len(order), batch_size):
            if time.perf_counter() - last_report > PROGRESS_EVERY_SECONDS:
                last_report = time.perf_counter()
                log.info("Teacher decisions: %d / %d queries (%.0fs)", start, len(order), last_report - started)
            rows = order[start : start + batch_size]
            if pairs:
                first = [queries[r][0] for r in rows]
                second = [queries[r][1] for r in rows]
                enc = tokenizer(first, second, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
            else:
                enc = tokenizer([queries[r] for r in rows], truncation=True, max_length=max_length, padding=True,
                                return_tensors="pt")
            enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
            out[torch.tensor(rows)] = model(**enc).logits.argmax(dim=-1).cpu()
        return out

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

    __slots__ = ("_decide_fn", "key", "num_labels", "identity", "queries_answered", "calls")

    def __init__(self, decide_fn: Callable[[Sequence[Query]], torch.Tensor], key: str, num_labels: int,
                 identity: dict[str, Any] | None = None):
        self._decide_fn = decide_fn
        self.key = key
        self.num_labels = num_labels
        self.identity = dict(identity or {})
        self.queries_answered = 0
        self.calls = 0

    @classmethod
    def from_teacher(cls, teacher: "Teacher", max_length: int, batch_size: int | None = None) -> "DecisionTeacher":
        """Wrap a fine-tuned :class:`~kdexp.teacher.Teacher` (its model is loaded on the first query)."""
        from kdexp.data import tokenizer_fingerprint

        decide_fn = _make_decider(teacher.load_model, teacher.tokenizer, max_length,
                                  batch_size or teacher.eval_batch_size, teacher.device)
        identity = {"tokenizer": tokenizer_fingerprint(teacher.tokenizer), "max_length": max_length}
        return cls(decide_fn, teacher.key, teacher.task.num_labels, identity)

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
