"""The base every method extends: the student, optimiser and schedule, GLUE metrics, loss terms, phases.

A method defines its unweighted loss terms (`loss_terms`) and their weights (`loss_weights`:
constants from its YAML, a phase's, or an agent's action), and, if it needs them, its own
modules, its teacher signals (`TeacherSignals`) and a phase schedule. The base sums the terms
with `kdexp.losses.weighted_sum`, logs `train/loss` and every term as `train/loss/<term>`, drives
the phases (at epoch ends or every k steps), restarts the learning rate per phase when asked,
and keeps the phase state in checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, cast

import pytorch_lightning as pl
import torch
from torch.optim.lr_scheduler import LambdaLR
from transformers import PreTrainedModel, get_linear_schedule_with_warmup, get_scheduler

from kdexp.config import OptimConfig
from kdexp.errors import ConfigError
from kdexp.families import output_logits
from kdexp.losses import task_loss, weighted_sum
from kdexp.metrics import SplitMetrics, eval_prefix, task_metrics
from kdexp.model_internals import model_inputs
from kdexp.phases import PhaseSchedule, phase_lr_factor
from kdexp.tasks import FAMILIES, GlueTask

if TYPE_CHECKING:
    from kdexp.context import RunContext
    from kdexp.teacher import TeacherSignals

PHASES_CHECKPOINT_KEY = "phases"


LR_SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")  # transformers.get_scheduler names


def lr_schedule(optimizer: torch.optim.Optimizer, optim: OptimConfig, total_steps: int) -> Any:
    warmup = int(optim.warmup_ratio * total_steps)
    if optim.lr_scheduler == "linear":
        return get_linear_schedule_with_warmup(optimizer, warmup, total_steps)
    return get_scheduler(optim.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


class DistillationModule(pl.LightningModule):
    """Trains `student` on a GLUE task; subclasses define `loss_terms` (and `loss_weights`)."""

    # The schema of the method's options (the keys of conf/method/<name>.yaml besides name and
    # _target_): a dataclass with a `check()` method; None for a method without options.
    Options: ClassVar[type | None] = None

    def __init__(
        self,
        student: PreTrainedModel,
        task: GlueTask,
        optim: OptimConfig | None = None,
        teacher: "TeacherSignals | None" = None,
    ):
        super().__init__()
        self.student = student.train()  # transformers 5 returns loaded models in eval mode
        self.task = task
        self.optim = optim or OptimConfig()
        self.teacher = teacher
        self.eval_metrics = torch.nn.ModuleList([task_metrics(task) for _ in task.eval_splits])
        self.phases: PhaseSchedule | None = None
        self.lr_per_phase = False  # restart warm-up + linear decay at each phase
        self._phase_loss_sum: torch.Tensor | float = 0.0
        self._phase_loss_count = 0
        self._steps_per_epoch = 1
        self._total_steps = 1
        self._last_phase_step = -1

    # The task families the method's losses apply to (kdexp.families): classification, multiple choice,
    # extractive QA. A task of another family is refused in one line before any work.
    families: ClassVar[tuple[str, ...]] = FAMILIES

    @classmethod
    def check_task(cls, task: GlueTask) -> None:
        """Refuse, before any training, a task the method cannot do (override to restrict further)."""
        if task.family not in cls.families:
            names = ", ".join(f.replace("_", " ") for f in cls.families)
            raise ConfigError(
                f"method '{cls.__name__}' does not apply to {task.name} ({task.family.replace('_', ' ')}): "
                f"its losses are defined for {names} tasks. Use finetune, vanilla_kd or text_smoothing "
                "(and dbkd for multiple choice) on this task."
            )

    @classmethod
    def check_config(cls, cfg: Any, task: GlueTask) -> None:
        """Refuse, before the teacher stage, a run config the method cannot do (override to add checks)."""
        cls.check_task(task)

    @classmethod
    def from_run(cls, run: "RunContext", options: Any) -> "DistillationModule":
        """Build the module for one run; methods that need teacher signals or options override this."""
        return cls(student=run.student, task=run.task, optim=run.optim)

    # ------------------------------------------------------------------ forward and losses

    def model_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch's inputs that the student takes."""
        return model_inputs(batch, self.student)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The student's logits in its task family's form (kdexp.families): ``[B, C]`` or ``[B, 2, L]``."""
        return output_logits(self.student(**self.model_inputs(batch)), batch)

    def task_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return task_loss(logits, labels, self.task.is_regression)

    def loss_terms(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The method's unweighted loss terms on `batch`, by name."""
        raise NotImplementedError(f"{type(self).__name__} must define loss_terms")

    def loss_weights(self) -> Mapping[str, float | torch.Tensor]:
        """The weight of each term that is minimised now (terms without one are only logged)."""
        return {"ce": 1.0}

    def training_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss to minimise and its terms (detached, to log)."""
        terms = self.loss_terms(batch)
        loss = weighted_sum(terms, self.loss_weights())
        return loss, {name: value.detach() for name, value in terms.items()}

    def log_losses(self, loss: torch.Tensor, terms: dict[str, torch.Tensor], batch_size: int) -> None:
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        for name, value in terms.items():
            self.log(f"train/loss/{name}", value, batch_size=batch_size)

    # ------------------------------------------------------------------ Lightning hooks

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        forget_earlier_step_values(self.trainer, "train/loss/")

    def batch_rows(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-row signals of a training batch, looked up on the CPU by ``batch["idx"]``: the teacher's
        cached signals (a method adds its own targets)."""
        return self.teacher.rows(batch) if self.teacher is not None else {}

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Attach the batch's rows of the cached signals while it is still on the CPU, so that it takes
        them to its device in one transfer (the tables themselves never leave the CPU)."""
        if self._trainer is not None and self.trainer.training:
            batch.update(self.batch_rows(batch))
        return batch

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, terms = self.training_loss(batch)
        self.log_losses(loss, terms, batch["input_ids"].shape[0])
        self.record_phase_loss(loss)
        return loss

    @property
    def split_metrics(self) -> list[SplitMetrics]:
        """`eval_metrics`, one per eval split, typed (a ModuleList forgets the types of its modules)."""
        return cast(list[SplitMetrics], list(self.eval_metrics))

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        logits = self(batch)
        self.split_metrics[dataloader_idx].update_batch(logits.float(), batch)

    def on_validation_epoch_end(self) -> None:
        # Lightning sets `trainer.datamodule` when a run starts; its Trainer class does not declare it.
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data = getattr(datamodule, "data", None)
        for split, metrics in zip(self.task.eval_splits, self.split_metrics):
            values = metrics.compute_split(data, split)
            metrics.reset()
            prefix = eval_prefix(self.task, split)
            self.log_dict({f"{prefix}/{k}": v for k, v in values.items()}, prog_bar=prefix == "val")

    def configure_optimizers(self) -> Any:
        no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight")
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        groups = [
            {"params": [p for n, p in named if not n.endswith(no_decay)], "weight_decay": self.optim.weight_decay},
            {"params": [p for n, p in named if n.endswith(no_decay)], "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(groups, lr=self.optim.learning_rate, eps=self.optim.adam_epsilon)
        self._total_steps = int(self.trainer.estimated_stepping_batches)
        max_epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else 1
        self._steps_per_epoch = max(1, math.ceil(self._total_steps / max_epochs))
        if self.phases is not None and self.lr_per_phase:
            scheduler: Any = LambdaLR(optimizer, self._phase_lr_factor)
        else:
            scheduler = lr_schedule(optimizer, self.optim, self._total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ phases

    def on_phase_start(self, index: int) -> None:
        """Called when phase `index` begins (after the first at training start); override to act on it."""

    def record_phase_loss(self, loss: torch.Tensor) -> None:
        """Adds a step's loss to the epoch's (kept on the device; read once at the epoch's end)."""
        if self.phases is not None:
            self._phase_loss_sum = self._phase_loss_sum + loss.detach().float()
            self._phase_loss_count += 1

    def on_train_start(self) -> None:
        # Steps are counted from here: under gradient accumulation the first batches end at this same step.
        self._last_phase_step = int(self.trainer.global_step)
        if self.phases is not None and self.phases.index == 0 and self.trainer.global_step == 0:
            self.on_phase_start(0)

    def on_train_epoch_start(self) -> None:
        self._phase_loss_sum, self._phase_loss_count = 0.0, 0

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.phases is None or self.phases.unit != "step":
            return
        step = int(self.trainer.global_step)
        if step != self._last_phase_step:  # an optimiser step happened (not an accumulation batch)
            self._last_phase_step = step
            if self.phases.end_step(step):
                self._begin_phase()

    def on_train_epoch_end(self) -> None:
        if self.phases is None or self.phases.unit != "epoch":
            return
        total = torch.tensor([float(self._phase_loss_sum), float(self._phase_loss_count)], device=self.device)
        if self.trainer.world_size > 1:  # every process must switch phase at the same epoch
            total = self.trainer.strategy.reduce(total, reduce_op="sum")
        count = int(total[1])
        mean = float(total[0]) / count if count else math.nan
        loss = mean if self.phases.patience is not None else None
        if self.phases.end_epoch(self.current_epoch, loss, int(self.trainer.global_step)):
            self._begin_phase()

    def _begin_phase(self) -> None:
        assert self.phases is not None  # a phase ends only in a phased run
        self._restart_learning_rate()
        self.on_phase_start(self.phases.index)

    def _phase_lr_factor(self, step: int) -> float:
        assert self.phases is not None
        return phase_lr_factor(step, self.phases, self.optim.warmup_ratio, self._steps_per_epoch, self._total_steps)

    def _restart_learning_rate(self) -> None:
        """Put the new phase's first learning rate in place before its first step."""
        if not self.lr_per_phase or self._trainer is None:
            return
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if not isinstance(scheduler, LambdaLR):
                continue
            factor = self._phase_lr_factor(scheduler.last_epoch)
            for group, base_lr in zip(scheduler.optimizer.param_groups, scheduler.base_lrs):
                group["lr"] = base_lr * factor
            scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.phases is not None:
            checkpoint[PHASES_CHECKPOINT_KEY] = self.phases.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.phases is None:
            return
        state = checkpoint.get(PHASES_CHECKPOINT_KEY)
        if state is None:
            raise ValueError(f"this checkpoint has no phase state; it was not written by {type(self).__name__}")
        self.phases.load_state_dict(state)


def forget_earlier_step_values(trainer: Any, prefix: str) -> None:
    """Lightning writes a value logged at an earlier step of the epoch again at every later step that does
    not log it: a loss term this step does not compute (knowledge selection's inactive knowledge kinds)
    would show its old value, and a run resumed mid-epoch would not (its epoch starts afresh)."""
    results = trainer._results if trainer is not None else None
    for metric in (results or {}).values():
        if metric.meta.name.startswith(prefix):
            metric._forward_cache = None
