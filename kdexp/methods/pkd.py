"""`pkd`: Patient Knowledge Distillation (Sun et al., EMNLP 2019, arXiv 1908.09355); docs/methods/baselines.md.

``L = (1 - alpha)·CE + alpha·T²·KL(softmax(z_T/T) || softmax(z_S/T)) + beta·L_PT`` with the
patient-teacher term over the matched layers' [CLS] vectors (``kdexp.losses.patience_loss``)::

    L_PT = mean_b  Σ_j || h_S[j][CLS]/||h_S[j][CLS]||₂ − h_T[m(j)][CLS]/||h_T[m(j)][CLS]||₂ ||²₂ / (M·D)

``M`` matched layers, ``D`` the teacher width: the reduction of the authors' code
(``F.mse_loss`` over ``[B, M, D]``, intersun/PKD-for-BERT-Model-Compression ``src/KD_loss.py``),
against which their ``beta`` grid {10, 100, 500, 1000} is set. The soft term is the toolkit's
batch-mean KL (as `vanilla_kd`); the authors' ``KLDivLoss(reduction="mean")`` also divides by the
number of classes. For STS-B the soft term is the MSE to the teacher's prediction.

Layer map (``layer_map``): ``skip`` (PKD-Skip, the paper's better variant): the uniform map
``m(j) = (j+1)·L_T/L_S − 1`` over every student layer but the last (whose [CLS] feeds the
classifier and is distilled through the soft labels), i.e. teacher layers 1, 3, 5, 7, 9
(0-based) for BERT-base -> 6 layers, the authors' ``fc_layer_idx``; ``last`` (PKD-Last): the
teacher's layers ``L_T − L_S .. L_T − 2``; or explicit ``[[student, teacher], ...]`` pairs.
Where widths differ the student's vector goes through a learned projection ``W_j`` (one per
pair, :class:`kdexp.internal.losses.InternalProjections`) before normalisation.

Teacher signals: logits from the on-disk cache; the [CLS] vectors of the matched teacher
layers from the cache too (``teacher_cls_cache``: ``auto`` caches them below
``kdexp.methods.internal.CLS_CACHE_MAX_BYTES``, as the authors precompute their teacher's
"patience"), else a live teacher forward through the first ``max m(j) + 1`` blocks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import torch
from omegaconf import MISSING
from torch import Tensor
from transformers import AutoConfig, PretrainedConfig

from kdexp.config import require
from kdexp.errors import ConfigError
from kdexp.internal.layer_map import LayerPair, parse_layer_map, uniform_layer_map
from kdexp.internal.losses import InternalProjections
from kdexp.losses import hinton_weights, kd_terms, layer_output, patience_loss
from kdexp.methods.base import DistillationModule
from kdexp.methods.internal import CLS_CACHE_MAX_BYTES, CLS_CACHE_MODES
from kdexp.model_internals import forward_with_internals
from kdexp.models import model_depth, resolve_model_path
from kdexp.tasks import CLASSIFICATION
from kdexp.teacher import TeacherSignals

if TYPE_CHECKING:
    from kdexp.context import RunContext

log = logging.getLogger(__name__)

PKD_LAYER_MAPS = ("skip", "last")


def pkd_layer_map(spec: Any, num_student_layers: int, num_teacher_layers: int) -> list[LayerPair]:
    """The matched pairs ``(j, m(j))`` of ``skip``, ``last`` or an explicit list (ValueError naming the problem)."""
    if spec == "skip":
        pairs = uniform_layer_map(num_student_layers, num_teacher_layers)[:-1]
    elif spec == "last":
        if num_student_layers > num_teacher_layers:
            raise ValueError(
                f"PKD-Last needs L_S <= L_T, got {num_student_layers} student and {num_teacher_layers} teacher layers"
            )
        offset = num_teacher_layers - num_student_layers
        pairs = [LayerPair(j, offset + j) for j in range(num_student_layers - 1)]
    elif isinstance(spec, str):
        raise ValueError(f"expected skip, last or a list of [student, teacher] pairs, got {spec!r}")
    else:
        pairs = parse_layer_map(spec, num_student_layers, num_teacher_layers)
    if not pairs:
        raise ValueError(
            f"a {num_student_layers}-layer student has no layer below its last to match; give explicit "
            f"pairs, e.g. [[0, {num_teacher_layers - 1}]]"
        )
    return pairs


def known_layer_counts(cfg: Any) -> tuple[int, int] | None:
    """``(L_S, L_T)`` from the run config and the teacher's config.json alone, or None where one is not
    known without loading (a pre-trained student, a Hub teacher not in the local cache)."""
    student = cfg.student
    if student.init in ("first_layers", "every_nth_layer"):
        student_layers = student.get("num_layers")
    elif student.init == "random":
        student_layers = student.get("num_hidden_layers")
    else:
        return None
    try:
        teacher_layers = model_depth(resolve_model_path(cfg.teacher.name_or_path, "teacher.name_or_path"))
    except Exception:  # a bad teacher path is refused by the run's own model checks
        return None
    if teacher_layers is None:
        return None
    return int(student_layers if student_layers is not None else teacher_layers), int(teacher_layers)


@dataclass
class PKDOptions:
    temperature: float = MISSING
    alpha: float = MISSING
    beta: float = MISSING
    layer_map: Any = MISSING  # skip | last | [[student, teacher], ...]
    normalize: bool = MISSING
    teacher_cls_cache: str = MISSING

    def check(self) -> None:
        require(self.temperature > 0, "method.temperature", self.temperature, "a positive temperature (e.g. 10)")
        require(0 <= self.alpha <= 1, "method.alpha", self.alpha, "a weight in [0, 1]")
        require(
            self.beta >= 0, "method.beta", self.beta, "a non-negative weight (the authors' grid: 10, 100, 500, 1000)"
        )
        require(
            self.layer_map in PKD_LAYER_MAPS or isinstance(self.layer_map, list),
            "method.layer_map",
            self.layer_map,
            "skip, last, or a list of [student, teacher] layer pairs",
        )
        require(
            self.teacher_cls_cache in CLS_CACHE_MODES,
            "method.teacher_cls_cache",
            self.teacher_cls_cache,
            "auto, always or never",
        )


class PKD(DistillationModule):
    """Soft-label KD plus the patient-teacher loss on the matched layers' normalised [CLS] vectors."""

    families = (CLASSIFICATION,)

    Options = PKDOptions

    def __init__(
        self,
        student: Any,
        task: Any,
        optim: Any = None,
        *,
        options: PKDOptions,
        teacher: TeacherSignals,
        teacher_config: PretrainedConfig | None = None,
    ) -> None:
        super().__init__(student, task, optim, teacher=teacher)
        config = teacher_config if teacher_config is not None else getattr(teacher.model, "config", None)
        if config is None:
            raise ValueError("PKD needs the teacher's config (its depth and width) or its model")
        try:
            pairs = pkd_layer_map(options.layer_map, student.config.num_hidden_layers, config.num_hidden_layers)
        except ValueError as err:
            raise ConfigError(f"method.layer_map: {err}") from None
        if teacher.model is None and not teacher.has_cls([pair.teacher for pair in pairs]):
            raise ValueError("PKD needs the cached [CLS] vectors of the matched teacher layers or the teacher model")
        self.options = options
        self.layer_pairs = tuple(pairs)
        self.projections = InternalProjections(pairs, student.config.hidden_size, config.hidden_size)

    @classmethod
    def check_config(cls, cfg: Any, task: Any) -> None:
        """Refuse a layer map that cannot work (e.g. PKD-Skip on a 1-layer student) before the teacher stage."""
        super().check_config(cfg, task)
        counts = known_layer_counts(cfg)
        if counts is not None:
            try:
                pkd_layer_map(cfg.method.layer_map, *counts)
            except ValueError as err:
                raise ConfigError(f"method.layer_map: {err}") from None

    @classmethod
    def from_run(cls, run: "RunContext", options: PKDOptions) -> "PKD":
        if not run.teacher.shares_tokenizer_with(run.data):
            raise ConfigError(
                "method=pkd matches the teacher's [CLS] vectors on the student's tokenisation, so the "
                "student must use the teacher's tokenizer; student.init=pretrained with another "
                "tokenizer cannot be used"
            )
        config = AutoConfig.from_pretrained(run.teacher.path)
        try:
            pairs = pkd_layer_map(options.layer_map, run.student.config.num_hidden_layers, config.num_hidden_layers)
        except ValueError as err:
            raise ConfigError(f"method.layer_map: {err}") from None
        layers = sorted({pair.teacher for pair in pairs})
        split = run.task.train_split
        rows = len(run.data.tokenized[split])
        cached = options.teacher_cls_cache == "always" or (
            options.teacher_cls_cache == "auto" and rows * len(layers) * config.hidden_size * 4 <= CLS_CACHE_MAX_BYTES
        )
        teacher = TeacherSignals(
            logits=run.teacher.logits(run.data, split),
            model=None if cached else run.teacher.load_model(),
            cls=run.teacher.cls_vectors(run.data, split, layers) if cached else None,
            cls_layers=layers if cached else (),
        )
        run.method_info.update(
            {"layer_pairs": [[p.student, p.teacher] for p in pairs], "teacher_cls": "cached" if cached else "live"}
        )
        log.info(
            "PKD: student layer <- teacher layer %s, teacher [CLS] %s",
            ", ".join(f"{p.student} <- {p.teacher}" for p in pairs),
            "cached" if cached else "live",
        )
        return cls(run.student, run.task, run.optim, options=options, teacher=teacher, teacher_config=config)

    # ------------------------------------------------------------------ the loss

    def teacher_cls(self, batch: dict[str, Tensor]) -> Tensor:
        """``h_T[m(j)][CLS]`` of every pair, ``[B, M, D_T]``: from the cache, or a live truncated forward."""
        assert self.teacher is not None
        layers = [pair.teacher for pair in self.layer_pairs]
        if self.teacher.has_cls(layers):
            return torch.stack([self.teacher.cls(batch, layer) for layer in layers], dim=1)
        hidden = self.teacher.internals(batch, need_attentions=False, depth=max(layers) + 1).hidden_states
        assert hidden is not None
        return torch.stack([layer_output(hidden, layer)[:, 0] for layer in layers], dim=1)

    def student_cls(self, hidden_states: Sequence[Tensor]) -> Tensor:
        """``W_j h_S[j][CLS]`` of every pair, ``[B, M, D_T]``."""
        return torch.stack(
            [self.projections(pair, layer_output(hidden_states, pair.student)[:, 0]) for pair in self.layer_pairs],
            dim=1,
        )

    def loss_terms(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        assert self.teacher is not None
        out = forward_with_internals(self.student, batch, need_attentions=False)
        assert out.hidden_states is not None
        terms = kd_terms(
            out.logits, self.teacher.logits(batch), batch["labels"], self.options.temperature, self.task.is_regression
        )
        terms["pt"] = patience_loss(
            self.student_cls(out.hidden_states), self.teacher_cls(batch), self.options.normalize
        )
        return terms

    def loss_weights(self) -> dict[str, float | torch.Tensor]:
        return {**hinton_weights(self.options.alpha), "pt": self.options.beta}
