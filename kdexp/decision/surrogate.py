"""The surrogate baseline of DBKD: a student-sized model trained on the teacher's decisions.

A decision-based teacher gives no logits; the surrogate stands in for it. It starts from the
student's own initialisation, is trained with cross-entropy on the teacher's top-1 decisions
for the training rows (not the gold labels), and its logits on those rows become the soft
labels the student is distilled from. The logits are computed once and cached under a key of
(decisions, student initialisation, tokenised rows, training settings, seed).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import get_linear_schedule_with_warmup

from kdexp.data import pad_batch
from kdexp.families import output_logits
from kdexp.hardware import Hardware
from kdexp.inference import PassBatching, PassProgress, length_sorted_loader
from kdexp.losses.precision import full_precision
from kdexp.model_internals import model_inputs
from kdexp.seeding import derive_seed, seed_all

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SurrogateSettings:
    epochs: int
    learning_rate: float
    batch_size: int
    weight_decay: float
    warmup_ratio: float
    seed: int


def state_fingerprint(model: nn.Module) -> str:
    """A hash of a model's parameters and buffers (its initialisation, for cache keys)."""
    digest = hashlib.sha1()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:20]


def train_surrogate(
    student: nn.Module,
    tokenized,
    labels: torch.Tensor,
    pad_token_id: int,
    settings: SurrogateSettings,
    hardware: Hardware,
) -> nn.Module:
    """A copy of ``student`` trained with CE on ``labels`` (row ``i`` of ``tokenized``), AdamW + linear schedule,
    on ``hardware``'s device and in its precision."""
    seed_all(derive_seed(settings.seed, "surrogate"))
    model = hardware.to_device(copy.deepcopy(student)).train()
    rows = len(tokenized)
    steps = settings.epochs * math.ceil(rows / settings.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
    schedule = get_linear_schedule_with_warmup(optimizer, int(settings.warmup_ratio * steps), steps)
    optimizer = hardware.optimizer(optimizer)
    for epoch in range(settings.epochs):
        order = torch.randperm(
            rows, generator=torch.Generator().manual_seed(derive_seed(settings.seed, "epoch", epoch))
        )
        losses = []
        for start in range(0, rows, settings.batch_size):
            chosen = order[start : start + settings.batch_size].tolist()
            batch = hardware.to_device(pad_batch(rows_of(tokenized, chosen), pad_token_id))
            with hardware.autocast():
                logits = output_logits(model(**model_inputs(batch, model)), batch)
            loss = cross_entropy(logits, hardware.to_device(labels[chosen]))
            optimizer.zero_grad()
            hardware.backward(loss)
            hardware.clip_gradients(model, optimizer, 1.0)
            optimizer.step()
            schedule.step()
            losses.append(float(loss.detach()))
        log.info(
            "Surrogate epoch %d/%d: mean CE with the teacher's decisions %.4f",
            epoch + 1,
            settings.epochs,
            sum(losses) / len(losses),
        )
    return model.eval()


def rows_of(tokenized, indices: list[int]) -> list[dict]:
    """Rows `indices` of a tokenised split, read as one batch (the split is never held in memory whole)."""
    columns = tokenized[indices]
    return [dict(zip(columns, values)) for values in zip(*columns.values())]


@full_precision
def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels)


def logits_of(
    model: nn.Module, tokenized, pad_token_id: int, num_labels: int, hardware: Hardware, batching: PassBatching
) -> torch.Tensor:
    """``[rows, C]`` logits of ``model`` on every row of ``tokenized``, in row order."""
    model = hardware.to_device(model)
    out = torch.zeros(len(tokenized), num_labels)
    progress = PassProgress(f"surrogate logits ({len(tokenized)} rows)", len(tokenized))
    with hardware.inference():
        for batch in length_sorted_loader(tokenized, pad_token_id, batching):
            batch = hardware.to_device(batch)
            out[batch["idx"].cpu()] = output_logits(model(**model_inputs(batch, model)), batch).float().cpu()
            progress.update(len(batch["idx"]))
    progress.close()
    return out
