"""The four kinds of teacher knowledge of knowledge selection, one unweighted loss each.

- ``fink``: the task loss with the gold labels (CE; MSE for STS-B).
- ``resk``: response knowledge, ``T²·KL(softmax(z_T/T) || softmax(z_S/T))`` from the teacher's
  logits (MSE to the teacher's prediction for STS-B).
- ``feak``: feature knowledge, the MSE between matched hidden states over real tokens, student
  states through a learned projection where widths differ; averaged over the matched layers.
- ``relk``: relation knowledge, the MSE between FSP matrices of consecutive layers
  (``G = H_aᵀH_b / n``; the embedding output and the matched layers, in order), averaged over
  the consecutive pairs; computed through Gram products (`kdexp.losses.fsp_loss`).

Layers are matched by the uniform map (`kdexp.internal.layer_map`). Only the kinds with a
non-zero weight are computed: ``feak`` and ``relk`` need a live teacher forward (hidden states),
``resk`` the cached logits, ``fink`` neither.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from kdexp.families import output_logits
from kdexp.internal.layer_map import LayerPair, resolve_layer_map
from kdexp.losses import Projections, fsp_loss, hidden_mse, output_kd, task_loss
from kdexp.model_internals import forward_with_internals, model_inputs
from kdexp.selection.agent import KNOWLEDGE_KINDS
from kdexp.teacher import TeacherSignals


def consecutive_layers(pairs: Sequence[LayerPair]) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """``((s_a, t_a), (s_b, t_b))`` hidden-state indices of consecutive matched layers, starting
    from the embedding output (index 0); layer ``j`` is ``hidden_states[j + 1]``."""
    points = [(0, 0)] + [(pair.student + 1, pair.teacher + 1) for pair in pairs]
    return list(zip(points[:-1], points[1:]))


class KnowledgeTerms(nn.Module):
    """Computes the knowledge losses of a batch; holds the learned projections (optimised with the student)."""

    def __init__(
        self,
        student_config: Any,
        teacher_config: Any,
        temperature: float,
        regression: bool,
        layer_map: str | Sequence[Sequence[int]] | None = "uniform",
    ) -> None:
        super().__init__()
        self.pairs = tuple(
            resolve_layer_map(layer_map, student_config.num_hidden_layers, teacher_config.num_hidden_layers)
        )
        names = ["embeddings"] + [str(pair) for pair in self.pairs]
        self.projections = Projections(names, student_config.hidden_size, teacher_config.hidden_size)
        self.temperature = temperature
        self.regression = regression

    def _projected(self, index: int, hidden: Tensor) -> Tensor:
        name = "embeddings" if index == 0 else str(next(p for p in self.pairs if p.student + 1 == index))
        return self.projections(name, hidden)

    def forward(
        self, student: PreTrainedModel, teacher: TeacherSignals, batch: Mapping[str, Tensor], kinds: Sequence[str]
    ) -> dict[str, Tensor]:
        """The terms of `kinds` (a subset of ``fink, resk, feak, relk``) for `batch`; student logits too."""
        unknown = set(kinds) - set(KNOWLEDGE_KINDS)
        if unknown:
            raise ValueError(f"unknown knowledge kinds {sorted(unknown)}; known: {KNOWLEDGE_KINDS}")
        internal = "feak" in kinds or "relk" in kinds
        out = forward_with_internals(student, dict(batch), need_attentions=False) if internal else None
        logits = out.logits if out is not None else output_logits(student(**model_inputs(batch, student)), batch)
        terms: dict[str, Tensor] = {}
        if "fink" in kinds:
            terms["fink"] = task_loss(logits, batch["labels"], self.regression)
        if "resk" in kinds:
            terms["resk"] = output_kd(logits, teacher.logits(dict(batch)), self.temperature, self.regression)
        if internal:
            assert out is not None and out.hidden_states is not None
            depth = max(pair.teacher for pair in self.pairs) + 1
            teacher_hidden = teacher.internals(dict(batch), depth=depth).hidden_states
            assert teacher_hidden is not None
            mask = batch["attention_mask"]
            if "feak" in kinds:
                terms["feak"] = torch.stack(
                    [
                        hidden_mse(
                            self.projections(str(p), out.hidden_states[p.student + 1]),
                            teacher_hidden[p.teacher + 1],
                            mask,
                        )
                        for p in self.pairs
                    ]
                ).mean()
            if "relk" in kinds:
                terms["relk"] = torch.stack(
                    [
                        fsp_loss(
                            self._projected(sa, out.hidden_states[sa]),
                            self._projected(sb, out.hidden_states[sb]),
                            teacher_hidden[ta],
                            teacher_hidden[tb],
                            mask,
                        )
                        for (sa, ta), (sb, tb) in consecutive_layers(self.pairs)
                    ]
                ).mean()
        return terms
