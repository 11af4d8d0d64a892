"""The Lightning trainer a run uses: best-dev checkpointing, exact resume, per-epoch CSV, throughput."""

from __future__ import annotations

import csv
import io
import logging
import os
import time
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Iterator

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint

from kdexp.cache import atomic_write_text
from kdexp.data import TaskData, make_loader, pad_batch
from kdexp.faults import maybe_fail
from kdexp.methods.base import DistillationModule
from kdexp.metrics import eval_prefix
from kdexp.seeding import derive_seed, seed_all

log = logging.getLogger(__name__)

# A method attaches its cached signals to each batch in `on_before_batch_transfer` (kdexp.methods.base);
# GlueDataModule has no such hook, so Lightning's notice that the module's is used says nothing.
warnings.filterwarnings("ignore", message="You have overridden `on_before_batch_transfer`")

LAST_CHECKPOINT = "last.ckpt"


class EpochMetricsCSV(pl.Callback):
    """`metrics.csv`: one row per finished epoch (train loss, every dev metric).

    The rows are part of the checkpoint and the file is rewritten whole at each epoch end,
    so a resumed run has exactly one row per epoch, the same as an uninterrupted run.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.rows: list[dict[str, Any]] = []
        self._loss_sum = 0.0
        self._loss_count = 0
        self._validated = False

    def state_dict(self) -> dict[str, Any]:
        return {"rows": [dict(row) for row in self.rows]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = [dict(row) for row in state_dict["rows"]]

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if trainer.global_rank != 0:
            return
        if self.rows:
            self._write()  # drops rows of epochs that ran after the checkpoint we resumed from
        else:
            self.path.unlink(missing_ok=True)

    def on_train_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self._loss_sum, self._loss_count = 0.0, 0
        self._validated = False

    def on_validation_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self._validated = not trainer.sanity_checking

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:  # type: ignore[override]
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None:
            self._loss_sum += float(loss.detach())
            self._loss_count += 1

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        row: dict[str, Any] = {"epoch": trainer.current_epoch, "step": trainer.global_step}
        row["train_loss"] = self._loss_sum / max(self._loss_count, 1)
        for name, value in sorted(trainer.callback_metrics.items()):
            if name.startswith("val") and self._validated:  # not an earlier epoch's values (check_val_every_n_epoch)
                row[name] = float(value)
        self.rows = [r for r in self.rows if r["epoch"] < row["epoch"]] + [row]
        if trainer.global_rank == 0:
            self._write()

    def _write(self) -> None:
        fields = list(dict.fromkeys(key for row in self.rows for key in row))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=fields)
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.path, buffer.getvalue())


class ThroughputMeter(pl.Callback):
    """Training examples per second, over the training batches only (validation excluded)."""

    def __init__(self) -> None:
        self.examples = 0
        self.seconds = 0.0
        self._start: float | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"examples": self.examples, "seconds": self.seconds}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.examples, self.seconds = int(state_dict["examples"]), float(state_dict["seconds"])

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
        for logger in trainer.loggers:  # wandb only: a timing in the step log would make it differ run to run
            if type(logger).__name__ == "WandbLogger":
                logger.log_metrics({"train/examples_per_second": self.examples_per_second}, step=trainer.global_step)

    @property
    def examples_per_second(self) -> float:
        return self.examples / self.seconds if self.seconds > 0 else 0.0


class EpochSeed(pl.Callback):
    """Seeds the global generators from `(seed, epoch)` as each epoch starts.

    Dropout and any other draw in epoch k then depend on the seed and k alone, not on what
    ran before (cache stages, earlier epochs in this process or in a killed one).
    """

    def __init__(self, seed: int):
        self.seed = seed

    def on_train_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        rank = ("rank", trainer.global_rank) if trainer.global_rank else ()  # DDP: each process its own dropout
        seed_all(derive_seed(self.seed, "epoch", trainer.current_epoch, *rank))


class ResumePoint(pl.Callback):
    """`last.ckpt` at the start of every epoch after the first, and once more when training ends.

    A checkpoint taken as epoch k starts holds everything epochs 0..k-1 did (their validation,
    best-checkpoint bookkeeping, `metrics.csv` rows, stage switches), so resuming from it runs
    epoch k from its first batch and never redoes a finished epoch. `identity` (the run's
    config hash) is stored with it: a checkpoint of another config is never resumed.
    """

    def __init__(self, path: Path, identity: str):
        self.path = Path(path)
        self.identity = identity
        self.resumed_epoch: int | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"identity": self.identity}

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        for callback in trainer.checkpoint_callbacks:  # a best file a killed run deleted after saving a newer one
            if isinstance(callback, ModelCheckpoint) and callback.best_model_path and not Path(callback.best_model_path).exists():
                log.warning("The best checkpoint %s is gone; the best epoch is chosen again from here on.",
                            callback.best_model_path)
                callback.best_model_path, callback.best_model_score, callback.best_k_models = "", None, {}

    def on_train_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.resumed_epoch:
            # Lightning restores the loops as "restarting" and would take the previous epoch's finished
            # batch counters for this one's; the checkpoint is an epoch boundary, so start it afresh.
            trainer.fit_loop.restarting = False
        elif trainer.current_epoch > 0:
            self._save(trainer)

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self._save(trainer)

    def _save(self, trainer: pl.Trainer) -> None:
        for logger in trainer.loggers:
            logger.save()  # the step log as far as this checkpoint (see ResumableCSVLogger)
        tmp = self.path.with_name(self.path.name + ".tmp")
        trainer.save_checkpoint(tmp, weights_only=False)
        if trainer.is_global_zero:
            os.replace(tmp, self.path)


class FaultPoints(pl.Callback):
    """Test hook: `KDEXP_FAULT_AT=train_batch:epoch=2:batch=1` kills the process there (kdexp.faults).

    The teacher stage's points carry the prefix `teacher_` (`teacher_train_batch:epoch=1:batch=0`).
    """

    def __init__(self, prefix: str = ""):
        self.prefix = prefix

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:  # type: ignore[override]
        maybe_fail(self.prefix + "train_batch", epoch=trainer.current_epoch, batch=batch_idx)

    def on_train_end(self, trainer, module) -> None:  # type: ignore[override]
        maybe_fail(self.prefix + "train_end")


class EpochSeededSampler(torch.utils.data.Sampler[int]):
    """A random order of the rows drawn from `(seed, epoch)`: the same in a fresh and a resumed run.

    Lightning calls `set_epoch` before each epoch (as for a DistributedSampler), but its first
    iterator (and its prefetched batch) exists before that call, so the sampler starts at the
    trainer's epoch when the loader is built (epoch k when a run resumes there).

    Under DDP (`world_size > 1`) every rank draws the same order, cuts it into the global batches
    of `batch_size` rows, and takes its own `batch_size / world_size` slice of each: a step then
    averages the gradients of exactly the rows one process would have batched together. A last
    global batch too small to give every rank a row is dropped.
    """

    def __init__(self, num_rows: int, seed: int, epoch: int = 0, rank: int = 0, world_size: int = 1,
                 batch_size: int | None = None, lengths: list[int] | None = None):
        if world_size > 1 and (batch_size is None or batch_size % world_size):
            raise ValueError(f"data.batch_size={batch_size} must be a multiple of the {world_size} DDP processes")
        if lengths is not None and (batch_size is None or len(lengths) != num_rows):
            raise ValueError("grouping by length needs the batch size and one length per row")
        self.num_rows = num_rows
        self.seed = seed
        self.epoch = epoch
        self.rank = rank
        self.world_size = world_size
        self.batch_size = batch_size or num_rows
        self.lengths = lengths

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self) -> list[int]:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "data order", self.epoch))
        order = torch.randperm(self.num_rows, generator=generator).tolist()
        return order if self.lengths is None else self._grouped_by_length(order, generator)

    def _grouped_by_length(self, order: list[int], generator: torch.Generator) -> list[int]:
        """Hugging Face's length grouping: the random order cut into mega-batches of 50 batches, each
        sorted longest first, so that a batch holds rows of similar length (little padding) while
        the batches still come in random order (the mega-batches' batches are shuffled)."""
        assert self.lengths is not None
        mega = 50 * self.batch_size
        batches: list[list[int]] = []
        for start in range(0, len(order), mega):
            chunk = sorted(order[start:start + mega], key=lambda i: -self.lengths[i])  # type: ignore[index]
            batches += [chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        full = [b for b in batches if len(b) == self.batch_size]
        rest = [b for b in batches if len(b) < self.batch_size]
        shuffled = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()]
        return [i for batch in shuffled + rest for i in batch]

    def __iter__(self) -> Iterator[int]:
        order = self.order()
        if self.world_size == 1:
            return iter(order)
        return iter(self._shard(order))

    def _shard(self, order: list[int]) -> list[int]:
        mine: list[int] = []
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            if len(batch) < self.world_size:
                break
            cut = [len(batch) * r // self.world_size for r in range(self.world_size + 1)]
            mine += batch[cut[self.rank]:cut[self.rank + 1]]
        return mine

    def __len__(self) -> int:
        return self.num_rows if self.world_size == 1 else len(self._shard(list(range(self.num_rows))))


def loader_resources(num_workers: int | str, trainer: pl.Trainer | None) -> dict[str, Any]:
    """Worker processes and pinned memory for the run's device.

    ``num_workers="auto"``: none on CPU (collating pre-tokenised rows costs little next to the step,
    and a worker would take a core from the model); on a GPU min(4, cores per device), so that
    collation overlaps the step, with pinned memory for asynchronous copies. Neither changes
    the batches: the sampler runs in the main process.
    """
    on_gpu = trainer is not None and trainer.strategy.root_device.type == "cuda"
    if num_workers == "auto":
        devices = trainer.num_devices if trainer is not None else 1
        num_workers = min(4, max(1, (os.cpu_count() or 1) // max(1, devices))) if on_gpu else 0
    return {"num_workers": int(num_workers), "pin_memory": on_gpu}


class GlueDataModule(pl.LightningDataModule):
    def __init__(self, data: TaskData, batch_size: int, eval_batch_size: int, seed: int, num_workers: int | str = "auto",
                 group_by_length: bool = False):
        super().__init__()
        self.data = data
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.group_by_length = group_by_length

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        train = self.data.train
        trainer = self.trainer
        world_size = trainer.world_size if trainer else 1
        lengths = [len(ids) for ids in train["input_ids"]] if self.group_by_length else None
        sampler = EpochSeededSampler(len(train), self.seed, trainer.current_epoch if trainer else 0,
                                     trainer.global_rank if trainer else 0, world_size, self.batch_size, lengths)
        resources = loader_resources(self.num_workers, trainer)
        return torch.utils.data.DataLoader(
            train,
            batch_size=self.batch_size // world_size,
            sampler=sampler,
            # its own generator: creating an iterator draws a worker seed, which must not consume the
            # global generator (a resumed run creates its first iterator before the epoch is seeded)
            generator=torch.Generator().manual_seed(derive_seed(self.seed, "loader")),
            collate_fn=partial(pad_batch, pad_token_id=self.data.pad_token_id, regression=self.data.task.is_regression),
            persistent_workers=resources["num_workers"] > 0,
            **resources,
        )

    def val_dataloader(self) -> list[torch.utils.data.DataLoader]:
        return [
            make_loader(self.data.tokenized[s], self.data, self.eval_batch_size, False,
                        **loader_resources(self.num_workers, self.trainer))
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
    resumed_from_epoch: int | None = None
    global_rank: int = 0


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
        save_weights_only=True,
        auto_insert_metric_name=False,
        enable_version_counter=False,
    )
    options = dict(trainer_cfg)
    options.setdefault("num_sanity_val_steps", 0)
    options.setdefault("enable_model_summary", False)
    options.setdefault("enable_checkpointing", True)
    options.setdefault("use_distributed_sampler", False)  # GlueDataModule shards the data itself
    trainer = pl.Trainer(callbacks=[*callbacks, best], logger=loggers, **options)
    return trainer, best


def read_checkpoint(path: Path) -> dict[str, Any] | None:
    """A checkpoint's contents (tensors and plain values only: `weights_only`), or None if unreadable."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        log.warning("%s is unreadable (%s); not resuming from it.", path, err)
        return None


def checkpoint_identity(checkpoint: dict[str, Any]) -> str | None:
    for key, state in checkpoint.get("callbacks", {}).items():
        if key == "ResumePoint" or key.startswith("ResumePoint{"):
            return state.get("identity")
    return None


def resumable_checkpoint(checkpoint_dir: Path, identity: str) -> tuple[str, int, int] | None:
    """`last.ckpt`, its epoch and global step, if it loads and was written for `identity`; else set aside.

    A checkpoint cut short by a kill, or one written under another config or number of processes,
    is renamed (`last.ckpt.corrupt` / `last.ckpt.other`) and never trusted.
    """
    last = checkpoint_dir / LAST_CHECKPOINT
    if not last.exists():
        return None
    checkpoint = read_checkpoint(last)
    if checkpoint is None:
        last.rename(last.with_suffix(".ckpt.corrupt"))
        return None
    if checkpoint_identity(checkpoint) != identity:
        log.warning("%s was written for another config; starting this run from scratch.", last)
        last.rename(last.with_suffix(".ckpt.other"))
        return None
    return str(last), int(checkpoint["epoch"]), int(checkpoint["global_step"])


def fit(
    module: DistillationModule,
    datamodule: GlueDataModule,
    trainer_cfg: dict[str, Any],
    work_dir: Path,
    seed: int,
    identity: str,
    loggers: list[Any] | bool = False,
    metrics_csv: Path | None = None,
    resume: bool = True,
    fault_prefix: str = "",
) -> FitResult:
    """Train with best-dev checkpointing under `work_dir/checkpoints`; resume from `last.ckpt` if there.

    Every epoch is seeded from `(seed, epoch)` (data order and global generators), so a run
    resumed from the checkpoint taken at the start of epoch k ends with the same weights and
    metrics as one that ran straight through.
    """
    checkpoint_dir = work_dir / "checkpoints"
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    monitor = f"val/{module.task.main_metric}"
    meter = ThroughputMeter()
    resume_point = ResumePoint(checkpoint_dir / LAST_CHECKPOINT, identity)
    callbacks: list[pl.Callback] = [resume_point, EpochSeed(seed), meter, FaultPoints(fault_prefix)]
    if loggers:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    if metrics_csv is not None:
        callbacks.append(EpochMetricsCSV(metrics_csv))
    trainer, best = build_trainer(trainer_cfg, checkpoint_dir, monitor, callbacks, loggers)
    # A checkpoint holds the number of processes too: other shards would give another run.
    resume_point.identity = f"{identity}|processes={trainer.world_size}"
    found = resumable_checkpoint(checkpoint_dir, resume_point.identity) if resume else None
    ckpt_path, start_step = None, 0
    if found:
        ckpt_path, resume_point.resumed_epoch, start_step = found
        log.info("Resuming from %s at the start of epoch %d", ckpt_path, resume_point.resumed_epoch)
    for logger in trainer.loggers:  # the step log as far as the point training starts from
        if hasattr(logger, "truncate_to"):
            logger.truncate_to(resume_point.resumed_epoch or 0, start_step)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    if not best.best_model_path:
        raise RuntimeError(f"training produced no checkpoint in {checkpoint_dir} (no validation ran?)")
    best_epoch = int(torch.load(best.best_model_path, map_location="cpu", weights_only=True)["epoch"])
    best_metrics = score_checkpoint(trainer, module, datamodule, best.best_model_path)
    return FitResult(
        best_checkpoint=best.best_model_path,
        best_epoch=best_epoch,
        best_metrics=best_metrics,
        epochs_trained=trainer.current_epoch,
        train_seconds=meter.seconds,
        train_examples_per_second=meter.examples_per_second,
        resumed_from_epoch=resume_point.resumed_epoch,
        global_rank=trainer.global_rank,
    )


def score_checkpoint(trainer: pl.Trainer, module: DistillationModule, datamodule: GlueDataModule,
                     checkpoint: str) -> dict[str, float]:
    """Load `checkpoint`'s weights into `module` and score it on every dev split with Lightning's
    validation (on the trainer's device), named like the logged metrics (`val/accuracy`, ...).

    Only the weights are loaded (not through `ckpt_path`): the module's own state from training
    (a phase history, say) stays that of the last epoch.
    """
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    module.load_state_dict(state, strict=False)
    trainer.validate(module, datamodule=datamodule, verbose=False)
    return {name: float(value) for name, value in trainer.callback_metrics.items() if name.startswith("val")}
