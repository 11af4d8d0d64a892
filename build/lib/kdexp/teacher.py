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
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from kdexp.cache import cache_key, load_or_compute, load_tensors, save_tensors
from kdexp.data import TaskData, make_loader, tokenize_split, tokenizer_fingerprint
from kdexp.metrics import GlueMetrics, eval_prefix
from kdexp.model_internals import ModelInternals, forward_with_internals, model_inputs, truncated_encoder
from kdexp.models import count_parameters, load_classifier
from kdexp.tasks import GlueTask

log = logging.getLogger(__name__)


@dataclass
class Teacher:
    """A fine-tuned teacher on disk, and the signals computed from it (cached)."""

    path: str
    key: str
    task: GlueTask
    tokenizer: Any
    cache_dir: Path
    device: torch.device
    info: dict[str, Any] = field(default_factory=dict)
    eval_batch_size: int = 128

    def load_model(self, attn_implementation: str = "sdpa") -> PreTrainedModel:
        model = load_classifier(self.path, self.task, attn_implementation, require_head=True)
        return model.eval().requires_grad_(False)

    def shares_tokenizer_with(self, data: TaskData) -> bool:
        return tokenizer_fingerprint(self.tokenizer) == tokenizer_fingerprint(data.tokenizer)

    def _teacher_view(self, data: TaskData, split: str) -> tuple[Any, str]:
        """The split tokenised the teacher's way (the run's own tokenisation when they agree)."""
        if self.shares_tokenizer_with(data):
            return data.tokenized[split], data.keys[split]
        return tokenize_split(data.raw[split], self.task, self.tokenizer, data.max_length, data.cache_dir)

    def logits(self, data: TaskData, split: str) -> torch.Tensor:
        """Teacher logits for every row of `split` (row i = `idx` i), computed once and cached."""
        tokenized, data_key = self._teacher_view(data, split)
        key = cache_key(kind="teacher_logits", teacher=self.key, data=data_key)
        path = self.cache_dir / "signals" / "teacher_logits" / f"{key}.pt"
        expected = {"key": key, "rows": len(tokenized), "num_labels": self.task.num_labels}

        def load() -> torch.Tensor | None:
            cached = load_tensors(path, expected)
            if cached is None:
                return None
            logits = cached["logits"]
            if logits.shape == (len(tokenized), self.task.num_labels) and torch.isfinite(logits).all():
                return logits
            log.warning("Cached teacher logits %s have the wrong shape or values; recomputing.", path)
            return None

        def compute() -> torch.Tensor:
            logits = self._compute_logits(tokenized, data)
            save_tensors(path, {"logits": logits}, expected)
            return logits

        return load_or_compute(path, load, compute)

    @torch.no_grad()
    def _compute_logits(self, tokenized: Any, data: TaskData) -> torch.Tensor:
        start = time.perf_counter()
        model = self.load_model().to(self.device)
        loader = make_loader(tokenized, data, self.eval_batch_size, shuffle=False)
        out = torch.empty(len(tokenized), self.task.num_labels)
        for batch in loader:
            inputs = {k: v.to(self.device) for k, v in model_inputs(batch).items()}
            out[batch["idx"]] = model(**inputs).logits.float().cpu()
        log.info("Teacher logits for %d rows in %.1fs", len(tokenized), time.perf_counter() - start)
        return out

    def dev_metrics(self, data: TaskData) -> dict[str, float]:
        """The teacher's GLUE metrics on the run's dev splits, from the cached logits."""
        results: dict[str, float] = {}
        for split in data.eval_splits:
            metrics = GlueMetrics(self.task)
            labels = torch.tensor(data.raw[split]["label"])
            metrics.update(self.logits(data, split), labels)
            prefix = eval_prefix(self.task, split)
            results.update({f"{prefix}/{k}": v for k, v in metrics.compute().items()})
        return results

    @property
    def num_parameters(self) -> int:
        if "num_parameters" not in self.info:
            self.info["num_parameters"] = count_parameters(self.load_model())
        return int(self.info["num_parameters"])

    @torch.no_grad()
    def cls_vectors(self, data: TaskData, split: str, layers: Sequence[int]) -> torch.Tensor:
        """``h_T[m][CLS]`` for every row of ``split`` and teacher layer ``m`` in ``layers``: ``[N, len(layers), D_T]``.

        Computed once (eval mode, SDPA attention, only up to the deepest layer needed) and
        cached under a key of (teacher key, tokenised split key, layers), like the logits.
        """
        layers = [int(layer) for layer in layers]
        tokenized, data_key = data.tokenized[split], data.keys[split]
        key = cache_key(kind="teacher_cls", teacher=self.key, data=data_key, layers=layers)
        path = self.cache_dir / "signals" / "teacher_cls" / f"{key}.pt"
        expected = {"key": key, "rows": len(tokenized), "layers": layers}

        def load() -> torch.Tensor | None:
            cached = load_tensors(path, expected)
            if cached is not None and cached["cls"].shape[:2] == (len(tokenized), len(layers)):
                return cached["cls"]
            return None

        def compute() -> torch.Tensor:
            model = self.load_model().to(self.device)
            out = torch.empty(len(tokenized), len(layers), model.config.hidden_size)
            loader = make_loader(tokenized, data, self.eval_batch_size, shuffle=False)
            with truncated_encoder(model, max(layers) + 1):
                for batch in loader:
                    batch = {k: v.to(self.device) for k, v in batch.items()}
                    hidden = forward_with_internals(model, batch, need_attentions=False).hidden_states
                    assert hidden is not None
                    out[batch["idx"].cpu()] = torch.stack([hidden[m + 1][:, 0] for m in layers], dim=1).float().cpu()
            save_tensors(path, {"cls": out}, expected)
            log.info("Cached teacher [CLS] vectors of layers %s for %d rows (%s)", layers, len(tokenized), path)
            return out

        return load_or_compute(path, load, compute)


class TeacherSignals(nn.Module):
    """The frozen teacher inside a method: logits cached or live, internals live, [CLS] cached or live.

    Args:
        logits: ``[N, C]`` cached logits of the training rows (indexed by ``batch["idx"]``).
        model: the frozen teacher, for live signals (not a submodule: never optimised or saved).
        cls: ``[N, len(cls_layers), D_T]`` cached [CLS] vectors of ``cls_layers``.
    """

    def __init__(self, logits: torch.Tensor | None = None, model: PreTrainedModel | None = None,
                 cls: torch.Tensor | None = None, cls_layers: Sequence[int] = ()) -> None:
        super().__init__()
        if logits is None and model is None and cls is None:
            raise ValueError("TeacherSignals needs cached logits, cached [CLS] vectors or a teacher model")
        self._model = [model.eval().requires_grad_(False)] if model is not None else []
        self.register_buffer("cached_logits", None if logits is None else logits.float(), persistent=False)
        self.register_buffer("cached_cls", None if cls is None else cls.float(), persistent=False)
        self.cls_layers = tuple(int(layer) for layer in cls_layers)

    @classmethod
    def from_teacher(cls, teacher: Teacher, data: TaskData, live_logits: bool = False, live_model: bool = False,
                     cls_layers: Sequence[int] = ()) -> "TeacherSignals":
        """Cached training-split logits (or a live model with `live_logits`), the model when
        `live_model`, and cached [CLS] vectors of `cls_layers`."""
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

    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The teacher's logits for the rows of `batch`: from the cache, or a live forward."""
        if self.cached_logits is not None:
            return self.cached_logits[batch["idx"]]
        return self.internals(batch, need_attentions=False, output_hidden_states=False).logits

    @torch.no_grad()
    def internals(self, batch: dict[str, torch.Tensor], need_attentions: bool = False, depth: int | None = None,
                  output_hidden_states: bool = True) -> ModelInternals:
        """A live, gradient-free forward: logits, hidden states, and attentions when asked
        (eager pre-dropout probabilities; SDPA otherwise), through the first `depth` blocks."""
        if self.model is None:
            raise RuntimeError("this signal needs a live teacher forward, but the method was built without the model")
        if not output_hidden_states:
            return ModelInternals(logits=self.model(**model_inputs(batch)).logits, hidden_states=None, attentions=None)
        with truncated_encoder(self.model, depth):
            return forward_with_internals(self.model, batch, need_attentions=need_attentions)

    def has_cls(self, layers: Sequence[int]) -> bool:
        return self.cached_cls is not None and all(layer in self.cls_layers for layer in layers)

    def cls(self, batch: dict[str, torch.Tensor], layer: int) -> torch.Tensor:
        """``h_T[layer][CLS]`` for the rows of `batch` ``[B, D_T]``, from the cache (see `has_cls`)."""
        assert self.cached_cls is not None
        return self.cached_cls[batch["idx"], self.cls_layers.index(layer)]
