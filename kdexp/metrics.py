"""GLUE metrics through torchmetrics, named as in the GLUE papers and `run_glue.py`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import BinaryF1Score, MulticlassAccuracy, MulticlassConfusionMatrix
from torchmetrics.regression import PearsonCorrCoef, SpearmanCorrCoef

from kdexp.families.extractive_qa import QAMetrics
from kdexp.tasks import EXTRACTIVE_QA, GlueTask


class MatthewsCorrelation(MulticlassConfusionMatrix):
    """Matthews correlation with the convention of scikit-learn and the GLUE scripts: 0 when a row or a column
    of the confusion matrix is all zeros (one class predicted, or one present), where it is undefined.
    torchmetrics' own (1.9) perturbs such matrices instead and gives, for one class predicted everywhere on
    CoLA's dev set (719 acceptable, 324 not), 0.025 rather than 0."""

    def compute(self) -> torch.Tensor:
        confusion = super().compute().double()
        true_counts, predicted_counts = confusion.sum(dim=1), confusion.sum(dim=0)
        correct, total = confusion.trace(), confusion.sum()
        covariance = correct * total - (true_counts * predicted_counts).sum()
        spread = (total**2 - (predicted_counts**2).sum()) * (total**2 - (true_counts**2).sum())
        return covariance / spread.sqrt() if spread > 0 else torch.zeros((), dtype=torch.float64)


def _base_metric(name: str, num_labels: int) -> Metric:
    # sync_on_compute=False: under DDP every rank scores the whole dev split (kdexp.training), so
    # summing states across ranks would count each row once per rank.
    if name == "accuracy":
        return MulticlassAccuracy(num_classes=max(num_labels, 2), average="micro", sync_on_compute=False)
    if name == "f1":
        return BinaryF1Score(sync_on_compute=False)
    if name == "matthews_correlation":
        return MatthewsCorrelation(num_classes=max(num_labels, 2), sync_on_compute=False)
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


def majority_metrics(task: GlueTask, data: Any) -> dict[str, float] | None:
    """The dev metrics of answering every row of each eval split with that split's most frequent label (the
    lowest on a tie), named as a run's (`val/accuracy`, ...): the floor a model must beat to have learned
    anything from the task. None for regression and extractive QA, whose floors are not one label."""
    if task.is_regression or task.family == EXTRACTIVE_QA:
        return None
    results: dict[str, float] = {}
    for split in data.eval_splits:
        labels = torch.as_tensor(data.tokenized[split]["labels"]).long()
        if len(labels) == 0 or int(labels.min()) < 0:  # no rows, or unlabelled ones (-1, as GLUE's test files)
            return None
        counts = torch.bincount(labels, minlength=task.num_labels)
        constant = torch.zeros(len(labels), len(counts))
        constant[:, int(counts.argmax())] = 1.0
        metrics = GlueMetrics(task)
        metrics.update(constant, labels)
        results.update({f"{eval_prefix(task, split)}/{k}": v for k, v in metrics.compute().items()})
    return results


def at_majority_floor(metrics: Mapping[str, Any], floor: Mapping[str, Any], key: str) -> bool:
    """Whether `metrics[key]` is no better than `floor[key]` (the most frequent label's score)."""
    return key in metrics and key in floor and float(metrics[key]) <= float(floor[key])


def main_metric(task: GlueTask, metrics: dict[str, float]) -> float:
    return metrics[task.main_metric]


def eval_prefix(task: GlueTask, split: str) -> str:
    """`val` for the main dev split; `val_mismatched` for MNLI's second one."""
    if split == task.eval_splits[0]:
        return "val"
    return "val_" + split.removeprefix("validation_")
