"""Distillation from internal representations (Aguilar et al., AAAI 2020, arXiv 1910.03723).

The student matches the teacher's self-attention probabilities (KL per head, averaged over
heads and real query tokens) and [CLS] vectors (``1 - cos`` through a learned projection where
widths differ) at matched layers, optionally hidden states (MSE), in stages, and ends with
soft-label KD (docs/methods/internal.md):

- ``all``: one internal stage over every matched pair, then the KD stage;
- ``pid`` (progressive): one pair per stage, bottom-up, then KD;
- ``sid`` (stacked): stage ``s`` keeps the losses of pairs ``0..s``, then KD.

The stages are epoch phases (:class:`kdexp.internal.stages.StageSchedule` on
:class:`kdexp.phases.PhaseSchedule`); the base restarts the learning rate per stage
(``lr_schedule: per_stage``) and keeps the stage in checkpoints. The terms come from
:mod:`kdexp.internal.losses` (toolkit losses named per pair) and :func:`kdexp.losses.kd_terms`.

Teacher signals: logits from the cache; attention maps (and hidden states for the MSE option)
from a live eager teacher forward, only up to the deepest matched layer when
``truncate_forward``; [CLS] vectors from the cache when a stage needs nothing else
(``teacher_cls_cache: auto``), so that the teacher forward is skipped. Attention maps are too
large to cache (N·L² per layer and head).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Sequence, cast

import torch
from omegaconf import MISSING
from torch import Tensor

from kdexp.config import require
from kdexp.errors import ConfigError
from kdexp.internal.layer_map import LayerPair, resolve_layer_map
from kdexp.internal.losses import HEAD_MISMATCH_RULES, InternalProjections, internal_terms, internal_weights
from kdexp.internal.stages import ALGORITHMS, Algorithm, StageSchedule, num_internal_stages, total_epochs_needed
from kdexp.losses import hinton_weights, kd_terms
from kdexp.losses.features import ATTENTION_HEAD_REDUCTIONS, HeadMismatch
from kdexp.methods.base import DistillationModule
from kdexp.model_internals import ModelInternals, forward_with_internals, truncated_encoder
from kdexp.tasks import CLASSIFICATION
from kdexp.teacher import TeacherSignals

if TYPE_CHECKING:
    from kdexp.context import RunContext

log = logging.getLogger(__name__)

LR_SCHEDULES = ("per_stage", "global")
CLS_CACHE_MODES = ("auto", "always", "never")
# "auto" caches [CLS] vectors only up to this size (N × matched teacher layers × D_T floats).
CLS_CACHE_MAX_BYTES = 2 * 1024**3


class InternalConfigError(ConfigError):
    """A method option that cannot work; names the key (``method.<key>``) and what would."""


@dataclass
class InternalOptions:
    algorithm: str = MISSING
    layer_map: Any = MISSING  # "uniform" or explicit [[student, teacher], ...] pairs
    attention_weight: float = MISSING
    cls_weight: float = MISSING
    hidden_mse_weight: float = MISSING
    head_mismatch: str = MISSING
    epochs_per_stage: int = MISSING
    patience: Optional[int] = MISSING
    min_delta: float = MISSING
    kd_epochs: int = MISSING
    temperature: float = MISSING
    alpha: float = MISSING
    final_alpha: Optional[float] = None  # alpha of the final KD stage (null: alpha; 1: soft labels only)
    attention_heads: str = "mean"  # attention KL per head: mean or sum over heads
    kd_in_internal_stages: bool = MISSING
    lr_schedule: str = MISSING
    truncate_forward: bool = MISSING
    teacher_cls_cache: str = MISSING

    def check(self) -> None:
        require(self.algorithm in ALGORITHMS, "method.algorithm", self.algorithm, "one of " + ", ".join(ALGORITHMS))
        require(
            self.head_mismatch in HEAD_MISMATCH_RULES,
            "method.head_mismatch",
            self.head_mismatch,
            "one of " + ", ".join(HEAD_MISMATCH_RULES),
        )
        require(self.lr_schedule in LR_SCHEDULES, "method.lr_schedule", self.lr_schedule, "per_stage or global")
        require(
            self.teacher_cls_cache in CLS_CACHE_MODES,
            "method.teacher_cls_cache",
            self.teacher_cls_cache,
            "auto, always or never",
        )
        require(self.epochs_per_stage >= 1, "method.epochs_per_stage", self.epochs_per_stage, "1 or more")
        require(
            self.kd_epochs >= 0,
            "method.kd_epochs",
            self.kd_epochs,
            "0 (no final KD stage: the last internal stage lasts to the end) or more",
        )
        require(self.patience is None or self.patience >= 1, "method.patience", self.patience, "null or 1 or more")
        require(self.min_delta >= 0, "method.min_delta", self.min_delta, "0 or more")
        require(self.temperature > 0, "method.temperature", self.temperature, "a positive temperature")
        require(0 <= self.alpha <= 1, "method.alpha", self.alpha, "a weight in [0, 1]")
        require(
            self.final_alpha is None or 0 <= self.final_alpha <= 1,
            "method.final_alpha",
            self.final_alpha,
            "null (method.alpha) or a weight in [0, 1]",
        )
        require(
            self.attention_heads in ATTENTION_HEAD_REDUCTIONS,
            "method.attention_heads",
            self.attention_heads,
            " or ".join(ATTENTION_HEAD_REDUCTIONS),
        )
        weights = (self.attention_weight, self.cls_weight, self.hidden_mse_weight)
        require(min(weights) >= 0, "method.attention_weight/cls_weight/hidden_mse_weight", weights, "weights >= 0")
        require(
            max(weights) > 0,
            "method.attention_weight/cls_weight/hidden_mse_weight",
            weights,
            "at least one positive weight (method=vanilla_kd is soft-label KD alone)",
        )
        require(
            self.layer_map == "uniform" or isinstance(self.layer_map, list),
            "method.layer_map",
            self.layer_map,
            "uniform, or a list of [student, teacher] layer pairs",
        )

    @property
    def needs_live_teacher(self) -> bool:
        """Attentions and full hidden states come from a live forward; [CLS] alone can be cached."""
        return self.attention_weight != 0 or self.hidden_mse_weight != 0


class InternalDistillation(DistillationModule):
    """``all`` / ``pid`` / ``sid`` internal-representation distillation, ending with soft-label KD."""

    families = (CLASSIFICATION,)

    Options = InternalOptions
    phases: StageSchedule  # set in __init__: the stages are the phases

    def __init__(
        self, student: Any, task: Any, optim: Any = None, *, options: InternalOptions, teacher: TeacherSignals
    ) -> None:
        super().__init__(student, task, optim, teacher=teacher)
        self.options = options
        model = teacher.model
        teacher_depth = model.config.num_hidden_layers if model is not None else max(teacher.cls_layers) + 1
        try:
            pairs = resolve_layer_map(options.layer_map, student.config.num_hidden_layers, teacher_depth)
        except ValueError as err:
            raise InternalConfigError(f"method.layer_map: {err}") from None
        if model is not None and options.attention_weight != 0:
            heads = (student.config.num_attention_heads, model.config.num_attention_heads)
            if heads[0] != heads[1] and options.head_mismatch == "error":
                raise InternalConfigError(
                    f"student has {heads[0]} attention heads and teacher {heads[1]}: attention KL compares heads one "
                    "to one. Set method.head_mismatch=average (compare head-averaged maps) or method.attention_weight=0"
                )
        self.layer_pairs = tuple(pairs)
        self.phases = StageSchedule(
            cast(Algorithm, options.algorithm),  # InternalOptions.check refused any other
            pairs,
            options.epochs_per_stage,
            options.patience,
            options.min_delta,
            final_kd=options.kd_epochs > 0,
        )
        self.lr_per_phase = options.lr_schedule == "per_stage"
        if model is not None:
            teacher_width = model.config.hidden_size
        else:
            assert teacher.cached_cls is not None  # without the model, the teacher's layers are its cached [CLS]
            teacher_width = int(teacher.cached_cls.shape[-1])
        # Learned W per pair (Linear where widths differ): submodules, so optimised and checkpointed.
        self.projections = InternalProjections(pairs, student.config.hidden_size, teacher_width)

    @property
    def schedule(self) -> StageSchedule:
        return self.phases

    @classmethod
    def check_config(cls, cfg: Any, task: Any) -> None:
        """Refuse a `trainer.max_epochs` too small for the stages, before the teacher stage."""
        super().check_config(cfg, task)
        method = cfg.method
        if method.layer_map == "uniform":
            student = cfg.student
            layers = student.get("num_layers") if student.init != "random" else student.get("num_hidden_layers")
        else:
            layers = len(method.layer_map)
        if layers is None:
            return  # a pre-trained student: its depth is known once loaded
        needed = total_epochs_needed(method.algorithm, int(layers), int(method.epochs_per_stage), int(method.kd_epochs))
        if int(cfg.trainer.max_epochs) < needed:
            stages = num_internal_stages(method.algorithm, int(layers))
            raise InternalConfigError(
                f"trainer.max_epochs={cfg.trainer.max_epochs} is too small for internal_{method.algorithm}: {stages} "
                f"internal stage(s) × method.epochs_per_stage={method.epochs_per_stage} + method.kd_epochs="
                f"{method.kd_epochs} = {needed} epochs. Set trainer.max_epochs={needed} (or more), or lower "
                "method.epochs_per_stage / method.kd_epochs"
            )

    @classmethod
    def from_run(cls, run: "RunContext", options: InternalOptions) -> "InternalDistillation":
        if not run.teacher.shares_tokenizer_with(run.data):
            raise InternalConfigError(
                "internal distillation compares attention maps position by position, so the student must use the "
                "teacher's tokenizer; student.init=pretrained with another tokenizer cannot be used"
            )
        teacher_model = run.teacher.load_model()
        try:
            pairs = resolve_layer_map(
                options.layer_map, run.student.config.num_hidden_layers, teacher_model.config.num_hidden_layers
            )
        except ValueError as err:
            raise InternalConfigError(f"method.layer_map: {err}") from None
        layers = sorted({pair.teacher for pair in pairs})
        cache_cls = _use_cls_cache(options, len(run.data.train), len(layers), teacher_model.config.hidden_size)
        teacher = TeacherSignals(
            logits=run.teacher.logits(run.data, run.task.train_split),
            model=teacher_model,
            cls=run.teacher.cls_vectors(run.data, run.task.train_split, layers) if cache_cls else None,
            cls_layers=layers if cache_cls else (),
        )
        return cls(run.student, run.task, run.optim, options=options, teacher=teacher)

    # ------------------------------------------------------------------ what the current stage needs

    def stage_needs_output_loss(self) -> bool:
        return self.schedule.is_final_kd_stage or self.options.kd_in_internal_stages

    def teacher_internals(self, batch: dict[str, Tensor], pairs: Sequence[LayerPair]) -> ModelInternals:
        """The teacher's hidden states (and attentions if weighted) for ``batch``, no gradient.

        From the cache when only [CLS] is needed and cached (``hidden_states[m + 1]`` is then
        ``[B, 1, D_T]``, the [CLS] row only); else a live forward through the first
        ``max m(j) + 1`` blocks when ``truncate_forward``.
        """
        assert self.teacher is not None
        layers = [pair.teacher for pair in pairs]
        if not self.options.needs_live_teacher and self.teacher.has_cls(layers):
            hidden: list[Tensor | None] = [None] * (max(layers) + 2)
            for layer in layers:
                hidden[layer + 1] = self.teacher.cls(batch, layer).unsqueeze(1)
            return ModelInternals(logits=None, hidden_states=tuple(hidden), attentions=None)  # type: ignore[arg-type]
        depth = max(layers) + 1 if self.options.truncate_forward else None
        return self.teacher.internals(batch, need_attentions=self.options.attention_weight != 0, depth=depth)

    def student_internals(
        self, batch: dict[str, Tensor], pairs: Sequence[LayerPair], need_logits: bool
    ) -> ModelInternals:
        depth = None if need_logits or not self.options.truncate_forward else max(p.student for p in pairs) + 1
        with truncated_encoder(self.student, depth):
            return forward_with_internals(self.student, batch, need_attentions=self.options.attention_weight != 0)

    # ------------------------------------------------------------------ the loss

    def _kinds(self) -> list[str]:
        weights = (self.options.attention_weight, self.options.cls_weight, self.options.hidden_mse_weight)
        return [kind for kind, w in zip(("attention_kl", "cls_cosine", "hidden_mse"), weights) if w != 0]

    def loss_terms(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        assert self.teacher is not None
        if self.schedule.is_final_kd_stage:
            return kd_terms(
                self(batch),
                self.teacher.logits(batch),
                batch["labels"],
                self.options.temperature,
                self.task.is_regression,
            )
        pairs = self.schedule.active_pairs()
        teacher_out = self.teacher_internals(batch, pairs)
        student_out = self.student_internals(batch, pairs, need_logits=self.options.kd_in_internal_stages)
        # Both hold hidden states: forwards with internals keep them, and the teacher's may be its cached [CLS].
        assert student_out.hidden_states is not None and teacher_out.hidden_states is not None
        terms = internal_terms(
            pairs,
            student_out.hidden_states,
            teacher_out.hidden_states,
            batch["attention_mask"],
            self.projections,
            student_out.attentions,
            teacher_out.attentions,
            self._kinds(),
            cast(HeadMismatch, self.options.head_mismatch),  # InternalOptions.check refused any other
            self.options.attention_heads,
        )
        if self.options.kd_in_internal_stages:
            terms.update(
                kd_terms(
                    student_out.logits,
                    self.teacher.logits(batch),
                    batch["labels"],
                    self.options.temperature,
                    self.task.is_regression,
                )
            )
        return terms

    def loss_weights(self) -> dict[str, float | torch.Tensor]:
        options = self.options
        weights: dict[str, float | torch.Tensor] = {}
        if not self.schedule.is_final_kd_stage:
            weights.update(
                internal_weights(
                    self.schedule.active_pairs(),
                    options.attention_weight,
                    options.cls_weight,
                    options.hidden_mse_weight,
                )
            )
        if self.stage_needs_output_loss():
            final_alpha = options.final_alpha if self.schedule.is_final_kd_stage else None
            weights.update(hinton_weights(final_alpha if final_alpha is not None else options.alpha))
        return weights

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        self.log(
            "train/stage",
            float(self.schedule.current_stage.index),
            on_step=False,
            on_epoch=True,
            batch_size=batch["input_ids"].shape[0],
        )
        return loss

    # ------------------------------------------------------------------ stages

    def describe_stage(self) -> str:
        stage = self.schedule.current_stage
        options = self.options
        if stage.is_final_kd:
            alpha = options.alpha if options.final_alpha is None else options.final_alpha
            what = f"soft-label KD (T={options.temperature}, alpha={alpha}), for the rest of training"
        else:
            losses = [
                name
                for name, w in (
                    ("attention KL", options.attention_weight),
                    ("[CLS] cosine", options.cls_weight),
                    ("hidden MSE", options.hidden_mse_weight),
                )
                if w != 0
            ]
            layers = ", ".join(f"student layer {p.student} <- teacher layer {p.teacher}" for p in stage.pairs)
            what = f"{' + '.join(losses)} at {layers}" + (" + soft-label KD" if options.kd_in_internal_stages else "")
        return f"internal_{options.algorithm} stage {stage.index + 1}/{len(self.schedule.stages)}: {what}"

    def on_train_start(self) -> None:
        super().on_train_start()
        log.info("Epoch %d: %s", self.current_epoch, self.describe_stage())

    def on_phase_start(self, index: int) -> None:
        if index > 0:
            log.info("Epoch %d: %s", self.current_epoch + 1, self.describe_stage())


def _use_cls_cache(options: InternalOptions, rows: int, layers: int, width: int) -> bool:
    """Whether to cache [CLS]: "auto" when it replaces every internal-stage teacher forward and is small."""
    if options.teacher_cls_cache == "never":
        return False
    if options.teacher_cls_cache == "always":
        return True
    return not options.needs_live_teacher and rows * layers * width * 4 <= CLS_CACHE_MAX_BYTES
