"""The fine-tuned teacher as methods see it: on disk, its cached signals, and the frozen component.

`Teacher` is a teacher stored by the teacher stage (`kdexp.teacher_stage`) or given already
fine-tuned: its logits and [CLS] vectors on a split are computed once and cached under a key
of (teacher key, tokenised split key[, layers]). `TeacherSignals` is what a method holds while
training: the frozen model (when a signal must be live) and the cached tensors, indexed by the
rows of a batch. It moves with the method's module to its device, is never optimised and
never written into checkpoints.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, PreTrainedModel

from kdexp import families
from kdexp.cache import cache_key, load_or_compute_together, load_tensors, save_tensors
from kdexp.data import InputForm, TaskData, tokenize_split, tokenizer_fingerprint
from kdexp.errors import ConfigError
from kdexp.families import output_logits
from kdexp.families.extractive_qa import MASKED_LOGIT, QAMetrics
from kdexp.hardware import Hardware
from kdexp.inference import PassBatching, PassProgress, length_sorted_loader
from kdexp.metrics import eval_prefix, task_metrics
from kdexp.model_internals import ModelInternals, forward_with_internals, model_inputs, truncated_encoder
from kdexp.models import count_parameters, load_classifier
from kdexp.tasks import EXTRACTIVE_QA, GlueTask

log = logging.getLogger(__name__)


@dataclass
class Teacher:
    """A fine-tuned teacher on disk, and the signals computed from it (cached)."""

    path: str
    key: str
    task: GlueTask
    tokenizer: Any
    cache_dir: Path
    hardware: Hardware
    info: dict[str, Any] = field(default_factory=dict)
    eval_batch_size: int = 128
    eval_tokens_per_batch: int = 16384
    dtype: str = "float32"

    @property
    def batching(self) -> PassBatching:
        return PassBatching(self.eval_tokens_per_batch, self.eval_batch_size)

    def pass_key_parts(self) -> dict[str, Any]:
        """What decides a pass's floats besides the teacher and the rows: batch plan, precision, weights' dtype."""
        parts = {**self.batching.key_parts(), "precision": self.hardware.pass_precision}
        if self.dtype != "float32":
            parts["dtype"] = self.dtype  # left out at the default, so keys made before the option hold
        return parts

    def load_model(self, attn_implementation: str = "sdpa") -> PreTrainedModel:
        model = load_classifier(self.path, self.task, attn_implementation, require_head=True, dtype=self.dtype)
        return model.eval().requires_grad_(False)

    def shares_tokenizer_with(self, data: TaskData) -> bool:
        return tokenizer_fingerprint(self.tokenizer) == tokenizer_fingerprint(data.tokenizer)

    def input_form(self, data: TaskData) -> InputForm:
        """How the teacher reads rows (a decoder reads multiple choice as a prompt; `kdexp.families`)."""
        return replace(data.inputs, form=families.input_form(AutoConfig.from_pretrained(self.path)))

    def reads_rows_as_student(self, data: TaskData) -> bool:
        """Whether the teacher reads the run's own tokenisation (same tokenizer, same input form)."""
        return self.shares_tokenizer_with(data) and self.input_form(data) == data.inputs

    def _teacher_view(self, data: TaskData, split: str) -> tuple[Any, str]:
        """The split tokenised the teacher's way (the run's own tokenisation when they agree)."""
        if self.reads_rows_as_student(data):
            return data.tokenized[split], data.keys[split]
        inputs = self.input_form(data)
        return tokenize_split(data.raw[split], self.task, self.tokenizer, data.max_length, data.cache_dir, inputs)

    def logits(self, data: TaskData, split: str) -> torch.Tensor:
        """Teacher logits for every row of `split` (row i = `idx` i), computed once and cached: ``[N, C]``, or
        ``[N, 2, max_length]`` for extractive QA's windows (positions past a window's end masked)."""
        tokenized, data_key = self._teacher_view(data, split)
        key = cache_key(kind="teacher_logits", teacher=self.key, data=data_key, **self.pass_key_parts())
        path = self.cache_dir / "signals" / "teacher_logits" / f"{key}.pt"
        expected = {"key": key, "rows": len(tokenized), "num_labels": self.task.num_labels}
        shape = (len(tokenized), *self.task.output_shape(data.max_length))

        def load() -> torch.Tensor | None:
            cached = load_tensors(path, expected)
            if cached is None:
                return None
            logits = cached["logits"]
            if logits.shape == shape and torch.isfinite(logits).all():
                return logits
            log.warning("Cached teacher logits %s have the wrong shape or values; recomputing.", path)
            return None

        def compute() -> torch.Tensor:
            return self._compute_logits(tokenized, data)

        def store(logits: torch.Tensor) -> None:
            save_tensors(path, {"logits": logits}, expected)

        return load_or_compute_together(path, load, compute, store, self.hardware)

    def _compute_logits(self, tokenized: Any, data: TaskData) -> torch.Tensor:
        hardware = self.hardware
        model = hardware.to_device(self.load_model())
        shape = self.task.output_shape(data.max_length)
        out = torch.zeros(len(tokenized), *shape)
        loader = length_sorted_loader(tokenized, data.pad_token_id, self.batching, hardware=hardware)
        progress = PassProgress(f"teacher logits ({len(tokenized)} rows)", len(tokenized) // hardware.world_size)
        with hardware.inference():
            for batch in loader:
                logits = output_logits(
                    model(**hardware.to_device(model_inputs(batch, model))), hardware.to_device(batch)
                )
                out[batch["idx"]] = full_rows(logits.float().cpu(), shape)
                progress.update(len(batch["idx"]))
        progress.close()
        return hardware.combine_rows(out)

    def dev_metrics(self, data: TaskData) -> dict[str, float]:
        """The teacher's metrics on the run's dev splits, from the cached logits."""
        results: dict[str, float] = {}
        for split in data.eval_splits:
            metrics = task_metrics(self.task)
            tokenized, _ = self._teacher_view(data, split)
            logits = self.logits(data, split)
            for start in range(0, len(tokenized), 1024):
                rows = tokenized.select(range(start, min(start + 1024, len(tokenized))))
                batch = {"idx": torch.as_tensor(rows["idx"]), "labels": torch.as_tensor(rows["labels"])}
                metrics.update_batch(logits[batch["idx"]], batch)
            prefix = eval_prefix(self.task, split)
            if isinstance(metrics, QAMetrics):  # scored on the teacher's own windows of the examples
                values = metrics.compute_on(data.raw[split], tokenized)
            else:
                values = metrics.compute_split(data, split)
            results.update({f"{prefix}/{k}": v for k, v in values.items()})
        return results

    @property
    def num_parameters(self) -> int:
        if "num_parameters" not in self.info:
            self.info["num_parameters"] = count_parameters(self.load_model())
        return int(self.info["num_parameters"])

    def cls_vectors(self, data: TaskData, split: str, layers: Sequence[int]) -> torch.Tensor:
        """``h_T[m][CLS]`` for every row of ``split`` and teacher layer ``m`` in ``layers``: ``[N, len(layers), D_T]``.

        Computed once (eval mode, SDPA attention, only up to the deepest layer needed) and
        cached under a key of (teacher key, tokenised split key, layers), like the logits.
        """
        layers = [int(layer) for layer in layers]
        tokenized, data_key = data.tokenized[split], data.keys[split]
        key = cache_key(kind="teacher_cls", teacher=self.key, data=data_key, layers=layers, **self.pass_key_parts())
        path = self.cache_dir / "signals" / "teacher_cls" / f"{key}.pt"
        expected = {"key": key, "rows": len(tokenized), "layers": layers}

        def load() -> torch.Tensor | None:
            cached = load_tensors(path, expected)
            if cached is not None and cached["cls"].shape[:2] == (len(tokenized), len(layers)):
                return cached["cls"]
            return None

        def compute() -> torch.Tensor:
            hardware = self.hardware
            model = hardware.to_device(self.load_model())
            out = torch.zeros(len(tokenized), len(layers), model.config.hidden_size)
            loader = length_sorted_loader(tokenized, data.pad_token_id, self.batching, hardware=hardware)
            progress = PassProgress(
                f"teacher [CLS] vectors ({len(tokenized)} rows)", len(tokenized) // hardware.world_size
            )
            with truncated_encoder(model, max(layers) + 1), hardware.inference():
                for batch in loader:
                    hidden = forward_with_internals(
                        model, hardware.to_device(batch), need_attentions=False
                    ).hidden_states
                    assert hidden is not None
                    out[batch["idx"]] = torch.stack([hidden[m + 1][:, 0] for m in layers], dim=1).float().cpu()
                    progress.update(len(batch["idx"]))
            progress.close()
            return hardware.combine_rows(out)

        def store(cls: torch.Tensor) -> None:
            save_tensors(path, {"cls": cls}, expected)
            log.info("Cached teacher [CLS] vectors of layers %s for %d rows (%s)", layers, len(tokenized), path)

        return load_or_compute_together(path, load, compute, store, self.hardware)


def full_rows(logits: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A batch's logits as whole rows of the cache: extractive QA's ``[B, 2, L]`` padded to ``max_length`` with
    `MASKED_LOGIT` (each row complete, so rows from several processes add up exactly)."""
    if logits.shape[1:] == shape:
        return logits
    rows = torch.full((logits.shape[0], *shape), MASKED_LOGIT)
    rows[..., : logits.shape[-1]] = logits
    return rows


class TeacherSignals(nn.Module):
    """The frozen teacher inside a method: logits cached or live, internals live, [CLS] cached or live.

    Cached signals stay on the CPU, out of the module's buffers: a batch's rows are looked up
    before it moves to its device (`rows`, called from the method's `on_before_batch_transfer`),
    so that nothing the size of the training split goes to a GPU, and DDP has nothing to
    broadcast at each step.

    Args:
        logits: ``[N, C]`` cached logits of the training rows (indexed by ``batch["idx"]``).
        model: the frozen teacher, for live signals (not a submodule: never optimised or saved).
        cls: ``[N, len(cls_layers), D_T]`` cached [CLS] vectors of ``cls_layers``.
    """

    def __init__(
        self,
        logits: torch.Tensor | None = None,
        model: PreTrainedModel | None = None,
        cls: torch.Tensor | None = None,
        cls_layers: Sequence[int] = (),
    ) -> None:
        super().__init__()
        if logits is None and model is None and cls is None:
            raise ValueError("TeacherSignals needs cached logits, cached [CLS] vectors or a teacher model")
        self._model = [model.eval().requires_grad_(False)] if model is not None else []
        self.cached_logits = None if logits is None else logits.float().cpu()
        self.cached_cls = None if cls is None else cls.float().cpu()
        self.cls_layers = tuple(int(layer) for layer in cls_layers)

    @classmethod
    def from_teacher(
        cls,
        teacher: Teacher,
        data: TaskData,
        live_logits: bool = False,
        live_model: bool = False,
        cls_layers: Sequence[int] = (),
    ) -> "TeacherSignals":
        """Cached training-split logits (or a live model with `live_logits`), the model when
        `live_model`, and cached [CLS] vectors of `cls_layers`."""
        check_rows_align(teacher, data, live_logits)
        split = teacher.task.train_split
        return cls(
            logits=None if live_logits else teacher.logits(data, split),
            model=teacher.load_model() if live_logits or live_model else None,
            cls=teacher.cls_vectors(data, split, cls_layers) if cls_layers else None,
            cls_layers=cls_layers,
        )

    def _apply(self, fn: Any, recurse: bool = True) -> "TeacherSignals":
        super()._apply(fn, recurse)
        for model in self._model:
            model._apply(fn)  # the frozen teacher follows the module to its device and dtype
        return self

    def train(self, mode: bool = True) -> "TeacherSignals":
        return super().train(mode)  # the frozen model is not a child: it stays in eval mode

    @property
    def model(self) -> PreTrainedModel | None:
        return self._model[0] if self._model else None

    @property
    def has_cached_logits(self) -> bool:
        return self.cached_logits is not None

    def rows(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The cached signals of the batch's rows (``teacher_logits``, ``teacher_cls``), looked up on the CPU."""
        tables = {"teacher_logits": self.cached_logits, "teacher_cls": self.cached_cls}
        return {name: table[batch["idx"].cpu()] for name, table in tables.items() if table is not None}

    def logits(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The teacher's logits for the rows of `batch`: from the cache, or a live forward."""
        if self.cached_logits is not None:
            logits = batch_rows(batch, "teacher_logits", self.cached_logits)
            return (
                logits[..., : batch["input_ids"].shape[-1]] if logits.dim() == 3 else logits
            )  # QA: the batch's length
        return self.internals(dict(batch), need_attentions=False, output_hidden_states=False).logits

    @torch.no_grad()
    def internals(
        self,
        batch: dict[str, torch.Tensor],
        need_attentions: bool = False,
        depth: int | None = None,
        output_hidden_states: bool = True,
    ) -> ModelInternals:
        """A live, gradient-free forward: logits, hidden states, and attentions when asked
        (eager pre-dropout probabilities; SDPA otherwise), through the first `depth` blocks."""
        if self.model is None:
            raise RuntimeError("this signal needs a live teacher forward, but the method was built without the model")
        if not output_hidden_states:
            logits = output_logits(self.model(**model_inputs(batch, self.model)), batch)
            return ModelInternals(logits=logits, hidden_states=None, attentions=None)
        with truncated_encoder(self.model, depth):
            return forward_with_internals(self.model, batch, need_attentions=need_attentions)

    def has_cls(self, layers: Sequence[int]) -> bool:
        return self.cached_cls is not None and all(layer in self.cls_layers for layer in layers)

    def cls(self, batch: Mapping[str, torch.Tensor], layer: int) -> torch.Tensor:
        """``h_T[layer][CLS]`` for the rows of `batch` ``[B, D_T]``, from the cache (see `has_cls`)."""
        assert self.cached_cls is not None
        return batch_rows(batch, "teacher_cls", self.cached_cls)[:, self.cls_layers.index(layer)]


def check_rows_align(teacher: Teacher, data: TaskData, live_logits: bool) -> None:
    """Refuse teacher logits that would not line up with the student's rows. A live teacher reads the student's
    token ids; extractive QA's cached logits are per window and token, and another tokenizer cuts other windows."""
    if teacher.reads_rows_as_student(data):
        return
    if live_logits:
        raise ConfigError(
            "method.live_teacher=true runs the teacher on the student's token ids, but the student reads its inputs "
            "another way (another tokenizer or model family); use method.live_teacher=false (cached teacher logits)"
        )
    if teacher.task.family == EXTRACTIVE_QA:
        raise ConfigError(
            f"KD on {teacher.task.name} matches start/end distributions window by window and token by token, so the "
            "student must use the teacher's tokenizer; student.init=pretrained with another tokenizer cannot be used "
            "(student=first_layers or every_nth_layer cut it from the teacher)"
        )


def batch_rows(batch: Mapping[str, torch.Tensor], name: str, table: torch.Tensor) -> torch.Tensor:
    """Rows ``batch["idx"]`` of a CPU ``table``, on the batch's device: attached as ``batch[name]``
    when the batch was prepared (`TeacherSignals.rows`), else looked up now."""
    if name in batch:
        return batch[name]
    idx = batch["idx"]
    return table[idx.cpu()].to(idx.device, non_blocking=True)
