"""`vanilla_kd` (Hinton et al. 2015): CE with the gold label plus soft-label KD from the teacher.

`L = (1 - alpha)·CE + alpha·T²·KL(softmax(z_T/T) ‖ softmax(z_S/T))`; for STS-B, MSE to the
teacher's prediction. Teacher logits come from the on-disk cache (computed once per teacher
and data), or from a live teacher forward when `live_teacher` is set (for comparison).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import MISSING

from kdexp.config import require
from kdexp.losses import vanilla_kd_loss
from kdexp.methods.base import DistillationModule

if TYPE_CHECKING:
    from kdexp.run import RunContext


@dataclass
class VanillaKDOptions:
    temperature: float = MISSING
    alpha: float = MISSING
    live_teacher: bool = MISSING

    def check(self) -> None:
        require(self.temperature > 0, "method.temperature", self.temperature, "a positive temperature (e.g. 2)")
        require(0 <= self.alpha <= 1, "method.alpha", self.alpha, "a weight in [0, 1]")


class VanillaKD(DistillationModule):
    Options = VanillaKDOptions

    def __init__(
        self,
        *args: Any,
        teacher_logits: torch.Tensor | None = None,
        teacher_model: torch.nn.Module | None = None,
        temperature: float = 2.0,
        alpha: float = 0.5,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        if (teacher_logits is None) == (teacher_model is None):
            raise ValueError("VanillaKD needs exactly one of teacher_logits (cached) or teacher_model (live).")
        self.temperature = temperature
        self.alpha = alpha
        # Not a submodule and not in checkpoints: the teacher is frozen and stored elsewhere.
        self._live_teacher = [teacher_model.eval().requires_grad_(False)] if teacher_model is not None else []
        if teacher_logits is not None:
            self.register_buffer("teacher_logits", teacher_logits.float(), persistent=False)

    @classmethod
    def from_run(cls, run: "RunContext", live_teacher: bool = False, **options: Any) -> "VanillaKD":
        if live_teacher:
            signals: dict[str, Any] = {"teacher_model": run.teacher.load_model()}
        else:
            signals = {"teacher_logits": run.teacher.logits(run.data, run.task.train_split)}
        return cls(student=run.student, task=run.task, optim=run.optim, **signals, **options)

    def on_fit_start(self) -> None:
        for teacher in self._live_teacher:
            teacher.to(self.device)

    def teacher_logits_for(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self._live_teacher:
            with torch.no_grad():
                return self._live_teacher[0](**self.model_inputs(batch)).logits
        return self.teacher_logits[batch["idx"]]

    def training_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return vanilla_kd_loss(
            self(batch),
            self.teacher_logits_for(batch),
            batch["labels"],
            alpha=self.alpha,
            temperature=self.temperature,
            regression=self.task.is_regression,
        )
