"""`finetune`: the student trained on the gold labels alone (CE; MSE for STS-B)."""

from __future__ import annotations

import torch

from kdexp.methods.base import DistillationModule


class Finetune(DistillationModule):
    def loss_terms(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"ce": self.task_loss(self(batch), batch["labels"])}
