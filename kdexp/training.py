"""The Lightning trainer a run uses: best-dev checkpointing, resume, per-epoch CSV, throughput."""

from __future__ import annotations

import csv
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from kdexp.data import TaskData, make_loader
from kdexp.methods.base import DistillationModule, eval_prefix

log = logging.getLogger(__name__)


class EpochMetricsCSV(pl.Callback):
    """Appends one row per epoch (train loss, every dev metric) to `metrics.csv`; survives resume."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._loss_sum = 0.0
        self._loss_count = 0

    def on_train_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self._loss_sum, self._loss_count = 0.0, 0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:  # type: ignore[override]
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None:
            self._loss_sum += float(loss.detach())
            self._loss_count += 1

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if trainer.global_rank != 0:
            return
        row: dict[str, Any] = {"epoch": trainer.current_epoch, "step": trainer.global_step}
        row["train_loss"] = self._loss_sum / max(self._loss_count, 1)
        for name, value in sorted(trainer.callback_metrics.items()):
            if name.startswith("val"):
                row[name] = float(value)
        new_file = not self.path.exists()
        fields = list(row) if new_file else next(csv.reader(open(self.path)))
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            if new_file:
                writer.writeheader()
            writer.writerow(row)


class ThroughputMeter(pl.Callback):
    """Training examples per second, over the training batches only (validation excluded)."""

    def __init__(self) -> None:
        self.examples = 0
        self.seconds = 0.0
        self._start: float | None = None

    def _pause(self) -> None:
        if self._start is not None:
            self.seconds += time.perf_counter() - self._start
            self._start = None

    def on_train_epoch_start(self, trainer, module) -> None:  # type: ignore[override]
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:  # type: ignore[override]
        self.examples += int(batch["input_ids"].shape[0])

    def on_validation_start(self, trainer, module) -> None:  # type: ignore[override]
        self._pause()

    def on_validation_end(self, trainer, module) -> None:  # type: ignore[override]
        if not trainer.sanity_checking and trainer.training:
            self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, module) -> None:  # type: ignore[override]
        self._pause()

    @property
    def examples_per_second(self) -> float:
        return self.examples / self.seconds if self.seconds > 0 else 0.0


class GlueDataModule(pl.LightningDataModule):
    def __init__(self, data: TaskData, batch_size: int, eval_batch_size: int, seed: int, num_workers: int = 0):
        super().__init__()
        self.data = data
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.seed = seed
        self.num_workers = num_workers

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return make_loader(self.data.train, self.data, self.batch_size, True, self.seed, self.num_workers)

    def val_dataloader(self) -> list[torch.utils.data.DataLoader]:
        return [
            make_loader(self.data.tokenized[s], self.data, self.eval_batch_size, False, num_workers=self.num_workers)
            for s in self.data.eval_splits
        ]


@dataclass
class FitResult:
    best_checkpoint: str
    best_epoch: int
    best_metrics: dict[str, float]
    epochs_trained: int
    train_seconds: float
    train_examples_per_second: float


def build_trainer(
    trainer_cfg: dict[str, Any],
    checkpoint_dir: Path,
    monitor: str,
    callbacks: list[pl.Callback],
    loggers: list[Any] | bool,
) -> tuple[pl.Trainer, ModelCheckpoint]:
    best = ModelCheckpoint(
        dirpath=checkpoint_dir,
        filename="best-{epoch}",
        monitor=monitor,
        mode="max",
        save_top_k=1,
        save_last=True,
        auto_insert_metric_name=False,
    )
    options = dict(trainer_cfg)
    options.setdefault("num_sanity_val_steps", 0)
    options.setdefault("enable_model_summary", False)
    trainer = pl.Trainer(callbacks=[best, *callbacks], logger=loggers, **options)
    return trainer, best


def resumable_checkpoint(checkpoint_dir: Path) -> str | None:
    """`last.ckpt` if it loads; a checkpoint cut short by a kill is set aside, not trusted."""
    last = checkpoint_dir / "last.ckpt"
    if not last.exists():
        return None
    try:
        torch.load(last, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:
        log.warning("%s is unreadable (%s); starting this run from scratch.", last, err)
        last.rename(last.with_suffix(".ckpt.corrupt"))
        return None
    return str(last)


def fit(
    module: DistillationModule,
    datamodule: GlueDataModule,
    trainer_cfg: dict[str, Any],
    work_dir: Path,
    loggers: list[Any] | bool = False,
    metrics_csv: Path | None = None,
    resume: bool = True,
) -> FitResult:
    """Train with best-dev checkpointing under `work_dir/checkpoints`; resume from `last.ckpt` if there."""
    checkpoint_dir = work_dir / "checkpoints"
    monitor = f"val/{module.task.main_metric}"
    meter = ThroughputMeter()
    callbacks: list[pl.Callback] = [meter]
    if metrics_csv is not None:
        callbacks.append(EpochMetricsCSV(metrics_csv))
    trainer, best = build_trainer(trainer_cfg, checkpoint_dir, monitor, callbacks, loggers)
    ckpt_path = resumable_checkpoint(checkpoint_dir) if resume else None
    if ckpt_path:
        log.info("Resuming from %s", ckpt_path)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    if not best.best_model_path:
        raise RuntimeError(f"training produced no checkpoint in {checkpoint_dir} (no validation ran?)")
    best_state = torch.load(best.best_model_path, map_location="cpu", weights_only=False)
    best_epoch = int(best_state["epoch"])
    module.load_state_dict(best_state["state_dict"], strict=False)
    best_metrics = evaluate(module, datamodule)
    return FitResult(
        best_checkpoint=best.best_model_path,
        best_epoch=best_epoch,
        best_metrics=best_metrics,
        epochs_trained=trainer.current_epoch,
        train_seconds=meter.seconds,
        train_examples_per_second=meter.examples_per_second,
    )


@torch.no_grad()
def evaluate(module: DistillationModule, datamodule: GlueDataModule) -> dict[str, float]:
    """GLUE metrics of `module` on every dev split, named like the logged ones (`val/accuracy`)."""
    was_training = module.training
    module.eval()
    results: dict[str, float] = {}
    for split, loader, metrics in zip(module.task.eval_splits, datamodule.val_dataloader(), module.eval_metrics):
        metrics.reset()
        for batch in loader:
            batch = {k: v.to(module.device) for k, v in batch.items()}
            metrics.update(module(batch).float(), batch["labels"])
        prefix = eval_prefix(module.task, split)
        results.update({f"{prefix}/{k}": v for k, v in metrics.compute().items()})
        metrics.reset()
    module.train(was_training)
    return results
