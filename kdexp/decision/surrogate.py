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
from kdexp.inference import PassBatching, PassProgress, length_sorted_loader, teacher_pass_mode
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


def train_surrogate(student: nn.Module, tokenized, labels: torch.Tensor, pad_token_id: int,
                    settings: SurrogateSettings, device: torch.device) -> nn.Module:
    """A copy of ``student`` trained with CE on ``labels`` (row ``i`` of ``tokenized``), AdamW + linear schedule."""
    seed_all(derive_seed(settings.seed, "surrogate"))
    model = copy.deepcopy(student).to(device).train()
    rows = len(tokenized)
    steps = settings.epochs * math.ceil(rows / settings.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
    schedule = get_linear_schedule_with_warmup(optimizer, int(settings.warmup_ratio * steps), steps)
    examples = [tokenized[i] for i in range(rows)]
    for epoch in range(settings.epochs):
        order = torch.randperm(rows, generator=torch.Generator().manual_seed(derive_seed(settings.seed, "epoch", epoch)))
        losses = []
        for start in range(0, rows, settings.batch_size):
            chosen = order[start:start + settings.batch_size].tolist()
            batch = pad_batch([examples[r] for r in chosen], pad_token_id)
            inputs = {k: v.to(device) for k, v in model_inputs(batch).items()}
            loss = F.cross_entropy(model(**inputs).logits.float(), labels[chosen].to(device))
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            losses.append(float(loss))
        log.info("Surrogate epoch %d/%d: mean CE with the teacher's decisions %.4f", epoch + 1, settings.epochs,
                 sum(losses) / len(losses))
    return model.eval()


def logits_of(model: nn.Module, tokenized, pad_token_id: int, num_labels: int, device: torch.device,
              batching: PassBatching) -> torch.Tensor:
    """``[rows, C]`` logits of ``model`` on every row of ``tokenized``, in row order."""
    out = torch.empty(len(tokenized), num_labels)
    progress = PassProgress(f"surrogate logits ({len(tokenized)} rows)", len(tokenized))
    with teacher_pass_mode(device):
        for batch in length_sorted_loader(tokenized, pad_token_id, batching):
            inputs = {k: v.to(device) for k, v in model_inputs(batch).items()}
            out[batch["idx"]] = model(**inputs).logits.float().cpu()
            progress.update(len(batch["idx"]))
    progress.close()
    return out
