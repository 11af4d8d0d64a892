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
from transformers import AutoConfig

from kdexp import families
from kdexp.families import multiple_choice, output_logits
from kdexp.hardware import Hardware
from kdexp.inference import PassBatching, PassProgress, length_sorted_batches
from kdexp.model_internals import forward_arguments
from kdexp.tasks import MULTIPLE_CHOICE, GlueTask

if TYPE_CHECKING:
    from kdexp.teacher import Teacher

log = logging.getLogger(__name__)

Query = str | tuple[str, ...]  # a text, a pair, or (passage, question, option, ...) for multiple choice


# Sequences tokenised per call of the tokenizer: its Python lists live only this long.
ENCODE_BATCH = 8192


@dataclass(frozen=True)
class EncodedQueries:
    """Tokenised queries packed flat: sequence ``j``'s token ids are ``ids[offsets[j]:offsets[j + 1]]`` (and its
    segment ids in ``segments``, for models that take them); query ``i`` is sequences ``i·per_query`` to
    ``(i + 1)·per_query - 1`` (a multiple-choice query read by an encoder is one sequence per option). 5 bytes
    a token, where the tokenizer's Python lists take about 100: MNLI's 3.9M queries of one DBKD stage fit
    in memory chunk by chunk."""

    ids: np.ndarray
    segments: np.ndarray | None
    offsets: np.ndarray
    per_query: int = 1

    @property
    def lengths(self) -> np.ndarray:
        """Each query's tokens as a batch counts them: its sequences times the longest of them."""
        longest = np.diff(self.offsets).reshape(-1, self.per_query).max(axis=1)
        return longest * self.per_query

    def batch(self, rows: Sequence[int], pad_token_id: int) -> dict[str, torch.Tensor]:
        """Queries ``rows`` padded to the longest sequence: ``input_ids``, ``attention_mask`` (and
        ``token_type_ids``), ``[B, L]`` or ``[B, C, L]``."""
        sequences = [row * self.per_query + k for row in rows for k in range(self.per_query)]
        lengths = np.diff(self.offsets)[sequences]
        input_ids = np.full((len(sequences), int(lengths.max())), pad_token_id, dtype=np.int64)
        segments = np.zeros_like(input_ids) if self.segments is not None else None
        for slot, sequence in enumerate(sequences):
            start, stop = self.offsets[sequence], self.offsets[sequence + 1]
            input_ids[slot, : stop - start] = self.ids[start:stop]
            if segments is not None:
                segments[slot, : stop - start] = self.segments[start:stop]  # type: ignore[index]
        batch = {"input_ids": input_ids, "attention_mask": (np.arange(input_ids.shape[1]) < lengths[:, None])}
        if segments is not None:
            batch["token_type_ids"] = segments
        shape = (len(rows), self.per_query, -1) if self.per_query > 1 else (len(rows), -1)
        return {name: torch.from_numpy(values.astype(np.int64)).view(*shape) for name, values in batch.items()}


def query_tokenizer(
    tokenizer: Any, max_length: int, with_segments: bool, task: GlueTask | None, form: str = "pairs"
) -> tuple[Callable[[Sequence[Query]], dict[str, list]], int]:
    """How a chunk of queries is tokenised (texts, pairs; multiple choice: one sequence per option, or one
    prompt), and the number of sequences per query."""
    if task is not None and task.family == MULTIPLE_CHOICE:

        def as_rows(part: Sequence[Query]) -> dict[str, list]:
            return {
                "context": [q[0] for q in part],
                "question": [q[1] for q in part],
                "choices": [list(q[2:]) for q in part],
                "label": [0] * len(part),
            }

        if form == "prompt":
            return (
                lambda part: multiple_choice.prompts(as_rows(part), tokenizer, max_length, cut_long_options=True)
            ), 1

        def option_sequences(part: Sequence[Query]) -> dict[str, list]:
            encoded = multiple_choice.option_pairs(as_rows(part), tokenizer, max_length, cut_long_options=True)
            return {
                name: [seq for row in encoded[name] for seq in row]
                for name in ("input_ids", "token_type_ids")
                if name in encoded
            }

        return option_sequences, task.num_labels

    def texts_or_pairs(part: Sequence[Query]) -> dict[str, list]:
        texts = [part] if isinstance(part[0], str) else [[q[0] for q in part], [q[1] for q in part]]
        return tokenizer(
            *texts,
            truncation=True,
            max_length=max_length,
            return_attention_mask=False,
            return_token_type_ids=with_segments,
        )

    return texts_or_pairs, 1


def encode_queries(
    tokenizer: Any,
    queries: Sequence[Query],
    max_length: int,
    with_segments: bool,
    task: GlueTask | None = None,
    form: str = "pairs",
) -> EncodedQueries:
    """Tokenise ``queries`` (`query_tokenizer`), `ENCODE_BATCH` sequences at a time (a multiple-choice query is
    one per option), packed flat."""
    tokenize, per_query = query_tokenizer(tokenizer, max_length, with_segments, task, form)
    ids: list[np.ndarray] = []
    segments: list[np.ndarray] = []
    lengths: list[np.ndarray] = []
    batch = max(1, ENCODE_BATCH // per_query)
    for start in range(0, len(queries), batch):
        encoded = tokenize(queries[start : start + batch])
        lengths.append(np.fromiter(map(len, encoded["input_ids"]), dtype=np.int64, count=len(encoded["input_ids"])))
        ids.append(np.fromiter(itertools.chain.from_iterable(encoded["input_ids"]), dtype=np.int32))
        if with_segments and "token_type_ids" in encoded:
            segments.append(np.fromiter(itertools.chain.from_iterable(encoded["token_type_ids"]), dtype=np.int8))
    offsets = np.zeros(len(queries) * per_query + 1, dtype=np.int64)
    np.cumsum(np.concatenate(lengths), out=offsets[1:])
    return EncodedQueries(np.concatenate(ids), np.concatenate(segments) if segments else None, offsets, per_query)


def _make_decider(
    load_model: Callable[[], torch.nn.Module],
    tokenizer: Any,
    max_length: int,
    batching: PassBatching,
    hardware: Hardware,
    task: GlueTask | None = None,
    form: str = "pairs",
    tally: dict[str, int] | None = None,
) -> Callable[[Sequence[Query]], torch.Tensor]:
    """A function ``queries -> LongTensor`` of top-1 labels; the model is loaded on first use.

    Under DDP every process answers its share of the batches (`Hardware.shard`) and every
    process returns all the answers (`Hardware.combine_rows`). A decoder answering through label words
    adds to ``tally["off_label"]`` the queries whose top next token was no label word (`kdexp.families.label_words`).
    """
    holder: list[torch.nn.Module] = []

    def decide(queries: Sequence[Query]) -> torch.Tensor:
        if not holder:
            holder.append(hardware.to_device(load_model().eval().requires_grad_(False)))
        model = holder[0]
        queries = list(queries)
        out = torch.zeros(len(queries), dtype=torch.long)
        off_label = torch.zeros(len(queries), dtype=torch.long)
        if not queries:
            return out
        with_segments = "token_type_ids" in forward_arguments(type(model))
        encoded = encode_queries(tokenizer, queries, max_length, with_segments, task, form)
        plan = hardware.shard(length_sorted_batches(encoded.lengths, batching))
        progress = PassProgress(f"teacher decisions ({len(queries)} queries)", sum(len(rows) for rows in plan))
        with hardware.inference():
            for rows in plan:
                batch = hardware.to_device(encoded.batch(rows, tokenizer.pad_token_id or 0))
                output = model(**batch)
                out[torch.tensor(rows)] = output_logits(output, batch).argmax(dim=-1).cpu()
                next_token_logits = getattr(output, "next_token_logits", None)
                if next_token_logits is not None:
                    top = next_token_logits.argmax(dim=-1)
                    word_ids = model.word_ids  # a LabelWordChoiceModel's
                    assert isinstance(word_ids, torch.Tensor)
                    off_label[torch.tensor(rows)] = (~torch.isin(top, word_ids)).long().cpu()
                progress.update(len(rows))
        progress.close()
        if tally is not None and hasattr(model, "word_ids"):
            tally["off_label"] = tally.get("off_label", 0) + int(hardware.combine_rows(off_label).sum())
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

    __slots__ = ("_decide_fn", "key", "num_labels", "identity", "hardware", "queries_answered", "calls", "tally")

    def __init__(
        self,
        decide_fn: Callable[[Sequence[Query]], torch.Tensor],
        key: str,
        num_labels: int,
        identity: dict[str, Any] | None = None,
        hardware: Hardware | None = None,
    ):
        self._decide_fn = decide_fn
        self.key = key
        self.num_labels = num_labels
        self.identity = dict(identity or {})
        self.hardware = hardware or Hardware()  # where the answers are computed (several processes share them)
        self.queries_answered = 0
        self.calls = 0
        self.tally: dict[str, int] = {}  # what the closure counts besides the answers (`off_label` for a decoder)

    @classmethod
    def from_teacher(cls, teacher: "Teacher", max_length: int, batch_size: int | None = None) -> "DecisionTeacher":
        """Wrap a fine-tuned :class:`~kdexp.teacher.Teacher` (its model is loaded on the first query)."""
        from kdexp.data import InputForm, tokenizer_fingerprint

        batching = PassBatching(teacher.eval_tokens_per_batch, batch_size or teacher.eval_batch_size)
        form = families.input_form(AutoConfig.from_pretrained(teacher.path))
        tally: dict[str, int] = {}
        decide_fn = _make_decider(
            teacher.load_model, teacher.tokenizer, max_length, batching, teacher.hardware, teacher.task, form, tally
        )
        identity = {
            "tokenizer": tokenizer_fingerprint(teacher.tokenizer),
            "max_length": max_length,
            **teacher.pass_key_parts(),
            **batching.key_parts(),
            **InputForm(form).key_parts(teacher.task),  # how queries become inputs (MC: form and its version)
        }
        decision_teacher = cls(decide_fn, teacher.key, teacher.task.num_labels, identity, teacher.hardware)
        decision_teacher.tally = tally
        return decision_teacher

    def decide(self, queries: Sequence[Query]) -> torch.Tensor:
        """Top-1 labels (``LongTensor [len(queries)]``) for texts or ``(text_a, text_b)`` pairs."""
        labels = self._decide_fn(queries)
        if labels.dtype != torch.long:  # the contract, whatever the closure does
            raise TypeError(f"a decision teacher must answer with integer labels, got {labels.dtype}")
        self.queries_answered += len(labels)
        self.calls += 1
        return labels

    def __repr__(self) -> str:
        return (
            f"DecisionTeacher(key={self.key!r}, num_labels={self.num_labels}, queries_answered={self.queries_answered})"
        )
