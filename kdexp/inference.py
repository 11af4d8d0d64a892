"""Teacher passes over a whole split: length-sorted batches under a token budget.

Every signal computed once and cached (teacher logits, [CLS] vectors, MLM distributions, DBKD
decisions) is one forward pass over many rows in no particular order. Sorting the rows by
length and filling each batch up to ``tokens_per_batch`` (rows × longest row) pads almost
nothing; results are scattered back to row order by each batch's ``idx``. The batch plan is a
function of the lengths and the budget alone, so a pass is deterministic; it is part of the
signal's cache key (a different plan may change the last bits of a float), with the precision
it runs in (`kdexp.hardware.Hardware.inference`). Under DDP each process runs every
``world_size``-th batch of the same plan and the rows are put back together, so the result
is the one a single process gives.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kdexp.data import pad_batch, row_lengths

if TYPE_CHECKING:
    from kdexp.hardware import Hardware

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PassBatching:
    """How a teacher pass cuts its rows: at most ``max_rows`` rows and ``tokens_per_batch`` tokens."""

    tokens_per_batch: int = 16384
    max_rows: int = 128

    def key_parts(self) -> dict[str, Any]:
        return {"pass": "length_sorted", "tokens_per_batch": self.tokens_per_batch, "max_rows": self.max_rows}


def length_sorted_batches(lengths: Sequence[int] | np.ndarray, batching: PassBatching) -> list[list[int]]:
    """Row indices in batches of similar length, longest first (a batch too big fails at once).

    Each batch holds as many rows as fit ``rows × longest <= tokens_per_batch`` and
    ``rows <= max_rows``, and at least one row.
    """
    sizes = np.asarray(lengths, dtype=np.int64)
    order = np.lexsort((np.arange(len(sizes)), -sizes)).tolist()  # longest first, then by row
    lengths = sizes.tolist()
    batches: list[list[int]] = []
    current: list[int] = []
    for row in order:
        longest = lengths[current[0]] if current else lengths[row]  # rows come longest first
        if current and (len(current) >= batching.max_rows or (len(current) + 1) * longest > batching.tokens_per_batch):
            batches.append(current)
            current = []
        current.append(row)
    if current:
        batches.append(current)
    return batches


def length_sorted_loader(
    tokenized: Any,
    pad_token_id: int,
    batching: PassBatching,
    regression: bool = False,
    hardware: "Hardware | None" = None,
) -> torch.utils.data.DataLoader:
    """A loader over a tokenised split (with ``idx``) in length-sorted batches, padded per batch.

    With ``hardware`` of several processes, this process's share of the batches (`Hardware.shard`):
    the same batches, so each row's result is the one a single process computes.
    """
    batches = length_sorted_batches(row_lengths(tokenized), batching)
    return torch.utils.data.DataLoader(
        tokenized,
        batch_sampler=hardware.shard(batches) if hardware is not None else batches,
        collate_fn=lambda examples: pad_batch(examples, pad_token_id, regression),
    )


class PassProgress:
    """Rows done, rows/s and ETA of a pass: a progress bar on a terminal, a log line every minute elsewhere."""

    def __init__(self, name: str, total: int, log_every_seconds: float = 60.0) -> None:
        from tqdm.auto import tqdm

        self.name, self.total, self.done = name, total, 0
        self.started = self.last_log = time.perf_counter()
        self.log_every_seconds = log_every_seconds
        self.bar = tqdm(total=total, desc=name, unit="rows", disable=None, leave=False)

    def update(self, rows: int) -> None:
        self.done += rows
        self.bar.update(rows)
        now = time.perf_counter()
        if self.bar.disable and now - self.last_log > self.log_every_seconds:
            self.last_log = now
            rate = self.done / (now - self.started)
            log.info(
                "%s: %d / %d rows, %.0f rows/s, ETA %.0fs",
                self.name,
                self.done,
                self.total,
                rate,
                (self.total - self.done) / max(rate, 1e-9),
            )

    def close(self) -> float:
        """Ends the bar, logs the pass's speed, returns its seconds."""
        self.bar.close()
        seconds = time.perf_counter() - self.started
        log.info("%s: %d rows in %.1fs (%.0f rows/s)", self.name, self.done, seconds, self.done / max(seconds, 1e-9))
        return seconds
