"""GLUE metrics through torchmetrics, named as in the GLUE papers and `run_glue.py`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import BinaryF1Score, MulticlassAccuracy, MulticlassMatthewsCorrCoef
from torchmetrics.regression import PearsonCorrCoef, SpearmanCorrCoef

from kdexp.families.extractive_qa import QAMetrics
from kdexp.tasks import EXTRACTIVE_QA, GlueTask


def _base_metric(name: str, num_labels: int) -> Metric:
    # sync_on_compute=False: under DDP every rank scores the whole dev split (kdexp.training), so
    # summing states across ranks would count each row once per rank.
    if name == "accuracy":
        return MulticlassAccuracy(num_classes=max(num_labels, 2), average="micro", sync_on_compute=False)
    if name == "f1":
        return BinaryF1Score(sync_on_compute=False)
    if name == "matthews_correlation":
        return MulticlassMatthewsCorrCoef(num_classes=max(num_labels, 2), sync_on_compute=False)
    if name == "pearson":
        return PearsonCorrCoef(sync_on_compute=False)
    if name == "spearman":
        return SpearmanCorrCoef(sync_on_compute=False)
    raise ValueError(f"unknown GLUE metric '{name}'")


class GlueMetrics(torch.nn.Module):
    """Accumulates predictions of one eval split and computes the task's GLUE metrics.

    `combined_score` is the mean of the task's other metrics (MRPC/QQP: accuracy and F1;
    STS-B: Pearson and Spearman), as in `run_glue.py`.
    """

    def __init__(self, task: GlueTask):
        super().__init__()
        self.task = task
        names = [m for m in task.metrics if m != "combined_score"]
        self.collection = MetricCollection({n: _base_metric(n, task.num_labels) for n in names})

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        if self.task.is_regression:
            self.collection.update(logits.reshape(-1).float(), labels.float())
        else:
            self.collection.update(logits.argmax(dim=-1), labels.long())

    def update_batch(self, logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> None:
        self.update(logits, batch["labels"])

    def compute_split(self, data: Any = None, split: str | None = None) -> dict[str, float]:
        return self.compute()

    def compute(self) -> dict[str, float]:
        values = {k: float(v) for k, v in self.collection.compute().items()}
        if "combined_score" in self.task.metrics:
            values["combined_score"] = sum(values.values()) / len(values)
        return values

    def reset(self) -> None:
        self.collection.reset()


class SpanMetrics(QAMetrics):
    """Extractive QA's EM and F1, scored on whole examples of the split (`compute_split`)."""

    def update_batch(self, logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> None:
        self.update(logits, batch)

    def compute_split(self, data: Any = None, split: str | None = None) -> dict[str, float]:
        if data is None or split is None:
            raise RuntimeError("extractive QA is scored on whole examples: give the split's data")
        return self.compute_on(data.raw[split], data.tokenized[split])


# The metrics of one eval split: `update_batch(logits, batch)`, `compute_split(data, split)`, `reset()`.
SplitMetrics = GlueMetrics | SpanMetrics


def task_metrics(task: GlueTask) -> SplitMetrics:
    """The metrics of one eval split of `task`."""
    return SpanMetrics(task) if task.family == EXTRACTIVE_QA else GlueMetrics(task)


def main_metric(task: GlueTask, metrics: dict[str, float]) -> float:
    return metrics[task.main_metric]


def eval_prefix(task: GlueTask, split: str) -> str:
    """`val` for the main dev split; `val_mismatched` for MNLI's second one."""
    if split == task.eval_splits[0]:
        return "val"
    return "val_" + split.removeprefix("validation_")
