"""`distilbert_kd`: DistilBERT's triple loss in the fine-tuning setting (Sanh et al. 2019, arXiv 1910.01108).

DistilBERT distils during pre-training with ``L = alpha_ce·L_ce + alpha_mlm·L_mlm + alpha_cos·L_cos``:
``L_ce`` the soft cross-entropy with the teacher's temperature-scaled distribution, ``L_mlm`` the
supervised (masked-LM) loss, ``L_cos`` a cosine-embedding loss between the student's and the
teacher's last hidden states over real tokens. Here, on a GLUE task, the task's CE takes the
MLM loss's place (docs/methods/baselines.md)::

    L = ce_weight·CE + kd_weight·T²·KL(softmax(z_T/T) || softmax(z_S/T))
        + cos_weight·mean_{(j, m(j))} mean_t [1 − cos(W_j h_S[j][t], h_T[m(j)][t])]

(``T²·KL`` is the soft cross-entropy less the teacher's entropy, a constant: the same
gradients; DistilBERT's code computes exactly ``KLDivLoss(batchmean)·T²``.) For STS-B the soft
term is the MSE to the teacher's prediction.

Layers (``layer_map``): ``uniform`` (default), every student layer ``j`` with teacher layer
``m(j) = (j+1)·L_T/L_S − 1``, the layers an every-other-layer student was made of (its last
pair is DistilBERT's last-hidden-state alignment); ``last``, DistilBERT's one pair (last
student layer, last teacher layer); or explicit ``[[student, teacher], ...]`` pairs. The
cosine terms are averaged over the pairs (each weighted ``cos_weight / M``), so ``cos_weight``
keeps DistilBERT's meaning whatever the number of pairs. A learned projection ``W_j`` (one per
pair) maps the student's states to the teacher width where they differ.

Teacher signals: logits from the on-disk cache; hidden states of every token from a live,
gradient-free teacher forward through the first ``max m(j) + 1`` blocks (too large to cache:
N·L·D per layer).

Defaults: ``kd_weight 5.0, ce_weight 2.0, cos_weight 1.0, temperature 2.0``, the values of
DistilBERT's training command (``--alpha_ce 5.0 --alpha_mlm 2.0 --alpha_cos 1.0``, README of
transformers' ``examples/research_projects/distillation``; ``--temperature 2.0`` its default).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import MISSING
from torch import Tensor

from kdexp.config import require
from kdexp.errors import ConfigError
from kdexp.internal.layer_map import LayerPair, resolve_layer_map
from kdexp.internal.losses import InternalProjections
from kdexp.losses import kd_terms, layer_output
from kdexp.losses.features import hidden_cosine_loss
from kdexp.methods.base import DistillationModule
from kdexp.methods.pkd import known_layer_counts
from kdexp.model_internals import forward_with_internals
from kdexp.tasks import CLASSIFICATION
from kdexp.teacher import TeacherSignals

if TYPE_CHECKING:
    from kdexp.context import RunContext

log = logging.getLogger(__name__)

DISTILBERT_LAYER_MAPS = ("uniform", "last")


def distilbert_layer_map(spec: Any, num_student_layers: int, num_teacher_layers: int) -> list[LayerPair]:
    """The aligned pairs of ``uniform``, ``last`` or an explicit list (ValueError naming the problem)."""
    if spec == "last":
        return [LayerPair(num_student_layers - 1, num_teacher_layers - 1)]
    return resolve_layer_map(spec, num_student_layers, num_teacher_layers)


@dataclass
class DistilBertKDOptions:
    temperature: float = MISSING
    kd_weight: float = MISSING  # DistilBERT's alpha_ce
    ce_weight: float = MISSING  # in alpha_mlm's place: the task's supervised loss
    cos_weight: float = MISSING  # alpha_cos
    layer_map: Any = MISSING  # uniform | last | [[student, teacher], ...]

    def check(self) -> None:
        require(self.temperature > 0, "method.temperature", self.temperature, "a positive temperature (e.g. 2)")
        weights = (self.kd_weight, self.ce_weight, self.cos_weight)
        require(min(weights) >= 0, "method.kd_weight/ce_weight/cos_weight", weights, "non-negative weights")
        require(max(weights) > 0, "method.kd_weight/ce_weight/cos_weight", weights, "at least one positive weight")
        require(
            self.layer_map in DISTILBERT_LAYER_MAPS or isinstance(self.layer_map, list),
            "method.layer_map",
            self.layer_map,
            "uniform, last, or a list of [student, teacher] layer pairs",
        )


class DistilBertKD(DistillationModule):
    """Task CE, soft cross-entropy with the teacher, and the hidden-state cosine loss at aligned layers."""

    families = (CLASSIFICATION,)

    Options = DistilBertKDOptions

    def __init__(
        self, student: Any, task: Any, optim: Any = None, *, options: DistilBertKDOptions, teacher: TeacherSignals
    ) -> None:
        super().__init__(student, task, optim, teacher=teacher)
        model = teacher.model
        if model is None:
            raise ValueError("DistilBertKD needs the live teacher model (hidden states of every token)")
        try:
            pairs = distilbert_layer_map(
                options.layer_map, student.config.num_hidden_layers, model.config.num_hidden_layers
            )
        except ValueError as err:
            raise ConfigError(f"method.layer_map: {err}") from None
        self.options = options
        self.layer_pairs = tuple(pairs)
        self.projections = InternalProjections(pairs, student.config.hidden_size, model.config.hidden_size)

    @classmethod
    def check_config(cls, cfg: Any, task: Any) -> None:
        """Refuse a layer map that cannot work before the teacher stage."""
        super().check_config(cfg, task)
        counts = known_layer_counts(cfg)
        if counts is not None:
            try:
                distilbert_layer_map(cfg.method.layer_map, *counts)
            except ValueError as err:
                raise ConfigError(f"method.layer_map: {err}") from None

    @classmethod
    def from_run(cls, run: "RunContext", options: DistilBertKDOptions) -> "DistilBertKD":
        if not run.teacher.shares_tokenizer_with(run.data):
            raise ConfigError(
                "method=distilbert_kd compares hidden states token by token, so the student must use "
                "the teacher's tokenizer; student.init=pretrained with another tokenizer cannot be used"
            )
        teacher = TeacherSignals.from_teacher(run.teacher, run.data, live_model=True)
        module = cls(run.student, run.task, run.optim, options=options, teacher=teacher)
        run.method_info["layer_pairs"] = [[p.student, p.teacher] for p in module.layer_pairs]
        log.info(
            "DistilBERT-style KD: cosine of student layer <- teacher layer %s",
            ", ".join(f"{p.student} <- {p.teacher}" for p in module.layer_pairs),
        )
        return module

    # ------------------------------------------------------------------ the loss

    def loss_terms(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        assert self.teacher is not None
        out = forward_with_internals(self.student, batch, need_attentions=False)
        terms = kd_terms(
            out.logits, self.teacher.logits(batch), batch["labels"], self.options.temperature, self.task.is_regression
        )
        if self.options.cos_weight == 0:
            return terms  # no teacher forward for a term that would only be logged
        pairs = self.layer_pairs
        teacher_hidden = self.teacher.internals(
            batch, need_attentions=False, depth=max(p.teacher for p in pairs) + 1
        ).hidden_states
        assert teacher_hidden is not None and out.hidden_states is not None
        for pair in pairs:
            terms[f"cos/{pair}"] = hidden_cosine_loss(
                self.projections(pair, layer_output(out.hidden_states, pair.student)),
                layer_output(teacher_hidden, pair.teacher),
                batch["attention_mask"],
            )
        return terms

    def loss_weights(self) -> dict[str, float | torch.Tensor]:
        options = self.options
        weights: dict[str, float | torch.Tensor] = {"ce": options.ce_weight, "kd": options.kd_weight}
        if options.cos_weight != 0:
            weights.update({f"cos/{pair}": options.cos_weight / len(self.layer_pairs) for pair in self.layer_pairs})
        return weights
