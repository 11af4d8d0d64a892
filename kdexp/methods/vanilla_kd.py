"""`vanilla_kd` (Hinton et al. 2015): CE with the gold label plus soft-label KD from the teacher.

`L = (1 - alpha)·CE + alpha·T²·KL(softmax(z_T/T) ‖ softmax(z_S/T))`; for STS-B, MSE to the
teacher's prediction. `kd_form=additive` is the weighting of the DBKD authors' white-box KD row:
`L = CE + alpha·T²·KL`. Teacher logits come from the on-disk cache (computed once per teacher
and data), or from a live teacher forward when `live_teacher` is set (for comparison).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import MISSING

from kdexp.config import require
from kdexp.losses import hinton_weights, kd_terms
from kdexp.methods.base import DistillationModule
from kdexp.teacher import TeacherSignals

if TYPE_CHECKING:
    from kdexp.context import RunContext

KD_FORMS = ("hinton", "additive")


@dataclass
class VanillaKDOptions:
    temperature: float = MISSING
    alpha: float = MISSING
    live_teacher: bool = MISSING
    kd_form: str = "hinton"

    def check(self) -> None:
        require(self.temperature > 0, "method.temperature", self.temperature, "a positive temperature (e.g. 2)")
        require(self.kd_form in KD_FORMS, "method.kd_form", self.kd_form, ", ".join(KD_FORMS))
        if self.kd_form == "hinton":
            require(0 <= self.alpha <= 1, "method.alpha", self.alpha, "a weight in [0, 1]")
        else:
            require(self.alpha >= 0, "method.alpha", self.alpha, "a non-negative weight")


class VanillaKD(DistillationModule):
    Options = VanillaKDOptions

    def __init__(self, *args: Any, options: VanillaKDOptions, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.teacher is None:
            raise ValueError("VanillaKD needs the teacher's signals (cached logits or the live model)")
        self.options = options

    @classmethod
    def from_run(cls, run: "RunContext", options: VanillaKDOptions) -> "VanillaKD":
        teacher = TeacherSignals.from_teacher(run.teacher, run.data, live_logits=options.live_teacher)
        return cls(run.student, run.task, run.optim, teacher=teacher, options=options)

    def teacher_logits_for(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        assert self.teacher is not None
        return self.teacher.logits(batch)

    def loss_terms(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return kd_terms(
            self(batch),
            self.teacher_logits_for(batch),
            batch["labels"],
            self.options.temperature,
            self.task.is_regression,
        )

    def loss_weights(self) -> Mapping[str, float | torch.Tensor]:
        if self.options.kd_form == "additive":
            return {"ce": 1.0, "kd": self.options.alpha}
        return hinton_weights(self.options.alpha)
