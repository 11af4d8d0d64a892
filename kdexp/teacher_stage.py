"""The teacher stage: fine-tune a pre-trained checkpoint once per key.

A teacher is stored under `<cache_dir>/teachers/<task>-<key>`, the key hashing everything that
decides its weights: the model's weights, the task, its `teacher.*` hyper-parameters, its
training and dev rows (the dev rows choose its best epoch), the maximum length, the numeric
precision and the seed. The stage takes no other setting of the run (`trainer.limit_*`,
`accumulate_grad_batches`, ... never reach it), so one key is one teacher. It trains in
`<store>.partial`, resumes there exactly like a run, and is published by an atomic rename;
`teacher.json` records a digest of the weights, checked on every load.

Access to the stored teacher and its cached signals is `kdexp.teacher`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from transformers import AutoConfig

from kdexp import families
from kdexp.cache import atomic_write_json, cache_key, exclusive_lock, publish_folder, wait_for_rank_zero
from kdexp.config import OptimConfig
from kdexp.config import TeacherSchema as TeacherSpec
from kdexp.data import DataSource, InputForm, load_split, load_task_data, tokenized_key
from kdexp.hardware import Hardware
from kdexp.methods.finetune import Finetune
from kdexp.models import (
    count_parameters,
    file_digest,
    load_classifier,
    load_tokenizer,
    model_fingerprint,
    resolve_model_path,
)
from kdexp.preemption import CheckpointEvery
from kdexp.seeding import seed_all
from kdexp.tasks import GlueTask
from kdexp.teacher import Teacher
from kdexp.training import GlueDataModule, fit

log = logging.getLogger(__name__)


def teacher_key(
    spec: TeacherSpec, task: GlueTask, model_fp: str, data_keys: dict[str, str], max_length: int, precision: str
) -> str:
    if spec.finetuned:
        return cache_key(kind="teacher", model=model_fp, task=task.name, finetuned=True)
    custom = {"labels": task.label_names, "main_metric": task.main_metric} if task.files else {}  # own data
    return cache_key(
        **custom,
        kind="teacher",
        model=model_fp,
        task=task.name,
        learning_rate=spec.learning_rate,
        epochs=spec.epochs,
        batch_size=spec.batch_size,
        weight_decay=spec.weight_decay,
        warmup_ratio=spec.warmup_ratio,
        gradient_clip_val=spec.gradient_clip_val,
        data=data_keys,
        max_length=max_length,
        precision=precision,
        seed=spec.seed,
    )


def teacher_trainer_options(spec: TeacherSpec, run_trainer: dict[str, Any], hardware: Hardware) -> dict[str, Any]:
    """The teacher stage's Lightning options: the run's precision and this process's device (the GPU a sweep
    job leased, DDP rank 0's: `devices=1` would be GPU 0, another job's), everything else its own."""
    options: dict[str, Any] = {key: run_trainer[key] for key in ("accelerator", "precision") if key in run_trainer}
    options.update(
        devices=hardware.single_device().spec.devices,
        max_epochs=spec.epochs,
        gradient_clip_val=spec.gradient_clip_val,
        enable_progress_bar=run_trainer.get("enable_progress_bar", True),
        log_every_n_steps=run_trainer.get("log_every_n_steps", 50),
    )
    return options


def prepare_teacher(
    spec: TeacherSpec,
    task: GlueTask,
    source: DataSource,
    max_length: int,
    trainer_cfg: dict[str, Any],
    cache_dir: Path,
    hardware: Hardware,
    checkpoints: CheckpointEvery | None = None,
    doc_stride: int = 128,
) -> Teacher:
    """Return the fine-tuned teacher for `task`, fine-tuning it first if no stored copy has its key.

    Under DDP global rank 0 fine-tunes it (on its own device); the other processes wait for it.
    `checkpoints` (the run's `checkpoint.*`): when the fine-tuning writes step checkpoints, in
    `<store>.partial/checkpoints` (they decide nothing in the teacher: not in its key).
    """
    path = resolve_model_path(spec.name_or_path, "teacher.name_or_path")
    tokenizer = load_tokenizer(path, "teacher.name_or_path")
    model_fp = model_fingerprint(path)
    precision = str(trainer_cfg.get("precision", "32-true"))
    if spec.finetuned:
        key = teacher_key(spec, task, model_fp, {}, max_length, precision)
        return Teacher(
            path,
            key,
            task,
            tokenizer,
            cache_dir,
            hardware,
            {"finetuned_by": "user"},
            spec.eval_batch_size,
            spec.eval_tokens_per_batch,
            spec.dtype,
        )

    inputs = InputForm(families.input_form(AutoConfig.from_pretrained(path)), doc_stride)
    train_raw = load_split(task, task.train_split, source, spec.max_train_samples, "teacher.max_train_samples")
    data_keys = {task.train_split: tokenized_key(train_raw, task, tokenizer, max_length, inputs)}
    for split in task.eval_splits:
        dev_raw = load_split(task, split, source, spec.max_eval_samples, "teacher.max_eval_samples")
        data_keys[split] = tokenized_key(dev_raw, task, tokenizer, max_length, inputs)
    key = teacher_key(spec, task, model_fp, data_keys, max_length, precision)
    store = cache_dir / "teachers" / f"{task.name}-{key}"
    info = stored_teacher_info(store, set_aside=False)
    if info is not None:
        log.info("Reusing teacher %s", store)
    elif not hardware.is_global_zero:
        info = wait_for_rank_zero(store, lambda: stored_teacher_info(store, set_aside=False))
    else:
        with exclusive_lock(store.with_name(store.name + ".lock")):  # one process trains, the others wait
            info = stored_teacher_info(store)
            if info is not None:
                log.info("Reusing teacher %s (trained by another process meanwhile)", store)
            else:
                options = teacher_trainer_options(spec, trainer_cfg, hardware)
                _finetune_teacher(
                    spec, task, source, path, tokenizer, key, max_length, options, cache_dir, store, checkpoints, inputs
                )
                info = stored_teacher_info(store)
                assert info is not None, f"the teacher stage did not publish {store}"
    return Teacher(
        str(store / "model"),
        key,
        task,
        tokenizer,
        cache_dir,
        hardware,
        info,
        spec.eval_batch_size,
        spec.eval_tokens_per_batch,
        spec.dtype,
    )


WEIGHTS_FILES = ("model.safetensors", "pytorch_model.bin")


def _weights_file(model_dir: Path) -> Path | None:
    return next((model_dir / name for name in WEIGHTS_FILES if (model_dir / name).is_file()), None)


def stored_teacher_info(store: Path, set_aside: bool = True) -> dict[str, Any] | None:
    """`teacher.json` of a stored teacher whose files are whole; None if there is none.

    A store whose record is unreadable or whose weights do not match the recorded digest
    (a truncated copy, a disk error, a hand edit) is set aside as `<store>.corrupt-<n>` and
    reported, so that the caller trains the teacher again; only under the teacher's lock
    (`set_aside`), so that two processes never move it at once.
    """
    info_file = store / "teacher.json"
    if not info_file.exists():
        return None
    problem = None
    try:
        info = json.loads(info_file.read_text())
        weights = _weights_file(store / "model")
        if weights is None:
            problem = "its weights file is missing"
        elif info.get("weights_sha256") and file_digest(weights) != info["weights_sha256"]:
            problem = f"{weights.name} does not match the digest in teacher.json"
    except (OSError, json.JSONDecodeError) as err:
        problem = f"teacher.json is unreadable ({err})"
    if problem is None:
        return info
    if not set_aside:
        return None
    aside = store.with_name(f"{store.name}.corrupt-{int(time.time())}")
    log.warning("Stored teacher %s is damaged: %s. Moved to %s; training it again.", store, problem, aside)
    os.rename(store, aside)
    return None


def _finetune_teacher(
    spec: TeacherSpec,
    task: GlueTask,
    source: DataSource,
    path: str,
    tokenizer: Any,
    key: str,
    max_length: int,
    trainer_options: dict[str, Any],
    cache_dir: Path,
    store: Path,
    checkpoints: CheckpointEvery | None = None,
    inputs: InputForm | None = None,
) -> None:
    """Fine-tune in `<store>.partial` (resumable, from its last epoch or step checkpoint), then rename it
    into place when complete."""
    partial = store.with_name(store.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    log.info("Fine-tuning teacher %s on %s (key %s) in %s", path, task.name, key, partial)
    data = load_task_data(
        task, source, tokenizer, max_length, cache_dir, spec.max_train_samples, spec.max_eval_samples, inputs
    )
    seed_all(spec.seed)
    model = load_classifier(path, task)
    optim = OptimConfig(spec.learning_rate, spec.weight_decay, spec.warmup_ratio)
    module = Finetune(model, task, optim)
    datamodule = GlueDataModule(data, spec.batch_size, spec.eval_batch_size, spec.seed)
    result = fit(
        module,
        datamodule,
        trainer_options,
        partial,
        seed=spec.seed,
        identity=key,
        metrics_csv=partial / "metrics.csv",
        fault_prefix="teacher_",
        checkpoints=checkpoints,
    )
    module.student.save_pretrained(partial / "model")
    tokenizer.save_pretrained(partial / "model")
    shutil.rmtree(partial / "checkpoints", ignore_errors=True)
    weights = _weights_file(partial / "model")
    assert weights is not None
    atomic_write_json(
        partial / "teacher.json",
        {
            "key": key,
            "task": task.name,
            "source_model": path,
            "hyperparameters": asdict(spec),
            "trainer": trainer_options,
            "train_examples": len(data.train),
            "best_epoch": result.best_epoch,
            "dev_metrics_at_training": result.best_metrics,
            "train_seconds": result.train_seconds,
            "num_parameters": count_parameters(module.student),
            "resumed_from_epoch": result.resumed_from_epoch,
            "weights_sha256": file_digest(weights),
        },
    )
    publish_folder(partial, store, lambda folder: stored_teacher_info(folder) is not None)
