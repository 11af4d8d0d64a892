"""One run: teacher stage, data, student, method, training, and the files a report reads."""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra.utils import get_class, to_absolute_path
from omegaconf import DictConfig, OmegaConf

from kdexp.cache import atomic_write_json
from kdexp.data import DataSource, TaskData, load_task_data
from kdexp.loggers import build_loggers, finish_loggers
from kdexp.methods.base import DistillationModule, OptimConfig
from kdexp.models import build_student, count_parameters, load_tokenizer, resolve_model_path
from kdexp.tasks import GlueTask, get_task
from kdexp.teacher import Teacher, TeacherSpec, prepare_teacher
from kdexp.training import GlueDataModule, fit

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"


class ConfigError(ValueError):
    """A config value that cannot work: names the key and what would."""


@dataclass
class RunContext:
    """What a method may use to build itself (`DistillationModule.from_run`)."""

    cfg: DictConfig
    task: GlueTask
    data: TaskData
    student: Any
    teacher: Teacher
    optim: OptimConfig
    run_dir: Path
    method_info: dict[str, Any] = field(default_factory=dict)  # what the method's stages did; goes into results.json


def resolve_method(method_cfg: DictConfig) -> tuple[type[DistillationModule], dict[str, Any]]:
    options = OmegaConf.to_container(method_cfg, resolve=True)
    assert isinstance(options, dict)
    name = options.pop("name", None)
    target = options.pop("_target_", None)
    if not target:
        raise ConfigError(f"method '{name}' has no _target_ (the LightningModule class) in its config.")
    cls = get_class(target)
    if not (isinstance(cls, type) and issubclass(cls, DistillationModule)):
        raise ConfigError(f"method._target_={target} is not a DistillationModule.")
    return cls, options


def teacher_spec(cfg: DictConfig) -> TeacherSpec:
    values = OmegaConf.to_container(cfg.teacher, resolve=True)
    assert isinstance(values, dict)
    try:
        return TeacherSpec(**values)
    except TypeError as err:
        raise ConfigError(f"teacher config: {err}. Valid keys: {list(TeacherSpec.__dataclass_fields__)}.") from None


def _student_source(cfg: DictConfig, teacher: Teacher) -> str:
    if cfg.student.get("from_finetuned_teacher", False):
        return teacher.path
    return resolve_model_path(cfg.teacher.name_or_path, "teacher.name_or_path")


def build_context(cfg: DictConfig, run_dir: Path) -> tuple[RunContext, type[DistillationModule], dict[str, Any]]:
    """Everything before training: checks, teacher stage, data, student; fails before any training."""
    task = get_task(cfg.task.name)
    method_cls, method_options = resolve_method(cfg.method)
    method_cls.check_config(cfg, task)
    source = DataSource.from_config(cfg.data.source, cfg.data.glue_dir)
    cache_dir = Path(to_absolute_path(cfg.cache_dir))
    teacher = prepare_teacher(
        teacher_spec(cfg), task, source, cfg.data.max_length, cfg.data.max_eval_samples, trainer_options(cfg), cache_dir
    )
    tokenizer = teacher.tokenizer if cfg.student.init != "pretrained" else load_tokenizer(
        resolve_model_path(cfg.student.name_or_path, "student.name_or_path")
    )
    data = load_task_data(
        task, source, tokenizer, cfg.data.max_length, cache_dir, cfg.data.max_train_samples, cfg.data.max_eval_samples
    )
    pl.seed_everything(cfg.seed, workers=True)
    student = build_student(cfg.student, _student_source(cfg, teacher), task)
    optim = OptimConfig(**OmegaConf.to_container(cfg.optim, resolve=True))  # type: ignore[arg-type]
    return RunContext(cfg, task, data, student, teacher, optim, run_dir), method_cls, method_options


def build_module(context: RunContext, method_cls: type[DistillationModule], options: dict[str, Any]) -> DistillationModule:
    try:
        return method_cls.from_run(context, **options)
    except TypeError as err:
        raise ConfigError(f"method '{context.cfg.method.name}': {err}. Check the keys under method.") from None


def trainer_options(cfg: DictConfig) -> dict[str, Any]:
    options = OmegaConf.to_container(cfg.trainer, resolve=True)
    assert isinstance(options, dict)
    return options


def run(cfg: DictConfig, run_dir: Path, overrides: list[str] | None = None, sweep_group: str | None = None) -> dict[str, Any]:
    """Train one student and write config.yaml, metrics.csv, student/ and results.json in `run_dir`."""
    run_dir = Path(run_dir)
    results_path = run_dir / RESULTS_FILE
    if results_path.exists():
        log.info("%s exists: this run is finished; not training again.", results_path)
        return json.loads(results_path.read_text())

    context, method_cls, method_options = build_context(cfg, run_dir)
    module = build_module(context, method_cls, method_options)
    task, data, teacher = context.task, context.data, context.teacher

    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    run_name = f"{task.name}-{cfg.method.name}-seed{cfg.seed}"
    loggers = build_loggers(cfg.logger, run_dir, run_name, cfg.method.name, sweep_group, resolved)  # type: ignore[arg-type]
    datamodule = GlueDataModule(data, cfg.data.batch_size, cfg.data.eval_batch_size, cfg.seed, cfg.data.num_workers)
    started = time.perf_counter()
    try:
        result = fit(module, datamodule, trainer_options(cfg), run_dir, loggers or False, run_dir / "metrics.csv", cfg.resume)
    except BaseException:
        finish_loggers(loggers, {}, failed=True)
        raise

    student_dir = run_dir / "student"
    module.student.save_pretrained(student_dir)
    data.tokenizer.save_pretrained(student_dir)
    results = {
        "task": task.name,
        "method": cfg.method.name,
        "seed": int(cfg.seed),
        "main_metric": task.main_metric,
        "metrics": result.best_metrics,
        "teacher_metrics": teacher.dev_metrics(data),
        "teacher_key": teacher.key,
        "teacher_path": teacher.path,
        "student_params": count_parameters(module.student),
        "teacher_params": teacher.num_parameters,
        "best_epoch": result.best_epoch,
        "epochs_trained": result.epochs_trained,
        "train_examples": len(data.train),
        "train_seconds": result.train_seconds,
        "train_examples_per_second": result.train_examples_per_second,
        "wall_seconds": time.perf_counter() - started,
        "method_info": context.method_info,
        "overrides": list(overrides or []),
        "student_dir": str(student_dir),
        "config": resolved,
    }
    finish_loggers(loggers, {f"best/{k}": v for k, v in result.best_metrics.items()})
    atomic_write_json(results_path, results)
    if not cfg.get("keep_checkpoints", False):
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    log.info("Best dev %s: %s", task.main_metric, result.best_metrics)
    return results
