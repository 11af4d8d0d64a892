"""The teacher stage: fine-tune a pre-trained checkpoint once per key, and cache its logits.

A teacher is stored under `<cache_dir>/teachers/<task>-<key>`, the key hashing the model's
weights, the task, the fine-tuning hyper-parameters, the training data and the seed; every
later run with the same key loads it. Its logits on each split are cached under a key of
(teacher key, tokenised split key).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from transformers import PreTrainedModel

from kdexp.cache import atomic_write_json, cache_key, exclusive_lock, load_or_compute, load_tensors, save_tensors
from kdexp.data import DataSource, TaskData, load_split, load_task_data, make_loader, tokenize_split, tokenized_key, tokenizer_fingerprint
from kdexp.methods.base import DistillationModule, OptimConfig, eval_prefix
from kdexp.methods.finetune import Finetune
from kdexp.metrics import GlueMetrics
from kdexp.models import count_parameters, load_classifier, load_tokenizer, model_fingerprint, resolve_model_path
from kdexp.tasks import GlueTask

log = logging.getLogger(__name__)


@dataclass
class TeacherSpec:
    """The `teacher` config group."""

    name_or_path: str
    finetuned: bool = False  # true: the checkpoint is already fine-tuned on the task
    learning_rate: float = 5e-5
    epochs: int = 3
    batch_size: int = 32
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_train_samples: int | None = None
    seed: int = 42
    eval_batch_size: int = 128


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
            inputs = {k: v.to(self.device) for k, v in DistillationModule.model_inputs(batch).items()}
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


def teacher_key(spec: TeacherSpec, task: GlueTask, model_fp: str, train_data_key: str, max_length: int) -> str:
    if spec.finetuned:
        return cache_key(kind="teacher", model=model_fp, task=task.name, finetuned=True)
    return cache_key(
        kind="teacher",
        model=model_fp,
        task=task.name,
        learning_rate=spec.learning_rate,
        epochs=spec.epochs,
        batch_size=spec.batch_size,
        weight_decay=spec.weight_decay,
        warmup_ratio=spec.warmup_ratio,
        train_data=train_data_key,
        max_length=max_length,
        seed=spec.seed,
    )


def prepare_teacher(
    spec: TeacherSpec,
    task: GlueTask,
    source: DataSource,
    max_length: int,
    max_eval_samples: int | None,
    trainer_cfg: dict[str, Any],
    cache_dir: Path,
) -> Teacher:
    """Return the fine-tuned teacher for `task`, fine-tuning it first if no stored copy has its key."""
    path = resolve_model_path(spec.name_or_path, "teacher.name_or_path")
    tokenizer = load_tokenizer(path)
    device = _inference_device(trainer_cfg)
    model_fp = model_fingerprint(path)
    if spec.finetuned:
        key = teacher_key(spec, task, model_fp, "", max_length)
        return Teacher(path, key, task, tokenizer, cache_dir, device, {"finetuned_by": "user"}, spec.eval_batch_size)

    train_raw = load_split(task, task.train_split, source, spec.max_train_samples)
    key = teacher_key(spec, task, model_fp, tokenized_key(train_raw, task, tokenizer, max_length), max_length)
    store = cache_dir / "teachers" / f"{task.name}-{key}"
    info_file = store / "teacher.json"
    if info_file.exists():
        log.info("Reusing teacher %s", store)
    else:
        with exclusive_lock(store.with_name(store.name + ".lock")):  # one process trains, the others wait
            if info_file.exists():
                log.info("Reusing teacher %s (trained by another process meanwhile)", store)
            else:
                _finetune_teacher(
                    spec, task, source, path, tokenizer, key, max_length, max_eval_samples, trainer_cfg, cache_dir, store
                )
    info = json.loads(info_file.read_text())
    return Teacher(str(store / "model"), key, task, tokenizer, cache_dir, device, info, spec.eval_batch_size)


def _finetune_teacher(
    spec: TeacherSpec,
    task: GlueTask,
    source: DataSource,
    path: str,
    tokenizer: Any,
    key: str,
    max_length: int,
    max_eval_samples: int | None,
    trainer_cfg: dict[str, Any],
    cache_dir: Path,
    store: Path,
) -> None:
    """Fine-tune in `<store>.partial` (resumable), then rename it into place when complete."""
    from kdexp.training import GlueDataModule, fit

    partial = store.with_name(store.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    log.info("Fine-tuning teacher %s on %s (key %s) in %s", path, task.name, key, partial)
    data = load_task_data(task, source, tokenizer, max_length, cache_dir, spec.max_train_samples, max_eval_samples)
    pl.seed_everything(spec.seed, workers=True)
    model = load_classifier(path, task)
    optim = OptimConfig(spec.learning_rate, spec.weight_decay, spec.warmup_ratio)
    module = Finetune(model, task, optim)
    datamodule = GlueDataModule(data, spec.batch_size, spec.eval_batch_size, spec.seed)
    options = dict(trainer_cfg, max_epochs=spec.epochs)
    result = fit(module, datamodule, options, partial, metrics_csv=partial / "metrics.csv", resume=True)
    module.student.save_pretrained(partial / "model")
    tokenizer.save_pretrained(partial / "model")
    shutil.rmtree(partial / "checkpoints", ignore_errors=True)
    atomic_write_json(
        partial / "teacher.json",
        {
            "key": key,
            "task": task.name,
            "source_model": path,
            "hyperparameters": {k: v for k, v in vars(spec).items()},
            "train_examples": len(data.train),
            "best_epoch": result.best_epoch,
            "dev_metrics_at_training": result.best_metrics,
            "train_seconds": result.train_seconds,
            "num_parameters": count_parameters(module.student),
        },
    )
    try:
        os.rename(partial, store)
    except OSError:
        if not (store / "teacher.json").exists():
            raise
        shutil.rmtree(partial, ignore_errors=True)


def _inference_device(trainer_cfg: dict[str, Any]) -> torch.device:
    if trainer_cfg.get("accelerator") in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")
