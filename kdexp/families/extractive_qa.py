"""Extractive question answering (SQuAD v1.1 and v2.0): reading, windows, and EM/F1 over whole examples.

A row of the raw split is a question on a passage (``id``, ``title``, ``context``, ``question``,
``answers``); the model reads strided windows of it (`kdexp.families.qa_core.qa_features`: each
feature a window, with its example's index, its tokens' character offsets and the positions a
span may use), and gives two distributions over each window's tokens, start and end. As one
tensor that is ``[B, 2, L]``, positions outside the passage set to `MASKED_LOGIT` (the first token,
the no-answer position, stays): every loss on logits (cross-entropy with the answer's start and
end, KD on the two distributions) then works on it unchanged. `QAMetrics` gathers the logits of
every window of the dev split and scores whole examples with the official SQuAD EM and F1.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch

import kdexp.families.qa_core as qa_core
from kdexp.errors import DataError

# Where a start/end distribution may not go: low enough to vanish in a softmax, finite (no 0·inf in a KL),
# and within the bfloat16 and float16 ranges.
MASKED_LOGIT = -1e4


def read_squad(path: Path, dev_articles: tuple[str, ...] = (), split: str = "train") -> datasets.Dataset:
    """A SQuAD JSON file; with `dev_articles`, its other articles (train) or those (validation)."""
    ds = qa_core.read_squad_json(path)
    if not dev_articles:
        return ds
    titles = set(ds.unique("title"))
    missing = sorted(set(dev_articles) - titles)
    if missing:
        raise DataError(
            f"{path}: no article titled {', '.join(missing)} (task.dev_articles); its articles are "
            f"{', '.join(sorted(titles))}."
        )
    train, dev = qa_core.split_by_article(ds, list(dev_articles))
    return dev if split != "train" else train


def refuse_unanswerable_in_v1(ds: datasets.Dataset, task: Any, path: Path) -> datasets.Dataset:
    """SQuAD v1.1 always answers: an unanswerable question would score 0 whatever the model does."""
    if task.with_no_answer:
        return ds
    for row, answers in enumerate(ds["answers"]):
        if not answers["text"]:
            raise DataError(
                f"{path}: question {ds[row]['id']!r} has no answer, which task={task.name} (SQuAD v1.1) does not "
                "allow; a file with unanswerable questions (SQuAD 2.0) is read with task=squad_v2."
            )
    return ds


def from_hub(ds: datasets.Dataset) -> datasets.Dataset:
    keep = ["id", "title", "context", "question", "answers"]
    return ds.remove_columns([c for c in ds.column_names if c not in keep])


def windows(batch: Mapping[str, list], tokenizer: Any, max_length: int, doc_stride: int) -> dict[str, list]:
    """The windows of a batch of examples: model inputs, ``labels`` (answer start and end token, 0 = none),
    the example each came from, its character offsets and the positions its distributions may use."""
    out = qa_core.qa_features(batch, tokenizer, max_length, doc_stride, with_positions=True)
    out["labels"] = [[start, end] for start, end in zip(out.pop("start_positions"), out.pop("end_positions"))]
    out["offset_mapping"] = [
        [list(o) if o is not None else [-1, -1] for o in offsets] for offsets in out["offset_mapping"]
    ]
    return out


def span_logits(start_logits: torch.Tensor, end_logits: torch.Tensor, context_mask: torch.Tensor) -> torch.Tensor:
    """Start and end logits as one ``[B, 2, L]`` tensor, positions outside ``context_mask`` set to `MASKED_LOGIT`."""
    logits = torch.stack([start_logits, end_logits], dim=1)
    return logits.masked_fill(~context_mask.bool().unsqueeze(1), MASKED_LOGIT)


class QAMetrics(torch.nn.Module):
    """EM and F1 (the official SQuAD normalisation; as fractions, like every metric a run writes: a report
    shows them ×100) of one dev split, from the windows' logits.

    `update` keeps each window's logits by its row (``idx``); `compute` needs the split's examples
    and windows (`kdexp.data.TaskData`) to join windows into examples and spans into text.
    """

    def __init__(self, task: Any) -> None:
        super().__init__()
        self.task = task
        self.logits: dict[int, np.ndarray] = {}

    def update(self, logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> None:
        for row, values in zip(batch["idx"].tolist(), logits.detach().float().cpu().numpy()):
            self.logits[row] = values

    def compute_on(self, examples: datasets.Dataset, windows_ds: datasets.Dataset) -> dict[str, float]:
        if len(self.logits) != len(windows_ds):
            raise RuntimeError(f"{len(self.logits)} of {len(windows_ds)} windows were scored")
        length = max(len(v[0]) for v in self.logits.values())
        starts = np.full((len(windows_ds), length), MASKED_LOGIT, dtype=np.float32)
        ends = starts.copy()
        for row, values in self.logits.items():
            starts[row, : values.shape[1]], ends[row, : values.shape[1]] = values[0], values[1]
        names = [n for n in ("example_index", "example_id", "offset_mapping") if n in windows_ds.column_names]
        columns = windows_ds.select_columns(names)[:]
        features = {
            **{n: columns[n] for n in names if n != "offset_mapping"},
            "offset_mapping": [
                [tuple(o) if o[0] >= 0 else None for o in offsets] for offsets in columns["offset_mapping"]
            ],
        }
        spans = qa_core.best_spans(examples, features, starts, ends)
        with_no_answer = self.task.with_no_answer
        predictions = qa_core.answers_of(spans, with_no_answer)
        references = {row["id"]: row["answers"]["text"] for row in examples}
        # x100, as the official script of the task's version prints them
        scores = qa_core.squad_metrics(predictions, references, version_2=with_no_answer)
        # Fractions, as GLUE's; SQuAD 2.0 also by group, since "no answer" everywhere already scores the NoAns
        # share, and at the best null threshold, which tells spans learned from a null score set too high.
        if with_no_answer:
            scores.update(qa_core.best_threshold_metrics(spans, references))
        return {
            k: float(v) if k.endswith("_thresh") else float(v) / 100
            for k, v in scores.items()
            if k.endswith(("exact_match", "f1", "_thresh"))
        }

    def reset(self) -> None:
        self.logits = {}
