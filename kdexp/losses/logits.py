"""Losses on the output logits: the task loss and soft-label knowledge distillation.

Each returns one unweighted scalar; methods name them (`ce`, `kd`) and combine them with
`kdexp.losses.weighted_sum`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdexp.losses.precision import full_precision


def distributions(logits: torch.Tensor) -> torch.Tensor:
    """One row per distribution: ``[B, C]`` stays, extractive QA's ``[B, 2, L]`` becomes ``[2B, L]``, so that
    every loss averages over the start and end distributions as over the rows of a batch."""
    return logits.float().reshape(-1, logits.shape[-1])


@full_precision
def task_loss(logits: torch.Tensor, labels: torch.Tensor, regression: bool) -> torch.Tensor:
    """Cross-entropy with the gold label (extractive QA: with the answer's start and end, averaged), or MSE
    for the regression task (STS-B)."""
    if regression:
        return F.mse_loss(logits.reshape(-1).float(), labels.float())
    return F.cross_entropy(distributions(logits), labels.reshape(-1))


@full_precision
def soft_label_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al. (2015): T² · KL(softmax(z_T/T) ‖ softmax(z_S/T)), averaged over the batch."""
    t = temperature
    log_q_student = F.log_softmax(distributions(student_logits) / t, dim=-1)
    log_p_teacher = F.log_softmax(distributions(teacher_logits) / t, dim=-1)
    kl = F.kl_div(log_q_student, log_p_teacher, reduction="batchmean", log_target=True)
    return (t * t) * kl


@full_precision
def soft_target_kd(student_logits: torch.Tensor, target_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(p ‖ softmax(z_S/T)) for a given target distribution p (rows sum to 1)."""
    t = temperature
    log_q_student = F.log_softmax(distributions(student_logits) / t, dim=-1)
    kl = F.kl_div(log_q_student, distributions(target_probs), reduction="batchmean")
    return (t * t) * kl


@full_precision
def regression_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """For regression the teacher's prediction is the target: MSE between the two predictions."""
    return F.mse_loss(student_logits.reshape(-1).float(), teacher_logits.reshape(-1).float())


def output_kd(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, regression: bool
) -> torch.Tensor:
    """Soft-label KD for a classification task, MSE to the teacher's prediction for regression."""
    if regression:
        return regression_kd(student_logits, teacher_logits)
    return soft_label_kd(student_logits, teacher_logits, temperature)


def kd_terms(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    regression: bool,
) -> dict[str, torch.Tensor]:
    """The two terms of Hinton's KD, unweighted: `ce` with the gold label and `kd` to the teacher."""
    return {
        "ce": task_loss(student_logits, labels, regression),
        "kd": output_kd(student_logits, teacher_logits, temperature, regression),
    }


def hinton_weights(alpha: float) -> dict[str, float]:
    """`L = (1 - alpha)·CE + alpha·T²·KL` (Hinton et al. 2015; `vanilla_kd`)."""
    return {"ce": 1.0 - alpha, "kd": alpha}
