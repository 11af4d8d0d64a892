"""Distillation from internal representations (Aguilar et al., AAAI 2020, arXiv 1910.03723).

METHODS.md §4. The student matches the teacher's self-attention probabilities (KL per
head, averaged over heads and real query tokens) and [CLS] vectors (``1 - cos`` through a
learned projection where widths differ) at matched layers, optionally hidden states
(MSE), in stages, and ends with soft-label KD:

- ``all``: one internal stage over every matched pair, then the KD stage;
- ``pid`` (progressive): one pair per stage, bottom-up, then KD;
- ``sid`` (stacked): stage ``s`` keeps the losses of pairs ``0..s``, then KD.

The losses, layer maps and stage bookkeeping are in :mod:`kdexp.internal`; this module is
the LightningModule around them.

Choices where the paper leaves room (all configurable; see ``conf/method/internal_*.yaml``):

- Reading of "``all``: every matched layer at once, *with* soft-label KD": the internal
  losses of all pairs and the output loss (``vanilla_kd_loss``: ``(1-alpha)·CE +
  alpha·T²·KL``) are minimised *together* in the internal stage
  (``kd_in_internal_stages: true`` in ``internal_all.yaml``), followed by the KD stage
  that every algorithm ends with. For ``pid``/``sid`` the internal stages carry the
  internal losses only (the classifier is optimised "last", with soft labels), which is
  ``kd_in_internal_stages: false``. Either algorithm accepts either value.
- Stage length: ``epochs_per_stage`` epochs, or fewer when ``patience`` is set and the
  stage's epoch-mean loss (the total minimised in that stage) has not improved by
  ``min_delta`` for ``patience`` epochs. The final KD stage lasts the rest of training;
  it must get at least ``kd_epochs`` epochs, so ``trainer.max_epochs`` must be at least
  ``internal stages × epochs_per_stage + kd_epochs`` (checked before training).
- Learning rate: ``lr_schedule: per_stage`` (default) restarts the warm-up + linear decay
  of the BERT recipe at each stage over that stage's epoch budget (the KD stage: the
  epochs that remain), so every stage starts at the full rate as if the stage were its own
  fine-tuning run; ``global`` keeps one schedule over all epochs (the foundation's
  default for other methods). The AdamW state is kept across stages.
- Model selection stays the framework's (best dev checkpoint over all epochs).
- Transitions happen at epoch ends (``on_train_epoch_end``); the schedule, the stage's
  start step and the running epoch loss are saved in checkpoints, so a resumed run
  continues in the stage (and epoch count within it) where it stopped. A checkpoint
  written during the end-of-epoch validation (before ``on_train_epoch_end``) carries the
  finished epoch's loss, and the transition it would have caused is applied on resume.
- Teacher and student must share a tokenizer: attention maps are compared position by
  position (refused before training otherwise).
- ``truncate_forward`` (default on): when a stage needs nothing above a layer (``pid``
  stage 0 needs teacher layer ``m(0)`` and student layer 0 only, with no output loss),
  the blocks above are not run, for teacher and student alike. The gradients are the
  same (the upper blocks get none either way); it saves forward/backward work in
  ``pid``/``sid``'s lower stages.

Teacher signals: cached or live, and why. Measured on the shared 2-core CPU with one torch
thread (``OMP_NUM_THREADS=1``), MiniLM-L6 teacher, 3-layer student, SST-2 batches of 32
(max length 128), uniform map (teacher layers 1, 3, 5):

- Per step (``python -m kdexp.internal.bare_loop --components --batches 8``, median
  s/batch): teacher forward SDPA logits only 0.88, SDPA + hidden states 0.87, eager with
  attentions 0.88; student forward+backward SDPA 1.44, eager with attentions 1.46; a
  cached [CLS] lookup 0.00014. The teacher forward is ~37% of an internal step.
- Sizes (fp32, full train splits, 3 matched layers, unpadded lengths): [CLS] vectors
  4.6 KB/example (CoLA 39 MB, SST-2 310 MB, MRPC 17 MB, RTE 11.5 MB); attention maps
  (layers × 12 heads × L²) 30 KB (CoLA), 38 KB (SST-2), 436 KB (MRPC), 794 KB (RTE) per
  example, 0.25 / 2.6 / 1.6 / 2.0 GB, i.e. 6-170× the [CLS] cache, growing with L²; twice
  that for the paper's BERT-base teacher with 6 matched layers (MNLI: ~10² GB).

Decision, implemented:

- Logits: cached (the framework's teacher-logit cache). The final KD stage, and the KD
  term of internal stages, never run the teacher.
- [CLS] vectors: cached (``teacher_cls_cache: auto``) when they are all a stage needs
  (``attention_weight = hidden_mse_weight = 0``): the teacher forward is then skipped. End
  to end such a stage trains 1.32× faster cached than live (53.8 vs 40.7 examples/s, 2
  threads, median of 3: ``python -m kdexp.internal.bare_loop task=sst2
  data.max_train_samples=256 teacher.max_train_samples=2000 student.num_layers=3
  optim.learning_rate=5e-4 --repeats 3``; with one thread 1.49×, 19.1 vs 12.8).
  When attentions are needed, the live forward yields the hidden states at no extra cost
  (0.87 vs 0.88 s), so a [CLS] cache would save nothing and is not used. Stored under a
  key of (teacher, tokenised split, layers), like the logits.
- Attention maps (and full hidden states for the MSE option): live, eager (pre-dropout)
  teacher forward under ``no_grad``, only on internal stages that weight them, and only
  up to the deepest matched teacher layer. A cache would save the teacher forward (~37%
  of a step) but its size grows with N·L² (GBs for the full local tasks, ~10² GB for
  MNLI with BERT-base), it would have to be re-padded per batch, and reading it back at
  these sizes is not free either; only toy slices would fit, so it is not implemented.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Optional, Sequence

import torch
from torch import Tensor
from omegaconf import MISSING
from torch.optim.lr_scheduler import LambdaLR

from kdexp.cache import cache_key, load_or_compute, load_tensors, save_tensors
from kdexp.internal.internals import ModelInternals, forward_with_internals, truncated_encoder
from kdexp.internal.layer_map import LayerPair, resolve_layer_map
from kdexp.internal.losses import HEAD_MISMATCH_RULES, InternalProjections, internal_distillation_loss
from kdexp.internal.stages import ALGORITHMS, StageSchedule, num_internal_stages, total_epochs_needed
from kdexp.losses import vanilla_kd_loss
from kdexp.config import require
from kdexp.errors import ConfigError
from kdexp.methods.base import DistillationModule

if TYPE_CHECKING:
    from kdexp.data import TaskData
    from kdexp.run import RunContext
    from kdexp.teacher import Teacher

log = logging.getLogger(__name__)

CHECKPOINT_KEY = "internal_distillation"
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
    kd_in_internal_stages: bool = MISSING
    lr_schedule: str = MISSING
    truncate_forward: bool = MISSING
    teacher_cls_cache: str = MISSING

    def check(self) -> None:
        require(self.algorithm in ALGORITHMS, "method.algorithm", self.algorithm, "one of " + ", ".join(ALGORITHMS))
        require(self.head_mismatch in HEAD_MISMATCH_RULES, "method.head_mismatch", self.head_mismatch,
                "one of " + ", ".join(HEAD_MISMATCH_RULES))
        require(self.lr_schedule in LR_SCHEDULES, "method.lr_schedule", self.lr_schedule, "per_stage or global")
        require(self.teacher_cls_cache in CLS_CACHE_MODES, "method.teacher_cls_cache", self.teacher_cls_cache,
                "auto, always or never")
        require(self.epochs_per_stage >= 1, "method.epochs_per_stage", self.epochs_per_stage, "1 or more")
        require(self.kd_epochs >= 1, "method.kd_epochs", self.kd_epochs, "1 or more (the final soft-label KD stage)")
        require(self.patience is None or self.patience >= 1, "method.patience", self.patience, "null or 1 or more")
        require(self.temperature > 0, "method.temperature", self.temperature, "a positive temperature")
        require(0 <= self.alpha <= 1, "method.alpha", self.alpha, "a weight in [0, 1]")
        require(self.layer_map == "uniform" or isinstance(self.layer_map, list), "method.layer_map", self.layer_map,
                "uniform, or a list of [student, teacher] layer pairs")


class InternalDistillation(DistillationModule):
    """``all`` / ``pid`` / ``sid`` internal-representation distillation, ending with soft-label KD."""

    Options = InternalOptions

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
            return  # a pre-trained student: its depth is known once loaded (checked then)
        needed = total_epochs_needed(method.algorithm, int(layers), int(method.epochs_per_stage), int(method.kd_epochs))
        if int(cfg.trainer.max_epochs) < needed:
            stages = num_internal_stages(method.algorithm, int(layers))
            raise InternalConfigError(
                f"trainer.max_epochs={cfg.trainer.max_epochs} is too small for internal_{method.algorithm}: {stages} "
                f"internal stage(s) × method.epochs_per_stage={method.epochs_per_stage} + method.kd_epochs="
                f"{method.kd_epochs} = {needed} epochs. Set trainer.max_epochs={needed} (or more), or lower "
                "method.epochs_per_stage / method.kd_epochs"
            )

    def __init__(
        self,
        student: Any,
        task: Any,
        optim: Any = None,
        *,
        teacher_model: torch.nn.Module | None,
        teacher_logits: Tensor,
        algorithm: Literal["all", "pid", "sid"] = "all",
        layer_map: str | Sequence[Sequence[int]] | None = "uniform",
        attention_weight: float = 1.0,
        cls_weight: float = 1.0,
        hidden_mse_weight: float = 0.0,
        head_mismatch: str = "error",
        epochs_per_stage: int = 1,
        patience: int | None = None,
        min_delta: float = 0.0,
        kd_epochs: int = 1,
        temperature: float = 2.0,
        alpha: float = 0.5,
        kd_in_internal_stages: bool = False,
        lr_schedule: str = "per_stage",
        truncate_forward: bool = True,
        max_epochs: int | None = None,
        teacher_cls: Tensor | None = None,
        teacher_cls_layers: Sequence[int] | None = None,
    ) -> None:
        super().__init__(student, task, optim)
        if algorithm not in ALGORITHMS:
            raise InternalConfigError(f"method.algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
        if head_mismatch not in HEAD_MISMATCH_RULES:
            raise InternalConfigError(f"method.head_mismatch must be one of {HEAD_MISMATCH_RULES}, got {head_mismatch!r}")
        if lr_schedule not in LR_SCHEDULES:
            raise InternalConfigError(f"method.lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}")
        if min(attention_weight, cls_weight, hidden_mse_weight) < 0:
            raise InternalConfigError("method.attention_weight, cls_weight and hidden_mse_weight must be >= 0")
        if attention_weight == cls_weight == hidden_mse_weight == 0:
            raise InternalConfigError(
                "method.attention_weight, method.cls_weight and method.hidden_mse_weight are all 0: nothing internal "
                "to distil (use method=vanilla_kd for soft-label KD alone)"
            )
        if kd_epochs < 1:
            raise InternalConfigError(f"method.kd_epochs must be at least 1 (the final soft-label KD stage), got {kd_epochs}")

        student_config = student.config
        teacher_config = teacher_model.config if teacher_model is not None else None
        num_teacher_layers = teacher_config.num_hidden_layers if teacher_config is not None else None
        if num_teacher_layers is None:
            if teacher_cls_layers is None:
                raise InternalConfigError("InternalDistillation needs a teacher model or cached teacher [CLS] vectors")
            num_teacher_layers = max(teacher_cls_layers) + 1
        try:
            pairs = resolve_layer_map(layer_map, student_config.num_hidden_layers, num_teacher_layers)
        except ValueError as err:
            raise InternalConfigError(f"method.layer_map: {err}") from None
        if teacher_config is not None and attention_weight != 0:
            heads = (student_config.num_attention_heads, teacher_config.num_attention_heads)
            if heads[0] != heads[1] and head_mismatch == "error":
                raise InternalConfigError(
                    f"student has {heads[0]} attention heads and teacher {heads[1]}: attention KL compares heads one "
                    "to one. Set method.head_mismatch=average (compare head-averaged maps) or method.attention_weight=0"
                )

        self.algorithm = algorithm
        self.layer_pairs = tuple(pairs)
        self.attention_weight = float(attention_weight)
        self.cls_weight = float(cls_weight)
        self.hidden_mse_weight = float(hidden_mse_weight)
        self.head_mismatch = head_mismatch
        self.kd_epochs = int(kd_epochs)
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.kd_in_internal_stages = bool(kd_in_internal_stages)
        self.lr_schedule = lr_schedule
        self.truncate_forward = bool(truncate_forward)
        try:
            self.schedule = StageSchedule(algorithm, pairs, int(epochs_per_stage), patience, float(min_delta))
        except ValueError as err:
            raise InternalConfigError(f"method.epochs_per_stage / patience / min_delta: {err}") from None
        needed = total_epochs_needed(algorithm, len(pairs), int(epochs_per_stage), self.kd_epochs)
        self.epochs_needed = needed
        if max_epochs is not None and 0 <= max_epochs < needed:
            stages = num_internal_stages(algorithm, len(pairs))
            raise InternalConfigError(
                f"trainer.max_epochs={max_epochs} is too small for internal_{algorithm}: {stages} internal stage(s) × "
                f"method.epochs_per_stage={epochs_per_stage} + method.kd_epochs={kd_epochs} = {needed} epochs. "
                f"Set trainer.max_epochs={needed} (or more), or lower method.epochs_per_stage / method.kd_epochs"
            )

        # Learned W per pair (Linear where widths differ): submodules, so optimised and checkpointed.
        teacher_width = teacher_config.hidden_size if teacher_config is not None else int(teacher_cls.shape[-1])  # type: ignore[union-attr]
        self.projections = InternalProjections(pairs, student_config.hidden_size, teacher_width)
        # Frozen teacher: not a submodule, so neither optimised nor stored in checkpoints.
        self._teacher = [teacher_model.eval().requires_grad_(False)] if teacher_model is not None else []
        self.register_buffer("teacher_logits", teacher_logits.float(), persistent=False)
        self.teacher_cls_layers = tuple(int(layer) for layer in teacher_cls_layers) if teacher_cls_layers else ()
        if teacher_cls is not None:
            self.register_buffer("teacher_cls", teacher_cls.float(), persistent=False)
        else:
            self.teacher_cls = None

        # Running loss of the current epoch (for patience), and the per-stage LR schedule state.
        self._epoch_loss_sum: Tensor | float = 0.0
        self._epoch_loss_count = 0
        self._epoch_loss_epoch: int | None = None
        self._pending: dict[str, Any] | None = None
        self._stage_start_step = 0
        self._steps_per_epoch: int | None = None
        self._total_steps: int | None = None

    # ------------------------------------------------------------------ construction from a run

    @classmethod
    def from_run(cls, run: "RunContext", teacher_cls_cache: str = "auto", **options: Any) -> "InternalDistillation":
        if not run.teacher.shares_tokenizer_with(run.data):
            raise InternalConfigError(
                "internal distillation compares attention maps position by position, so the student must use the "
                "teacher's tokenizer; student.init=pretrained with another tokenizer cannot be used"
            )
        if teacher_cls_cache not in CLS_CACHE_MODES:
            raise InternalConfigError(f"method.teacher_cls_cache must be one of {CLS_CACHE_MODES}, got {teacher_cls_cache!r}")
        teacher_model = run.teacher.load_model()
        max_epochs = run.cfg.trainer.get("max_epochs")
        signals: dict[str, Any] = {
            "teacher_model": teacher_model,
            "teacher_logits": run.teacher.logits(run.data, run.task.train_split),
            "max_epochs": None if max_epochs is None else int(max_epochs),
        }
        # Layers whose [CLS] the cache would hold: those of the layer map, resolved as the module will.
        layer_map = options.get("layer_map", "uniform")
        try:
            pairs = resolve_layer_map(layer_map, run.student.config.num_hidden_layers, teacher_model.config.num_hidden_layers)
        except ValueError as err:
            raise InternalConfigError(f"method.layer_map: {err}") from None
        layers = sorted({pair.teacher for pair in pairs})
        if _use_cls_cache(teacher_cls_cache, options, len(run.data.train), len(layers), teacher_model.config.hidden_size):
            signals["teacher_cls"] = teacher_cls_vectors(run.teacher, teacher_model, run.data, run.task.train_split, layers)
            signals["teacher_cls_layers"] = layers
        return cls(student=run.student, task=run.task, optim=run.optim, **signals, **options)

    # ------------------------------------------------------------------ what the current stage needs

    @property
    def teacher_model(self) -> torch.nn.Module | None:
        return self._teacher[0] if self._teacher else None

    def stage_needs_output_loss(self) -> bool:
        return self.schedule.is_final_kd_stage or self.kd_in_internal_stages

    def _teacher_needed_for(self, pairs: Sequence[LayerPair]) -> bool:
        """Whether the stage needs a live teacher forward (not when cached [CLS] vectors suffice)."""
        if self.attention_weight != 0 or self.hidden_mse_weight != 0:
            return True
        return not (self.teacher_cls is not None and all(p.teacher in self.teacher_cls_layers for p in pairs))

    def teacher_internals(self, batch: dict[str, Tensor], pairs: Sequence[LayerPair]) -> ModelInternals:
        """The teacher's hidden states (and attentions if weighted) for ``batch``, no gradient.

        Live forward (eager pre-dropout attention only when ``attention_weight != 0``;
        the teacher's SDPA otherwise), through the first ``max m(j) + 1`` blocks when
        ``truncate_forward``; or, when only [CLS] is needed and it is cached, the cached
        vectors (``hidden_states[m + 1]`` is then ``[B, 1, D_T]``, the [CLS] row only).
        """
        if not self._teacher_needed_for(pairs):
            assert self.teacher_cls is not None
            rows = self.teacher_cls[batch["idx"]]
            hidden: list[Tensor | None] = [None] * (max(self.teacher_cls_layers) + 2)
            for column, layer in enumerate(self.teacher_cls_layers):
                hidden[layer + 1] = rows[:, column].unsqueeze(1)
            return ModelInternals(logits=self.teacher_logits[batch["idx"]], hidden_states=tuple(hidden), attentions=None)  # type: ignore[arg-type]
        teacher = self.teacher_model
        if teacher is None:
            raise RuntimeError("this stage needs a live teacher forward but the module was built without a teacher model")
        depth = max(p.teacher for p in pairs) + 1 if self.truncate_forward else None
        with torch.no_grad(), truncated_encoder(teacher, depth):
            return forward_with_internals(teacher, batch, need_attentions=self.attention_weight != 0)

    def student_internals(self, batch: dict[str, Tensor], pairs: Sequence[LayerPair], need_logits: bool) -> ModelInternals:
        depth = None if need_logits or not self.truncate_forward else max(p.student for p in pairs) + 1
        with truncated_encoder(self.student, depth):
            return forward_with_internals(self.student, batch, need_attentions=self.attention_weight != 0)

    def output_loss(self, logits: Tensor, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Soft-label KD from the cached teacher logits: ``(1-alpha)·CE + alpha·T²·KL`` (MSE for STS-B)."""
        return vanilla_kd_loss(
            logits,
            self.teacher_logits[batch["idx"]],
            batch["labels"],
            alpha=self.alpha,
            temperature=self.temperature,
            regression=self.task.is_regression,
        )

    # ------------------------------------------------------------------ the loss

    def training_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        if self.schedule.is_final_kd_stage:
            loss, parts = self.output_loss(self(batch), batch)
        else:
            pairs = self.schedule.active_pairs()
            with_output = self.kd_in_internal_stages
            teacher_out = self.teacher_internals(batch, pairs)
            student_out = self.student_internals(batch, pairs, need_logits=with_output)
            internal = internal_distillation_loss(
                pairs,
                student_out.hidden_states,  # type: ignore[arg-type]
                teacher_out.hidden_states,  # type: ignore[arg-type]
                batch["attention_mask"],
                self.projections,
                student_out.attentions,
                teacher_out.attentions,
                attention_weight=self.attention_weight,
                cls_weight=self.cls_weight,
                hidden_mse_weight=self.hidden_mse_weight,
                head_mismatch=self.head_mismatch,  # type: ignore[arg-type]
            )
            loss = internal.total
            parts = {f"internal/{name}": value for name, value in internal.components.items()}
            if with_output:
                output, output_parts = self.output_loss(student_out.logits, batch)
                loss = loss + output
                parts.update(output_parts)
        self._record_batch_loss(loss)
        return loss, parts

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        self.log("train/stage", float(self.schedule.current_stage.index), on_step=False, on_epoch=True,
                 batch_size=batch["input_ids"].shape[0])
        return loss

    def _record_batch_loss(self, loss: Tensor) -> None:
        # Kept on the device (no host sync per step); read once at the end of the epoch.
        self._epoch_loss_sum = self._epoch_loss_sum + loss.detach().float()
        self._epoch_loss_count += 1

    # ------------------------------------------------------------------ stages over epochs

    def describe_stage(self) -> str:
        stage = self.schedule.current_stage
        total = len(self.schedule.stages)
        if stage.is_final_kd:
            what = f"soft-label KD (T={self.temperature}, alpha={self.alpha}), for the rest of training"
        else:
            losses = [name for name, w in (("attention KL", self.attention_weight), ("[CLS] cosine", self.cls_weight),
                                            ("hidden MSE", self.hidden_mse_weight)) if w != 0]
            layers = ", ".join(f"student layer {p.student} <- teacher layer {p.teacher}" for p in stage.pairs)
            what = f"{' + '.join(losses)} at {layers}" + (" + soft-label KD" if self.kd_in_internal_stages else "")
        return f"internal_{self.algorithm} stage {stage.index + 1}/{total}: {what}"

    def on_fit_start(self) -> None:
        for teacher in self._teacher:
            teacher.to(self.device)

    def on_train_start(self) -> None:
        log.info("Epoch %d: %s", self.current_epoch, self.describe_stage())

    def on_train_epoch_start(self) -> None:
        epoch = self.current_epoch
        pending, self._pending = self._pending, None
        self._epoch_loss_sum, self._epoch_loss_count, self._epoch_loss_epoch = 0.0, 0, epoch
        if pending is None or pending["epoch"] is None:
            return
        if pending["epoch"] == epoch:  # resumed inside this epoch: keep its running loss
            self._epoch_loss_sum = torch.tensor(pending["loss_sum"], device=self.device)
            self._epoch_loss_count = pending["loss_count"]
        elif pending["epoch"] < epoch and (self.schedule._last_epoch is None or self.schedule._last_epoch < pending["epoch"]):
            # The checkpoint was written after that epoch's batches but before its on_train_epoch_end.
            self._end_stage_epoch(pending["epoch"], pending["loss_sum"], pending["loss_count"])

    def on_train_epoch_end(self) -> None:
        loss_sum = float(self._epoch_loss_sum) if self._epoch_loss_count else 0.0
        self._end_stage_epoch(self.current_epoch, loss_sum, self._epoch_loss_count)
        self._epoch_loss_epoch = None

    def _end_stage_epoch(self, epoch: int, loss_sum: float, count: int) -> None:
        mean = loss_sum / count if count else math.nan
        advanced = self.schedule.end_epoch(epoch, mean if self.schedule.patience is not None else None)
        if advanced:
            self._stage_start_step = int(self.trainer.global_step) if self._trainer is not None else 0
            self._restart_learning_rate()
            log.info("Epoch %d: %s", epoch + 1, self.describe_stage())

    # ------------------------------------------------------------------ checkpoints

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        running = self._epoch_loss_epoch is not None and self._epoch_loss_count > 0
        checkpoint[CHECKPOINT_KEY] = {
            "schedule": self.schedule.state_dict(),
            "stage_start_step": self._stage_start_step,
            "epoch": self._epoch_loss_epoch if running else None,
            "loss_sum": float(self._epoch_loss_sum) if running else 0.0,
            "loss_count": self._epoch_loss_count if running else 0,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get(CHECKPOINT_KEY)
        if state is None:
            raise ValueError(
                "this checkpoint has no internal-distillation stage state; it was not written by "
                "InternalDistillation (resume it with the method that wrote it)"
            )
        self.schedule.load_state_dict(state["schedule"])
        self._stage_start_step = int(state["stage_start_step"])
        self._pending = {"epoch": state["epoch"], "loss_sum": state["loss_sum"], "loss_count": state["loss_count"]}

    # ------------------------------------------------------------------ optimiser and per-stage schedule

    def configure_optimizers(self) -> Any:
        configured = super().configure_optimizers()
        if self.lr_schedule == "global":
            return configured
        optimizer = configured["optimizer"]
        self._total_steps = int(self.trainer.estimated_stepping_batches)
        max_epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else 1
        self._steps_per_epoch = max(1, math.ceil(self._total_steps / max_epochs))
        for group in optimizer.param_groups:  # the base scheduler set "initial_lr"; start from it
            group["lr"] = group.get("initial_lr", group["lr"])
        scheduler = LambdaLR(optimizer, self._stage_lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _stage_lr_factor(self, step: int) -> float:
        """Linear warm-up then linear decay over the current stage's step budget (BERT recipe, per stage)."""
        steps_per_epoch = self._steps_per_epoch or 1
        start = self._stage_start_step
        if self.schedule.is_final_kd_stage:
            length = (self._total_steps or 0) - start
        else:
            length = self.schedule.epochs_per_stage * steps_per_epoch
        length = max(1, length)
        warmup = int(self.optim.warmup_ratio * length)
        t = step - start
        if t < warmup:
            return t / max(1, warmup)
        return max(0.0, (length - t) / max(1, length - warmup))

    def _restart_learning_rate(self) -> None:
        """At a stage switch, put the new stage's first learning rate in place before its first step."""
        if self.lr_schedule != "per_stage" or self._trainer is None:
            return
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if not isinstance(scheduler, LambdaLR):
                continue
            factor = self._stage_lr_factor(scheduler.last_epoch)
            for group, base_lr in zip(scheduler.optimizer.param_groups, scheduler.base_lrs):
                group["lr"] = base_lr * factor
            scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


# ---------------------------------------------------------------------- cached teacher [CLS] vectors


def _use_cls_cache(mode: str, options: dict[str, Any], rows: int, layers: int, width: int) -> bool:
    """Whether to cache [CLS]: "auto" when it replaces every internal-stage teacher forward and is small."""
    if mode == "never":
        return False
    only_cls = float(options.get("attention_weight", 1.0)) == 0 and float(options.get("hidden_mse_weight", 0.0)) == 0
    if mode == "always":
        return True
    return only_cls and rows * layers * width * 4 <= CLS_CACHE_MAX_BYTES


@torch.no_grad()
def teacher_cls_vectors(
    teacher: "Teacher", teacher_model: torch.nn.Module, data: "TaskData", split: str, layers: Sequence[int]
) -> Tensor:
    """``h_T[m][CLS]`` for every row of ``split`` and every teacher layer ``m`` in ``layers``: ``[N, len(layers), D_T]``.

    Computed once with the teacher's SDPA attention (eval mode, so deterministic) and
    cached under a key of (teacher key, tokenised split key, layers), like the logits.
    """
    from kdexp.data import make_loader

    layers = [int(layer) for layer in layers]
    tokenized, data_key = data.tokenized[split], data.keys[split]
    key = cache_key(kind="teacher_cls", teacher=teacher.key, data=data_key, layers=layers)
    path = teacher.cache_dir / "signals" / "teacher_cls" / f"{key}.pt"
    expected = {"key": key, "rows": len(tokenized), "layers": layers}
    width = teacher_model.config.hidden_size

    def load() -> torch.Tensor | None:
        cached = load_tensors(path, expected)
        if cached is not None and cached["cls"].shape == (len(tokenized), len(layers), width):
            return cached["cls"]
        return None

    def compute() -> torch.Tensor:
        device = teacher.device
        model = teacher_model.to(device).eval()
        out = torch.empty(len(tokenized), len(layers), width)
        loader = make_loader(tokenized, data, teacher.eval_batch_size, shuffle=False)
        with truncated_encoder(model, max(layers) + 1):
            for batch in loader:
                batch = {k: v.to(device) for k, v in batch.items()}
                hidden = forward_with_internals(model, batch, need_attentions=False).hidden_states
                assert hidden is not None
                out[batch["idx"].cpu()] = torch.stack([hidden[layer + 1][:, 0] for layer in layers], dim=1).float().cpu()
        save_tensors(path, {"cls": out}, expected)
        log.info("Cached teacher [CLS] vectors of layers %s for %d rows (%s)", layers, len(tokenized), path)
        return out

    return load_or_compute(path, load, compute)
