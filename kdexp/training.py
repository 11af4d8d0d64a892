"""The Lightning trainer a run uses: best-dev checkpointing, exact resume, per-epoch CSV, throughput.

`last.ckpt` is written as every epoch starts, every `checkpoint.every_n_steps` optimiser steps or
`checkpoint.every_minutes` inside an epoch (a step checkpoint), and when a signal stops training
(kdexp.preemption). A run resumed from any of them ends with the same weights, `metrics.csv` and
step log as one that never stopped: a step checkpoint holds the epoch's position (the batches
already trained are skipped in the epoch's data order), the random generators' states of every
process, the optimiser, schedule and phase state, and the epoch's running sums.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import random
import signal
import time
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint

from kdexp.cache import atomic_write_text
from kdexp.data import TaskData, make_loader, pad_batch, row_lengths
from kdexp.errors import os_failures_reported
from kdexp.faults import maybe_fail
from kdexp.methods.base import DistillationModule
from kdexp.preemption import CheckpointClock, CheckpointEvery, Preempted, deferring, stop_requested
from kdexp.seeding import derive_seed, seed_all

log = logging.getLogger(__name__)

# A method attaches its cached signals to each batch in `on_before_batch_transfer` (kdexp.methods.base);
# GlueDataModule has no such hook, so Lightning's notice that the module's is used says nothing.
warnings.filterwarnings("ignore", message="You have overridden `on_before_batch_transfer`")
# A step checkpoint resumes inside an epoch with the data order's position in the checkpoint
# (GlueDataModule skips the batches already trained), not through a stateful loader.
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")

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
        # the epoch's running sums too: a step checkpoint resumes inside the epoch
        return {
            "rows": [dict(row) for row in self.rows],
            "loss_sum": self._loss_sum,
            "loss_count": self._loss_count,
            "validated": self._validated,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = [dict(row) for row in state_dict["rows"]]
        self._loss_sum = float(state_dict.get("loss_sum", 0.0))
        self._loss_count = int(state_dict.get("loss_count", 0))
        self._validated = bool(state_dict.get("validated", False))

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

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
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
        running = time.perf_counter() - self._start if self._start is not None else 0.0  # a step checkpoint
        return {"examples": self.examples, "seconds": self.seconds + running}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.examples, self.seconds = int(state_dict["examples"]), float(state_dict["seconds"])

    def _pause(self) -> None:
        if self._start is not None:
            self.seconds += time.perf_counter() - self._start
            self._start = None

    def on_train_epoch_start(self, trainer, module) -> None:
        self._start = time.perf_counter()

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if self._start is None:  # resumed inside an epoch: its start hooks do not run
            self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.examples += int(batch["input_ids"].shape[0])

    def on_validation_start(self, trainer, module) -> None:
        self._pause()

    def on_validation_end(self, trainer, module) -> None:
        if not trainer.sanity_checking and trainer.training:
            self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, module) -> None:
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
    """`last.ckpt`: as every epoch after the first starts, inside epochs when a step checkpoint is due
    (`every`: `checkpoint.every_n_steps` / `every_minutes`), when a signal stops training, and once
    more when training ends. Written by global rank 0 only, to a temporary file renamed into place.

    A checkpoint taken as epoch k starts holds everything epochs 0..k-1 did (their validation,
    best-checkpoint bookkeeping, `metrics.csv` rows, stage switches), so resuming from it runs
    epoch k from its first batch and never redoes a finished epoch. A step checkpoint is taken as
    batch b > 0 of epoch k starts, after every hook of batch b-1 (its logged row and phase switch
    included) and only where an optimiser step just happened (never inside a gradient-accumulation
    window); it adds the position (k, b), the loggers' step, and each process's random generators
    and epoch running sums (`in_epoch_state`), restored as the resumed run's first batch starts.

    `identity` (the run's config hash and number of processes) is stored with it: a checkpoint of
    another config is never resumed. A stop signal (kdexp.preemption) ends training at the next
    batch boundary, after a step checkpoint there, with `Preempted`.
    """

    def __init__(self, path: Path, identity: str, every: CheckpointEvery | None = None):
        self.path = Path(path)
        self.identity = identity
        self.clock = CheckpointClock(every)
        self.resumed_epoch: int | None = None
        self.last_saved: str | None = None  # what the latest save holds, for the line a stop prints
        self._step_state: dict[str, Any] | None = None  # the step checkpoint being written
        self._to_restore: dict[str, Any] | None = None  # a step checkpoint's state, restored at the first batch

    def state_dict(self) -> dict[str, Any]:
        return {"identity": self.identity, **(self._step_state or {})}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "position" in state_dict:
            self._to_restore = state_dict

    def on_save_checkpoint(self, trainer: pl.Trainer, module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self._step_state is not None:
            # Taken as the epoch's last batch starts, the loop state says "last batch": Lightning would then
            # take the epoch for finished on resume and skip its validation. The batch has not run yet.
            checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]["is_last_batch"] = False

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.best_model_path:
                self._forget_unreadable_best(callback, trainer.is_global_zero)
        self.clock.saved()  # minutes count from the start of training in this process

    @staticmethod
    def _forget_unreadable_best(callback: ModelCheckpoint, is_global_zero: bool) -> None:
        """A best file a killed run deleted after saving a newer one, or one a full disk cut short (Lightning
        moves it in from TMPDIR, a copy across file systems), is set aside and the best epoch chosen again."""
        best = Path(callback.best_model_path)
        if best.exists() and read_checkpoint(best) is not None:
            return
        if best.exists() and is_global_zero:
            best.rename(best.with_name(best.name + ".corrupt"))
        log.warning("The best checkpoint %s is gone or unreadable; the best epoch is chosen again from here on.", best)
        callback.best_model_path, callback.best_model_score, callback.best_k_models = "", None, {}

    def on_train_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        if epoch == self.resumed_epoch:
            # Lightning restores the loops as "restarting" and would take the previous epoch's finished
            # batch counters for this one's; the checkpoint is an epoch boundary, so start it afresh.
            trainer.fit_loop.restarting = False
            self.last_saved = f"a checkpoint at the start of epoch {epoch} in {self.path}"
        elif epoch > 0:
            self._save(trainer, f"a checkpoint at the start of epoch {epoch} in {self.path}")
        self._stop_if_signalled(trainer)

    def on_train_batch_start(self, trainer: pl.Trainer, module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._to_restore is not None:
            self._restore_in_epoch_state(trainer, module)
            return
        # Batch 0: the epoch's start is saved as it starts. Inside an accumulation window the summed
        # gradients are in no checkpoint: the window's end is the next point to save at.
        if batch_idx == 0 or batch_idx % trainer.accumulate_grad_batches:
            return
        due, stop = agreed(trainer, self.clock.due(trainer.global_step), stop_requested() is not None)
        if due or stop:
            self._save_step(trainer, module, batch_idx)
        if stop:
            raise Preempted(stop_requested() or signal.SIGTERM, self.last_saved)

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self._save(trainer, f"a checkpoint at the end of training in {self.path}")
        self._stop_if_signalled(trainer)

    def _stop_if_signalled(self, trainer: pl.Trainer) -> None:
        (stop,) = agreed(trainer, stop_requested() is not None)
        if stop:
            raise Preempted(stop_requested() or signal.SIGTERM, self.last_saved)

    def _save_step(self, trainer: pl.Trainer, module: pl.LightningModule, batch_idx: int) -> None:
        position = {
            "epoch": trainer.current_epoch,
            "batch": batch_idx,
            "global_step": trainer.global_step,
            "logged_steps": trainer.fit_loop.epoch_loop._batches_that_stepped,
        }
        self._step_state = {"position": position, "processes": gathered(trainer, in_epoch_state(trainer, module))}
        try:
            self._save(
                trainer,
                f"a step checkpoint at epoch {position['epoch']}, batch {batch_idx} "
                f"(global step {position['global_step']}) in {self.path}",
            )
        finally:
            self._step_state = None

    def _save(self, trainer: pl.Trainer, what: str) -> None:
        for logger in trainer.loggers:
            logger.save()  # the step log as far as this checkpoint (see ResumableCSVLogger)
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            with os_failures_reported(self.path):
                trainer.save_checkpoint(tmp, weights_only=False)
                if trainer.is_global_zero:
                    os.replace(tmp, self.path)
        except BaseException:
            # Lightning moves its file in from TMPDIR; across file systems that move is a copy a full disk can cut short
            if trainer.is_global_zero:
                tmp.unlink(missing_ok=True)
            raise
        self.clock.saved()
        self.last_saved = what

    def _restore_in_epoch_state(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        state, self._to_restore = self._to_restore, None
        assert state is not None
        restore_in_epoch_state(trainer, module, state["processes"][trainer.global_rank])
        # Lightning's restart adds one to the loggers' step, as for a checkpoint taken at a batch's end.
        trainer.fit_loop.epoch_loop._batches_that_stepped = int(state["position"]["logged_steps"])
        self.last_saved = f"the step checkpoint this run resumed from, {self.path}"


# What a module accumulates over an epoch (kdexp.methods.base: the phase loss, the last step seen).
MODULE_EPOCH_ATTRIBUTES = ("_phase_loss_sum", "_phase_loss_count", "_last_phase_step")


def in_epoch_state(trainer: pl.Trainer, module: pl.LightningModule) -> dict[str, Any]:
    """This process's state that no other checkpoint part holds: its random generators (Python, NumPy,
    torch, and its own CUDA device's) and the module's epoch accumulators."""
    numpy_state = np.random.get_state(legacy=True)
    assert isinstance(numpy_state, tuple)  # the legacy form of NumPy's global generator (MT19937)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (
            str(numpy_state[0]),
            torch.from_numpy(numpy_state[1].astype(np.int64)),
            int(numpy_state[2]),
            int(numpy_state[3]),
            float(numpy_state[4]),
        ),
        "torch": torch.get_rng_state(),
        "module": {name: _plain(getattr(module, name)) for name in MODULE_EPOCH_ATTRIBUTES if hasattr(module, name)},
    }
    device = trainer.strategy.root_device
    if device.type == "cuda" and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_in_epoch_state(trainer: pl.Trainer, module: pl.LightningModule, state: dict[str, Any]) -> None:
    """Put back what `in_epoch_state` took."""
    random.setstate(_as_python_state(state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], trainer.strategy.root_device)
    for attribute, value in state["module"].items():
        setattr(module, attribute, value.to(module.device) if isinstance(value, torch.Tensor) else value)


def _plain(value: Any) -> Any:
    return value.detach().cpu() if isinstance(value, torch.Tensor) else value


def _as_python_state(state: Any) -> tuple:
    """`random.setstate` wants tuples; a checkpoint may give lists back."""
    version, internal, gauss = state
    return int(version), tuple(int(x) for x in internal), gauss


def agreed(trainer: pl.Trainer, *flags: bool) -> list[bool]:
    """Each flag, true if it is true in any process (DDP: all-reduced, so that every process saves and
    stops at the same batch; every process must call this at the same point)."""
    if trainer.world_size == 1:
        return [bool(flag) for flag in flags]
    values = torch.tensor([int(bool(flag)) for flag in flags], device=trainer.strategy.root_device)
    torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.MAX)
    return [bool(value) for value in values.tolist()]


def gathered(trainer: pl.Trainer, value: Any) -> list[Any]:
    """`value` of every process, by global rank (DDP: all-gathered; every process must call this)."""
    if trainer.world_size == 1:
        return [value]
    values: list[Any] = [None] * trainer.world_size
    torch.distributed.all_gather_object(values, value)
    return values


class FaultPoints(pl.Callback):
    """Test hook: `KDEXP_FAULT_AT=train_batch:epoch=2:batch=1` kills the process there (kdexp.faults).

    The teacher stage's points carry the prefix `teacher_` (`teacher_train_batch:epoch=1:batch=0`).
    """

    def __init__(self, prefix: str = ""):
        self.prefix = prefix

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        maybe_fail(self.prefix + "train_batch", epoch=trainer.current_epoch, batch=batch_idx)

    def on_train_end(self, trainer, module) -> None:
        maybe_fail(self.prefix + "train_end")


class EpochSeededSampler(torch.utils.data.Sampler[int]):
    """A random order of the rows drawn from `(seed, epoch)`: the same in a fresh and a resumed run.

    Lightning calls `set_epoch` before each epoch (as for a DistributedSampler), but its first
    iterator (and, with worker processes, its first indices) exists before that call, so the sampler
    starts at the epoch training starts from (epoch k when a run resumes there).

    Under DDP (`world_size > 1`) every rank draws the same order, cuts it into the global batches
    of `batch_size` rows, and takes its own `batch_size / world_size` slice of each: a step then
    averages the gradients of exactly the rows one process would have batched together. A last
    global batch too small to give every rank a row is dropped.

    `resume_at=(epoch, batch)` (a run resumed from the step checkpoint taken as that batch of that
    epoch started): the first iteration over that epoch leaves out the rows of the batches before
    it, trained before the checkpoint. The length stays the whole epoch's: Lightning counts those
    batches as done.
    """

    def __init__(
        self,
        num_rows: int,
        seed: int,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        batch_size: int | None = None,
        lengths: list[int] | None = None,
        resume_at: tuple[int, int] | None = None,
    ):
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
        self._skip = resume_at  # (epoch, batches to skip), until used

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
        lengths = self.lengths
        assert lengths is not None
        mega = 50 * self.batch_size
        batches: list[list[int]] = []
        for start in range(0, len(order), mega):
            chunk = sorted(order[start : start + mega], key=lambda i: -lengths[i])
            batches += [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        full = [b for b in batches if len(b) == self.batch_size]
        rest = [b for b in batches if len(b) < self.batch_size]
        shuffled = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()]
        return [i for batch in shuffled + rest for i in batch]

    def __iter__(self) -> Iterator[int]:
        order = self.order()
        mine = order if self.world_size == 1 else self._shard(order)
        return iter(mine[self._rows_to_skip() :])

    def _rows_to_skip(self) -> int:
        """This process's rows of the batches to skip, once, in the epoch they were trained in."""
        if self._skip is None or self._skip[0] != self.epoch:
            return 0
        batches, self._skip = self._skip[1], None
        return batches * (self.batch_size // self.world_size)

    def _shard(self, order: list[int]) -> list[int]:
        mine: list[int] = []
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            if len(batch) < self.world_size:
                break
            cut = [len(batch) * r // self.world_size for r in range(self.world_size + 1)]
            mine += batch[cut[self.rank] : cut[self.rank + 1]]
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
    def __init__(
        self,
        data: TaskData,
        batch_size: int,
        eval_batch_size: int,
        seed: int,
        num_workers: int | str = "auto",
        group_by_length: bool = False,
    ):
        super().__init__()
        self.data = data
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.group_by_length = group_by_length
        self.start_at = (0, 0)  # (epoch, batch) training starts from: a resumed run's checkpoint (kdexp.training.fit)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        train = self.data.train
        trainer = self.trainer
        world_size = trainer.world_size if trainer else 1
        lengths = row_lengths(train).tolist() if self.group_by_length else None
        # Lightning builds the loader and its first iterator before it restores a checkpoint's loops (to count
        # the steps): the trainer's epoch is 0 then, and worker processes draw their first indices at once.
        start_epoch, start_batch = self.start_at
        epoch = max(start_epoch, trainer.current_epoch if trainer else 0)
        resume_at = (start_epoch, start_batch) if start_batch else None
        sampler = EpochSeededSampler(
            len(train),
            self.seed,
            epoch,
            trainer.global_rank if trainer else 0,
            world_size,
            self.batch_size,
            lengths,
            resume_at=resume_at,
        )
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
            make_loader(
                self.data.tokenized[s],
                self.data,
                self.eval_batch_size,
                False,
                **loader_resources(self.num_workers, self.trainer),
            )
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
    resumed_from_step: int | None = None  # the global step of the checkpoint training resumed from


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
    # Under SLURM Lightning resumes from an `hpc_ckpt_*.ckpt` it finds in this folder when given no
    # checkpoint; the launch folder may hold another program's.
    options.setdefault("default_root_dir", str(checkpoint_dir))
    trainer = pl.Trainer(callbacks=[*callbacks, best], logger=loggers, **options)
    keep_lightning_off_signals(trainer)
    return trainer, best


def keep_lightning_off_signals(trainer: pl.Trainer) -> None:
    """Leave SIGTERM and SIGUSR1 to kdexp.preemption while `trainer` runs.

    Lightning's handlers would stop training after the batch in progress, where no resumable
    checkpoint is, and exit with status 0 (its SIGTERMException), or under SLURM save a mid-step
    checkpoint into the launch folder and requeue; kdexp saves at the next batch boundary instead
    (ResumePoint), reports, exits non-zero and requeues (kdexp.train).
    """
    trainer._signal_connector.register_signal_handlers = lambda: None  # type: ignore[method-assign]


def read_checkpoint(path: Path) -> dict[str, Any] | None:
    """A checkpoint's contents (tensors and plain values only: `weights_only`), or None if unreadable."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        log.warning("%s is unreadable (%s); not resuming from it.", path, err)
        return None


def resume_point_state(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """What `ResumePoint` stored in a checkpoint ({} if nothing)."""
    for key, state in checkpoint.get("callbacks", {}).items():
        if key == "ResumePoint" or key.startswith("ResumePoint{"):
            return state
    return {}


def checkpoint_identity(checkpoint: dict[str, Any]) -> str | None:
    return resume_point_state(checkpoint).get("identity")


@dataclass(frozen=True)
class ResumeFrom:
    """A checkpoint training resumes from: taken as `epoch` started, or, for a step checkpoint, as its
    batch `batch` started, when the loggers' step was `logged_steps`."""

    path: str
    epoch: int
    global_step: int
    batch: int | None = None
    logged_steps: int | None = None

    def describe(self) -> str:
        if self.batch is None:
            return f"{self.path} at the start of epoch {self.epoch}"
        return f"{self.path} in epoch {self.epoch} at batch {self.batch} (global step {self.global_step})"


def resumable_checkpoint(checkpoint_dir: Path, identity: str) -> ResumeFrom | None:
    """`last.ckpt` and where it stands, if it loads and was written for `identity`; else set aside.

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
    position = resume_point_state(checkpoint).get("position")
    if position is None:
        return ResumeFrom(str(last), int(checkpoint["epoch"]), int(checkpoint["global_step"]))
    return ResumeFrom(
        str(last),
        int(position["epoch"]),
        int(position["global_step"]),
        int(position["batch"]),
        int(position["logged_steps"]),
    )


def truncate_step_logs(loggers: list[Any], start: ResumeFrom | None, is_global_zero: bool) -> None:
    """Each step log (kdexp.loggers.ResumableCSVLogger) as far as the point training starts from.

    From an epoch's start, `truncate_to` drops that epoch's rows and later ones. From a step
    checkpoint the rows logged before it stay, those of its own epoch included: only rows from its
    loggers' step on are dropped (a killed run may have flushed some after the checkpoint).
    """
    for logger in loggers:
        if not hasattr(logger, "truncate_to"):
            continue
        if start is None or start.batch is None:
            logger.truncate_to(start.epoch if start else 0, start.global_step if start else 0)
            continue
        assert start.logged_steps is not None
        logger.truncate_to(start.epoch + 1, start.logged_steps)
        if is_global_zero:
            _drop_epoch_rows_from_step(Path(logger.experiment.metrics_file_path), start.epoch, start.logged_steps)


def _drop_epoch_rows_from_step(path: Path, epoch: int, step: int) -> None:
    """Remove the rows of `epoch` logged at `step` or later from a CSV step log (the header unchanged)."""
    if not path.exists():
        return
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields = list(reader.fieldnames or [])
        rows = list(reader)
    kept = [row for row in rows if not _logged_in_epoch_from(row, epoch, step)]
    if len(kept) == len(rows):
        return
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    writer.writerows(kept)
    atomic_write_text(path, buffer.getvalue())


def _logged_in_epoch_from(row: dict[str, str], epoch: int, step: int) -> bool:
    if row.get("epoch") in (None, "") or row.get("step") in (None, ""):
        return False
    return int(float(row["epoch"])) == epoch and int(float(row["step"])) >= step


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
    checkpoints: CheckpointEvery | None = None,
) -> FitResult:
    """Train with best-dev checkpointing under `work_dir/checkpoints`; resume from `last.ckpt` if there.

    Every epoch is seeded from `(seed, epoch)` (data order and global generators), and a step
    checkpoint (`checkpoints`: every n steps or minutes) holds the generators' states, so a run
    resumed from any checkpoint ends with the same weights and metrics as one that ran straight
    through. A stop signal (kdexp.preemption) ends training at the next batch boundary with a
    checkpoint there, raising `Preempted`.
    """
    checkpoint_dir = work_dir / "checkpoints"
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    monitor = f"val/{module.task.main_metric}"
    meter = ThroughputMeter()
    resume_point = ResumePoint(checkpoint_dir / LAST_CHECKPOINT, identity, checkpoints)
    callbacks: list[pl.Callback] = [resume_point, EpochSeed(seed), meter, FaultPoints(fault_prefix)]
    if loggers:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    if metrics_csv is not None:
        callbacks.append(EpochMetricsCSV(metrics_csv))
    trainer, best = build_trainer(trainer_cfg, checkpoint_dir, monitor, callbacks, loggers)
    # A checkpoint holds the number of processes too: other shards would give another run.
    resume_point.identity = f"{identity}|processes={trainer.world_size}"
    found = resumable_checkpoint(checkpoint_dir, resume_point.identity) if resume else None
    if found:
        resume_point.resumed_epoch = found.epoch
        log.info("Resuming from %s", found.describe())
    datamodule.start_at = (found.epoch, found.batch or 0) if found else (0, 0)
    truncate_step_logs(trainer.loggers, found, trainer.is_global_zero)
    with deferring(lambda: resume_point.last_saved):
        trainer.fit(module, datamodule=datamodule, ckpt_path=found.path if found else None, weights_only=True)
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
        resumed_from_step=found.global_step if found else None,
    )


def score_checkpoint(
    trainer: pl.Trainer, module: DistillationModule, datamodule: GlueDataModule, checkpoint: str
) -> dict[str, float]:
    """Load `checkpoint`'s weights into `module` and score it on every dev split with Lightning's
    validation (on the trainer's device), named like the logged metrics (`val/accuracy`, ...).

    Only the weights are loaded (not through `ckpt_path`): the module's own state from training
    (a phase history, say) stays that of the last epoch.
    """
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    module.load_state_dict(state, strict=False)
    trainer.validate(module, datamodule=datamodule, verbose=False)
    return {name: float(value) for name, value in trainer.callback_metrics.items() if name.startswith("val")}
