"""The base every method extends: the student, optimiser, schedule, GLUE metrics.

A method adds only its loss (`training_loss`) and, if it needs them, its extra modules and
teacher signals (`from_run` receives the run's context and fetches what the method needs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import pytorch_lightning as pl
import torch
from transformers import PreTrainedModel, get_linear_schedule_with_warmup

from kdexp.data import MODEL_INPUTS
from kdexp.losses import task_loss
from kdexp.metrics import GlueMetrics
from kdexp.tasks import GlueTask

if TYPE_CHECKING:
    from kdexp.run import RunContext


@dataclass
class OptimConfig:
    learning_rate: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    adam_epsilon: float = 1e-8


def eval_prefix(task: GlueTask, split: str) -> str:
    """`val` for the main dev split; `val_mismatched` for MNLI's second one."""
    if split == task.eval_splits[0]:
        return "val"
    return "val_" + split.removeprefix("validation_")


class DistillationModule(pl.LightningModule):
    """Trains `student` on a GLUE task; subclasses define `training_loss`."""

    # The schema of the method's options (the keys of conf/method/<name>.yaml besides name and
    # _target_): a dataclass with a `check()` method; None for a method without options.
    Options: ClassVar[type | None] = None

    def __init__(self, student: PreTrainedModel, task: GlueTask, optim: OptimConfig | None = None):
        super().__init__()
        self.student = student.train()  # transformers 5 returns loaded models in eval mode
        self.task = task
        self.optim = optim or OptimConfig()
        self.eval_metrics = torch.nn.ModuleList([GlueMetrics(task) for _ in task.eval_splits])

    @classmethod
    def check_task(cls, task: GlueTask) -> None:
        """Refuse, before any training, a task the method cannot do (override to restrict)."""

    @classmethod
    def check_config(cls, cfg: Any, task: GlueTask) -> None:
        """Refuse, before the teacher stage, a run config the method cannot do (override to add checks)."""
        cls.check_task(task)

    @classmethod
    def from_run(cls, run: "RunContext", **options: Any) -> "DistillationModule":
        """Build the module for one run; methods that need teacher signals override this."""
        return cls(student=run.student, task=run.task, optim=run.optim, **options)

    # ------------------------------------------------------------------ forward and losses

    @staticmethod
    def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: batch[k] for k in MODEL_INPUTS if k in batch}

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.student(**self.model_inputs(batch)).logits

    def task_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return task_loss(logits, labels, self.task.is_regression)

    def training_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return the loss to minimise and named parts to log."""
        raise NotImplementedError(f"{type(self).__name__} must define training_loss")

    # ------------------------------------------------------------------ Lightning hooks

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, parts = self.training_loss(batch)
        batch_size = batch["input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        for name, value in parts.items():
            self.log(f"train/{name}", value, batch_size=batch_size)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        logits = self(batch)
        self.eval_metrics[dataloader_idx].update(logits.float(), batch["labels"])

    def on_validation_epoch_end(self) -> None:
        for split, metrics in zip(self.task.eval_splits, self.eval_metrics):
            values = metrics.compute()
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
        total_steps = int(self.trainer.estimated_stepping_batches)
        scheduler = get_linear_schedule_with_warmup(
            optimizer, int(self.optim.warmup_ratio * total_steps), total_steps
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
