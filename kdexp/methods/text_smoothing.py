"""`text_smoothing` (Wu et al. 2020, arXiv 2005.03848) and `text_smoothing_kd`; docs/methods/text_smoothing.md.

The student reads, besides the original input, a *smoothed* input whose token at position
``t`` is ``p_t = lam·q_t + (1 - lam)·onehot(x_t)``, ``q_t = softmax(MLM(x)_t / tau)`` from a
frozen MLM sharing the student's vocabulary, embedded as ``p_t · W``. Special tokens and
padding stay one-hot; at inference the student reads one-hot input. A multiple-choice row is one
sequence per option (smoothed with live MLM distributions); extractive QA smooths the question and
the passage of each window. The maths is in
:mod:`kdexp.smoothing`, the MLM and its cached top-k distributions in
:mod:`kdexp.smoothing.mlm_teacher`.

- ``schedule: two_steps`` (default; the authors' code): per batch, two optimiser steps, one on each
  input's loss, in ``step_order`` (default ``original_first``, as the authors' code: the original
  input's step, then the smoothed input's), by manual optimisation: the run's AdamW and
  linear schedule (stepped once per batch, so warm-up and decay span the run as for the other
  methods; ``trainer.global_step`` counts 2 per batch), and the trainer's gradient clipping
  applied by hand to each step (Lightning refuses ``gradient_clip_val`` with manual
  optimisation, so the module takes it over, see `configure_callbacks`). ``sum``: one step on
  ``(L_smoothed + L_original) / 2``, which equals fine-tuning's loss at ``smooth_rate = 0``.
- Per input the terms are ``ce_<input>`` and, with ``kd_alpha > 0``, ``kd_<input>`` to the
  fine-tuned teacher's cached logits on the original input, weighted ``(1 - a, a)``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import torch
from omegaconf import MISSING

from kdexp.config import require
from kdexp.data import row_lengths
from kdexp.errors import ConfigError
from kdexp.families import output_logits
from kdexp.families.label_words import CAUSAL_LM_TYPES, is_causal_lm
from kdexp.losses import hinton_weights, kd_terms, weighted_sum
from kdexp.methods.base import DistillationModule
from kdexp.model_internals import model_inputs
from kdexp.models import student_model_type
from kdexp.smoothing import (
    mlm_token_distributions,
    smooth_token_distributions,
    smoothed_inputs_embeds,
    special_or_padding_mask,
)
from kdexp.smoothing.mlm_teacher import (
    DISTRIBUTION_SOURCES,
    MLM_INFO_FILE,
    MLMSettings,
    MLMTeacher,
    cached_topk_store,
    choose_distribution_source,
    prepare_mlm_teacher,
)
from kdexp.smoothing.smoothing import TokenDistributions
from kdexp.smoothing.store import TopKTokenStore, topk_distributions_at
from kdexp.tasks import MULTIPLE_CHOICE
from kdexp.teacher import TeacherSignals

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from kdexp.context import RunContext

log = logging.getLogger(__name__)

SCHEDULES = ("two_steps", "sum")
DECODER_STUDENT = (
    "text smoothing mixes a masked LM's word distributions into the student's input: a decoder LM student has "
    "no MLM of its vocabulary; use an encoder student (BERT, RoBERTa, ELECTRA, DistilBERT) for text smoothing."
)
TWO_STEPS_FP16_CLIPPING = (
    "method.schedule=two_steps clips each step by hand, before 16-bit mixed precision unscales the gradients: "
    "use trainer.precision=bf16-mixed or 32-true, or method.schedule=sum"
)
RUN_MLM_FILE = "mlm_teacher.json"
__all__ = ["MLM_INFO_FILE", "RUN_MLM_FILE", "TextSmoothing", "TextSmoothingOptions", "choose_distribution_source"]


# --------------------------------------------------------------------------- the method


@dataclass
class TextSmoothingOptions:
    smooth_rate: float = MISSING
    temperature: float = MISSING
    top_k: Optional[int] = MISSING
    schedule: str = MISSING
    # two_steps: which input's step comes first in a batch. original_first: the authors' code
    # (caskcsg/TextSmoothing, bert_model.py); smoothed_first: kdexp's order before this key existed.
    step_order: str = MISSING
    kd_alpha: float = MISSING
    kd_temperature: float = MISSING
    distributions: str = MISSING
    cache_max_bytes: float = MISSING
    mlm: MLMSettings = field(default_factory=MLMSettings)

    def check(self) -> None:
        require(0 <= self.smooth_rate <= 1, "method.smooth_rate", self.smooth_rate, "lambda in [0, 1]")
        require(self.temperature > 0, "method.temperature", self.temperature, "a positive tau")
        require(self.top_k is None or self.top_k >= 1, "method.top_k", self.top_k, "null (exact) or a positive k")
        require(self.schedule in SCHEDULES, "method.schedule", self.schedule, " or ".join(SCHEDULES))
        require(
            self.step_order in ("original_first", "smoothed_first"),
            "method.step_order",
            self.step_order,
            "original_first (the authors' code) or smoothed_first",
        )
        require(0 <= self.kd_alpha <= 1, "method.kd_alpha", self.kd_alpha, "a weight in [0, 1]")
        require(self.kd_temperature > 0, "method.kd_temperature", self.kd_temperature, "a positive temperature")
        require(
            self.distributions in DISTRIBUTION_SOURCES,
            "method.distributions",
            self.distributions,
            ", ".join(DISTRIBUTION_SOURCES),
        )
        adapt = self.mlm.adapt
        require(adapt.steps >= 1, "method.mlm.adapt.steps", adapt.steps, "1 or more")
        require(
            adapt.passes is None or adapt.passes > 0,
            "method.mlm.adapt.passes",
            adapt.passes,
            "null (method.mlm.adapt.steps alone) or a positive number of passes",
        )
        require(0 < adapt.mask_prob < 1, "method.mlm.adapt.mask_prob", adapt.mask_prob, "a probability in (0, 1)")
        require(
            0 < adapt.heldout_fraction < 1,
            "method.mlm.adapt.heldout_fraction",
            adapt.heldout_fraction,
            "a fraction in (0, 1)",
        )


class TextSmoothing(DistillationModule):
    """Text smoothing; ``kd_alpha > 0`` adds soft-label KD from the fine-tuned teacher (`text_smoothing_kd`)."""

    Options = TextSmoothingOptions

    @classmethod
    def check_config(cls, cfg: Any, task: Any) -> None:
        """`two_steps` optimises by hand, so what Lightning does for automatic optimisation is refused here,
        before the teacher and MLM stages, rather than at `fit`."""
        super().check_config(cfg, task)
        if student_model_type(cfg.student, cfg.teacher.name_or_path) in CAUSAL_LM_TYPES:
            raise ConfigError(DECODER_STUDENT)
        if cfg.method.get("schedule") != "two_steps":
            return
        accumulate = cfg.trainer.get("accumulate_grad_batches", 1)
        if accumulate != 1:
            raise ConfigError(
                f"trainer.accumulate_grad_batches={accumulate} cannot work with method.schedule=two_steps (two "
                "optimiser steps a batch, taken by hand): use 1 (a larger data.batch_size), or method.schedule=sum."
            )
        if str(cfg.trainer.get("precision", "32-true")).startswith("16") and cfg.trainer.get("gradient_clip_val"):
            raise ConfigError(TWO_STEPS_FP16_CLIPPING)

    def __init__(
        self,
        *args: Any,
        options: TextSmoothingOptions,
        special_token_ids: list[int],
        mlm_model: PreTrainedModel | None = None,
        topk_store: TopKTokenStore | None = None,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        if (mlm_model is None) == (topk_store is None):
            raise ValueError("TextSmoothing needs exactly one of mlm_model (live) or topk_store (cached).")
        if options.kd_alpha > 0 and self.teacher is None:
            raise ValueError("method.kd_alpha > 0 needs the teacher's logits")
        if topk_store is not None and options.top_k is not None and topk_store.top_k != options.top_k:
            raise ValueError(f"the distribution store holds top-{topk_store.top_k}, not top-{options.top_k}")
        self.options = options
        self.special_token_ids = sorted(set(int(i) for i in special_token_ids))
        self.topk_store = topk_store
        # Not a submodule and not in checkpoints: the MLM is frozen and stored elsewhere.
        self._mlm = [mlm_model.eval().requires_grad_(False)] if mlm_model is not None else []
        self.automatic_optimization = options.schedule == "sum"
        self._manual_clip: tuple[float, str] | None = None

    @classmethod
    def from_run(cls, run: "RunContext", options: TextSmoothingOptions) -> "TextSmoothing":
        vocabulary = len(run.data.tokenizer)
        if options.top_k is not None and options.top_k > vocabulary:
            raise ConfigError(
                f"method.top_k={options.top_k} is more than the {vocabulary} tokens of the vocabulary: "
                f"use method.top_k={vocabulary} or less, or null (the exact distribution)."
            )
        split = run.task.train_split
        num_tokens = int(row_lengths(run.data.tokenized[split]).sum())
        if is_causal_lm(run.student.config):  # a Hub student not in the local cache: known only once loaded
            raise ConfigError(DECODER_STUDENT)
        if run.task.family == MULTIPLE_CHOICE and options.distributions == "cached":
            raise ConfigError(
                "method.distributions=cached: a multiple-choice row is one sequence per option, and the "
                "store holds one sequence per row; use method.distributions=live or auto (live)."
            )
        source, why = choose_distribution_source(
            options.distributions, options.top_k, num_tokens, options.cache_max_bytes
        )
        if run.task.family == MULTIPLE_CHOICE:
            source, why = "live", "multiple choice: one sequence per option, computed in the step"
        mlm_teacher = prepare_mlm_teacher(run, options.mlm)
        log.info("MLM distributions: %s (%s)", source, why)
        _write_run_record(run, mlm_teacher, source, why, options.top_k, num_tokens)
        signals: dict[str, Any] = {}
        if source == "cached":
            assert options.top_k is not None
            signals["topk_store"] = cached_topk_store(
                run, mlm_teacher, options.top_k, options.temperature, options.mlm.eval_batch_size
            )
        else:
            signals["mlm_model"] = mlm_teacher.model
        if options.kd_alpha > 0:
            signals["teacher"] = TeacherSignals.from_teacher(run.teacher, run.data)
        return cls(
            run.student,
            run.task,
            run.optim,
            options=options,
            special_token_ids=list(run.data.tokenizer.all_special_ids),
            **signals,
        )

    # ------------------------------------------------------------------ smoothing

    def _apply(self, fn: Any, recurse: bool = True) -> "TextSmoothing":
        super()._apply(fn, recurse)
        for mlm in self._mlm:
            mlm._apply(fn)  # the frozen live MLM follows the module to its device (it is not a submodule)
        return self

    def batch_rows(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The teacher's rows, and the stored ``q_t`` of the batch (read on the CPU, before the batch moves)."""
        rows = super().batch_rows(batch)
        if self.topk_store is not None:
            q = self.topk_store.distributions(batch["idx"], batch["attention_mask"])
            rows.update(mlm_probs=q.probs, mlm_token_ids=q.sparse_token_ids)
        return rows

    @torch.no_grad()
    def mlm_distributions(self, batch: dict[str, torch.Tensor]) -> TokenDistributions:
        """``q_t`` for the batch: from the store, or from a live MLM forward."""
        if self.topk_store is not None:
            if "mlm_probs" in batch:
                return TokenDistributions(batch["mlm_probs"], batch["mlm_token_ids"], self.topk_store.vocab_size)
            q = self.topk_store.distributions(batch["idx"], batch["attention_mask"])  # a batch not prepared for it
            return TokenDistributions(
                q.probs.to(batch["input_ids"].device), q.sparse_token_ids.to(batch["input_ids"].device), q.vocab_size
            )
        mlm = self._mlm[0]
        # The MLM reads sequences: a multiple-choice row's [C, L] options are C of them (row-major, as `real` is).
        sequences = {k: v.reshape(-1, v.shape[-1]) for k, v in model_inputs(batch, mlm).items()}
        if self.options.top_k is None:
            q_dense = mlm_token_distributions(mlm(**sequences).logits, self.options.temperature)
            return TokenDistributions(q_dense.probs.view(*batch["input_ids"].shape, -1), None, q_dense.vocab_size)
        real = batch["attention_mask"].bool()
        q = topk_distributions_at(
            mlm,
            sequences["input_ids"],
            sequences["attention_mask"],
            sequences.get("token_type_ids"),
            real.reshape(-1, real.shape[-1]),
            self.options.top_k,
            self.options.temperature,
        )
        probs = q.probs.new_zeros(*real.shape, self.options.top_k)
        token_ids = q.sparse_token_ids.new_zeros(*real.shape, self.options.top_k)
        probs[real], token_ids[real] = q.probs[0], q.sparse_token_ids[0]
        return TokenDistributions(probs, token_ids, q.vocab_size)

    def smoothed_embeddings(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``p_t · W`` for the batch, ``[B, L, H]``; gradients reach the word embeddings ``W``."""
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        keep = special_or_padding_mask(input_ids, attention_mask, self.special_token_ids)
        smoothed = smooth_token_distributions(self.mlm_distributions(batch), input_ids, keep, self.options.smooth_rate)
        return smoothed_inputs_embeds(smoothed, self.student.get_input_embeddings().weight)

    def forward_smoothed(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in self.model_inputs(batch).items() if k != "input_ids"}
        return output_logits(self.student(inputs_embeds=self.smoothed_embeddings(batch), **inputs), batch)

    # ------------------------------------------------------------------ losses

    def input_terms(self, logits: torch.Tensor, batch: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
        """``ce_<name>`` (MSE for STS-B), and with ``kd_alpha > 0`` ``kd_<name>``, for one of the two inputs."""
        if self.options.kd_alpha == 0:
            return {f"ce_{name}": self.task_loss(logits, batch["labels"])}
        assert self.teacher is not None
        terms = kd_terms(
            logits, self.teacher.logits(batch), batch["labels"], self.options.kd_temperature, self.task.is_regression
        )
        return {f"{term}_{name}": value for term, value in terms.items()}

    def input_weights(self, name: str, scale: float = 1.0) -> dict[str, float | torch.Tensor]:
        if self.options.kd_alpha == 0:
            return {f"ce_{name}": scale}
        return {f"{term}_{name}": scale * w for term, w in hinton_weights(self.options.kd_alpha).items()}

    def smoothed_terms(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.input_terms(self.forward_smoothed(batch), batch, "smoothed")

    def original_terms(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.input_terms(self(batch), batch, "original")

    def loss_terms(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The ``sum`` schedule's terms: both inputs'."""
        return {**self.smoothed_terms(batch), **self.original_terms(batch)}

    def loss_weights(self) -> dict[str, float | torch.Tensor]:
        """``(L_smoothed + L_original) / 2``: one fine-tuning loss's scale, and exactly it at ``smooth_rate = 0``."""
        return {**self.input_weights("smoothed", 0.5), **self.input_weights("original", 0.5)}

    # ------------------------------------------------------------------ the two-step schedule

    def configure_callbacks(self) -> list:
        """With manual optimisation, take the trainer's gradient clipping over (Lightning refuses it there).

        Called by Lightning before it checks the trainer's configuration; the clipping is
        then applied by hand to each of the two steps (`_manual_step`), exactly as the
        trainer would have applied it to one.
        """
        trainer = self._trainer
        if (
            not self.automatic_optimization
            and trainer is not None
            and trainer.gradient_clip_val
            and str(trainer.precision).startswith("16")
        ):
            raise ConfigError(TWO_STEPS_FP16_CLIPPING)
        if not self.automatic_optimization and trainer is not None and trainer.gradient_clip_val:
            self._manual_clip = (float(trainer.gradient_clip_val), trainer.gradient_clip_algorithm or "norm")
            trainer.gradient_clip_val = None
        return []

    def _manual_step(self, optimizer: Any, loss: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if self._manual_clip is not None:
            value, algorithm = self._manual_clip
            self.clip_gradients(optimizer, gradient_clip_val=value, gradient_clip_algorithm=algorithm)
        optimizer.step()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.automatic_optimization:
            return super().training_step(batch, batch_idx)
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        assert not isinstance(scheduler, list)  # configure_optimizers gives one scheduler
        order = ("original", "smoothed") if self.options.step_order == "original_first" else ("smoothed", "original")
        losses: dict[str, torch.Tensor] = {}
        terms: dict[str, torch.Tensor] = {}
        for name in order:  # each step's loss is computed after the previous step's update
            input_terms = self.original_terms(batch) if name == "original" else self.smoothed_terms(batch)
            losses[name] = weighted_sum(input_terms, self.input_weights(name))
            self._manual_step(optimizer, losses[name])
            terms.update({term: value.detach() for term, value in input_terms.items()})
        if scheduler is not None:
            scheduler.step()
        loss = 0.5 * (losses["smoothed"].detach() + losses["original"].detach())
        self.log_losses(loss, terms, batch["input_ids"].shape[0])
        return loss


def _write_run_record(
    run: "RunContext", mlm: MLMTeacher, source: str, why: str, top_k: int | None, tokens: int
) -> None:
    """``mlm_teacher.json`` in the run folder: which MLM, its adaptation metrics, where ``q_t`` came from."""
    record = {
        "mlm_key": mlm.key,
        "mlm_path": mlm.path,
        "adapted": mlm.info.get("adapted", False),
        "adaptation_metrics": mlm.info.get("metrics"),
        "distributions": source,
        "distributions_reason": why,
        "top_k": top_k,
        "train_tokens": tokens,
    }
    run.method_info.update(record)
    run.write_run_file(RUN_MLM_FILE, record)
