"""One run: checks, teacher stage, data, student, method, training, and the files a report reads."""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from hydra.utils import get_class, to_absolute_path
from omegaconf import DictConfig, OmegaConf

from kdexp import families
from kdexp.cache import atomic_write_json, atomic_write_text, cache_for_run, replaced_directory
from kdexp.config import CONFIG_DIR, OptimConfig, config_dict, config_hash, merged_onto, validate_config
from kdexp.context import RunContext
from kdexp.data import DataSource, InputForm, labels_in, load_task_data
from kdexp.environment import imported_code_revision, run_environment
from kdexp.errors import ConfigError
from kdexp.hardware import Hardware, HardwareSpec, is_global_zero, with_leased_gpu
from kdexp.loggers import build_loggers, finish_loggers
from kdexp.methods.base import DistillationModule
from kdexp.metrics import at_majority_floor, majority_metrics
from kdexp.models import (
    build_student,
    count_parameters,
    load_tokenizer,
    model_depth,
    model_max_positions,
    resolve_model_path,
)
from kdexp.preemption import CheckpointEvery, forward_to_launched
from kdexp.run_folder import RESULTS_FILE, RunFolder, check_writable
from kdexp.seeding import derive_seed, seed_all
from kdexp.tasks import MRC_TASKS, GlueTask, custom_task, get_task, option_letters
from kdexp.teacher import Teacher
from kdexp.teacher_stage import TeacherSpec, prepare_teacher
from kdexp.training import GlueDataModule, fit

log = logging.getLogger(__name__)

__all__ = ["RESULTS_FILE", "ConfigError", "RunContext", "build_context", "resolve_method", "run", "student_source"]


def resolve_method(method_cfg: DictConfig) -> tuple[type[DistillationModule], Any]:
    """The method's class and its options (an instance of its `Options` schema, or None), checked."""
    options = config_dict(method_cfg)
    name = options.pop("name", None)
    target = options.pop("_target_", None)
    if not target:
        raise ConfigError(f"method '{name}' has no _target_ (the LightningModule class) in its config.")
    try:
        cls = get_class(target)
    except Exception as err:
        raise ConfigError(f"method._target_={target} cannot be imported ({err}).") from None
    if not (isinstance(cls, type) and issubclass(cls, DistillationModule)):
        raise ConfigError(f"method._target_={target} is not a DistillationModule.")
    if cls.Options is None:
        if options:
            raise ConfigError(f"method '{name}' takes no options; got {', '.join(f'method.{k}' for k in options)}.")
        return cls, None
    validated: Any = merged_onto(cls.Options, options, prefix="method.", what=f"of method '{name}'")
    validated.check()
    return cls, validated


def compose_config(overrides: list[str]) -> DictConfig:
    """The run config that `kdexp-train <overrides>` would compose (for tools and tests)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def method_options(method: str, **overrides: Any) -> Any:
    """The checked options of `method` as its YAML gives them, with `key=value` overrides
    (`method_options("internal_pid", epochs_per_stage=2)`): the YAML stays the one source of defaults."""
    cfg = compose_config([f"method={method}", *(f"method.{k}={_override_value(v)}" for k, v in overrides.items())])
    return resolve_method(cfg.method)[1]


def _override_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_override_value(v) for v in value) + "]"
    return str(value).lower() if isinstance(value, bool) else str(value)


def teacher_spec(cfg: DictConfig) -> TeacherSpec:
    return merged_onto(TeacherSpec, cfg.teacher, prefix="teacher.")


def check_against_models(cfg: DictConfig) -> None:
    """What can be checked from the models' config.json alone: position limit and depth."""
    teacher_path = resolve_model_path(cfg.teacher.name_or_path, "teacher.name_or_path")
    paths = {"teacher.name_or_path": teacher_path}
    if cfg.student.init == "pretrained":
        paths["student.name_or_path"] = resolve_model_path(cfg.student.name_or_path, "student.name_or_path")
    for key, path in paths.items():
        limit = model_max_positions(path)
        if limit is not None and cfg.data.max_length > limit:
            raise ConfigError(
                f"data.max_length={cfg.data.max_length} is above the {limit} positions of "
                f"{key}={path}; use data.max_length={limit} or less."
            )
    depth = model_depth(teacher_path)
    if cfg.student.init in ("first_layers", "every_nth_layer") and depth is not None and cfg.student.num_layers > depth:
        raise ConfigError(
            f"student.num_layers={cfg.student.num_layers} cannot be taken from the teacher's {depth} "
            f"layers; use student.num_layers between 1 and {depth}."
        )


def student_config(cfg: DictConfig, teacher: Teacher) -> Any:
    """The config of the model the student is built from (the data is tokenised the way it reads it)."""
    from transformers import AutoConfig

    if cfg.student.init == "pretrained":
        return AutoConfig.from_pretrained(resolve_model_path(cfg.student.name_or_path, "student.name_or_path"))
    return AutoConfig.from_pretrained(student_source(cfg, teacher))


def student_source(cfg: DictConfig, teacher: Teacher) -> str:
    if cfg.student.get("from_finetuned_teacher", False):
        return teacher.path
    return resolve_model_path(cfg.teacher.name_or_path, "teacher.name_or_path")


def task_from_config(task_cfg: DictConfig) -> GlueTask:
    """A GLUE or MRC task by name, an MRC task on one's own files in its release's format, or the user's own
    files (`task=custom`)."""
    if task_cfg.name in MRC_TASKS:
        return mrc_task(task_cfg)
    if task_cfg.get("train_file") is None:
        return get_task(task_cfg.name)
    train_file, dev_file = (to_absolute_path(task_cfg[key]) for key in ("train_file", "dev_file"))
    regression = bool(task_cfg.regression)
    labels = None
    if not regression:
        labels = (
            tuple(str(v) for v in task_cfg.labels) if task_cfg.labels else labels_in(train_file, task_cfg.label_column)
        )
    metric = task_cfg.metric or ("combined_score" if regression else "accuracy")
    return custom_task(
        task_cfg.name,
        train_file,
        dev_file,
        tuple(task_cfg.text_columns),
        task_cfg.label_column,
        labels,
        regression,
        metric,
        bool(task_cfg.get("allow_empty_text", False)),
    )


def mrc_task(task_cfg: DictConfig) -> GlueTask:
    """An MRC task; with `task.train_file`, read from one's own files (the dev split: `task.dev_file`, or the
    `task.dev_articles` of the training file)."""
    task = get_task(task_cfg.name)
    if task_cfg.get("num_choices") is not None:
        task = replace(task, label_names=option_letters(int(task_cfg.num_choices)))
    articles = tuple(task_cfg.get("dev_articles") or ())
    if task_cfg.get("train_file") is None:
        if task_cfg.get("dev_file") or articles:
            given = "task.dev_file" if task_cfg.get("dev_file") else "task.dev_articles"
            raise ConfigError(
                f"{given} is set but task.train_file is not: an MRC task reads both splits from the official "
                f"release or both from one's own files; set task.train_file=<file> too (e.g. the release's train.json)."
            )
        return task
    train_file = to_absolute_path(task_cfg.train_file)
    dev_file = to_absolute_path(task_cfg.dev_file) if task_cfg.get("dev_file") else train_file
    return replace(task, files={"train": train_file, "validation": dev_file}, dev_articles=articles)


def check_run(cfg: DictConfig) -> tuple[GlueTask, type[DistillationModule], Any]:
    """Every check that needs no data and no model weights: before any work."""
    validate_config(cfg)
    HardwareSpec.from_trainer(trainer_options(cfg)).check()
    task = task_from_config(cfg.task)
    method_cls, method_options = resolve_method(cfg.method)
    method_cls.check_config(cfg, task)
    check_against_models(cfg)
    return task, method_cls, method_options


def build_context(
    cfg: DictConfig, run_dir: Path, hardware: Hardware | None = None, cache_dir: Path | None = None
) -> tuple[RunContext, type[DistillationModule], Any]:
    """Everything before training: checks, teacher stage, data, student; fails before any training.

    `hardware` (default: from `cfg.trainer`) is where every stage runs; under DDP its processes
    run this together (`Hardware.launch` first). `cache_dir` (default: `cfg.cache_dir`) is the folder
    the cache stages use (`kdexp.cache.cache_for_run`).
    """
    task, method_cls, method_options = check_run(cfg)
    hardware = hardware or Hardware.from_trainer(trainer_options(cfg))
    source = DataSource.from_data_config(cfg.data)
    cache_dir = cache_dir or Path(to_absolute_path(cfg.cache_dir))
    teacher = prepare_teacher(
        teacher_spec(cfg),
        task,
        source,
        cfg.data.max_length,
        trainer_options(cfg),
        cache_dir,
        hardware,
        CheckpointEvery.from_config(cfg.get("checkpoint")),
        int(cfg.task.get("doc_stride", 128)),
    )
    tokenizer = (
        teacher.tokenizer
        if cfg.student.init != "pretrained"
        else load_tokenizer(
            resolve_model_path(cfg.student.name_or_path, "student.name_or_path"), "student.name_or_path"
        )
    )
    inputs = InputForm(families.input_form(student_config(cfg, teacher)), int(cfg.task.get("doc_stride", 128)))
    data = load_task_data(
        task,
        source,
        tokenizer,
        cfg.data.max_length,
        cache_dir,
        cfg.data.max_train_samples,
        cfg.data.max_eval_samples,
        inputs,
    )
    seed_all(derive_seed(cfg.seed, "student"))
    student = build_student(cfg.student, student_source(cfg, teacher), task)
    optim = OptimConfig(**config_dict(cfg.optim))
    return RunContext(cfg, task, data, student, teacher, optim, run_dir), method_cls, method_options


def build_module(context: RunContext, method_cls: type[DistillationModule], options: Any) -> DistillationModule:
    # The method's own modules (projections, agents) draw from the seed alone: its cache stages run
    # with the RNG preserved (kdexp.cache.load_or_compute), so a cold and a warm cache agree.
    seed_all(derive_seed(context.cfg.seed, "method"))
    return method_cls.from_run(context, options)


def trainer_options(cfg: DictConfig) -> dict[str, Any]:
    """The `trainer` group as Lightning's arguments, on the GPU a sweep job leased (kdexp.hardware.GpuLease)."""
    return with_leased_gpu(config_dict(cfg.trainer))


def resolved_config(cfg: DictConfig) -> dict[str, Any]:
    try:
        return config_dict(cfg)
    except Exception as err:
        raise ConfigError(f"the config does not resolve: {str(err).splitlines()[0]}") from None


def run(
    cfg: DictConfig,
    run_dir: Path,
    overrides: list[str] | None = None,
    sweep_group: str | None = None,
    experiment: str | None = None,
) -> dict[str, Any]:
    """Train one student and write config.yaml, metrics.csv, student/ and results.json in `run_dir`.

    `sweep_group` and `experiment` name the wandb group (the experiment when one is used).
    """
    folder = RunFolder(Path(run_dir))
    run_dir = folder.path
    resolved = resolved_config(cfg)
    identity = config_hash(resolved)
    if cfg.resume:
        finished = folder.finished_results(resolved)
        if finished is not None:
            log.info("%s exists: this run is finished; not training again.", folder.results_file)
            return finished
        folder.check_resumable(resolved)
    check_run(cfg)  # before any work (build_context repeats it: cheap)
    folder.claim()  # one owner per run folder (kdexp-train has claimed it already; a no-op then)
    if is_global_zero():  # the DDP processes a launch starts check nothing: the first has
        check_writable(run_dir, "hydra.run.dir")
    # a read-only cache_dir is read through an overlay that takes the entries it lacks (one line says where)
    cache_dir = cache_for_run(Path(to_absolute_path(cfg.cache_dir)), run_dir, announce=is_global_zero())

    imported_code_revision()  # the code this process runs, before the checkout can change under it
    hardware = Hardware.from_trainer(trainer_options(cfg))
    hardware.launch()  # several devices: every process from here on, so that every stage can use them all
    forward_to_launched(hardware)  # a stop signal this process alone gets reaches them too (kdexp.preemption)
    context, method_cls, method_options = build_context(cfg, run_dir, hardware, cache_dir)
    module = build_module(context, method_cls, method_options)
    task, data, teacher = context.task, context.data, context.teacher
    teacher_metrics = teacher.dev_metrics(data)  # every DDP process takes part in the pass (if not cached)
    floor = majority_metrics(task, data)
    if floor is not None and hardware.is_global_zero:
        warn_if_teacher_at_floor(task, teacher_metrics, floor)

    if hardware.is_global_zero:
        if not cfg.resume:
            folder.set_aside_previous()
        run_dir.mkdir(parents=True, exist_ok=True)
        if not folder.config_file.exists():
            folder.keep_hydra_files()
        atomic_write_text(folder.config_file, OmegaConf.to_yaml(cfg, resolve=True))
    run_name = f"{task.name}-{cfg.method.name}-seed{cfg.seed}"
    tags = [f"task:{task.name}", f"method:{cfg.method.name}"] + ([f"experiment:{experiment}"] if experiment else [])
    loggers = build_loggers(
        cfg.logger,
        run_dir,
        run_name,
        cfg.method.name,
        experiment or sweep_group,
        resolved,
        tags,
    )
    datamodule = GlueDataModule(
        data,
        cfg.data.batch_size,
        cfg.data.eval_batch_size,
        cfg.seed,
        cfg.data.num_workers,
        bool(cfg.data.get("group_by_length", False)),
    )
    started = time.perf_counter()
    try:
        result = fit(
            module,
            datamodule,
            trainer_options(cfg),
            run_dir,
            seed=cfg.seed,
            identity=identity,
            loggers=loggers or False,
            metrics_csv=run_dir / "metrics.csv",
            resume=cfg.resume,
            checkpoints=CheckpointEvery.from_config(cfg.get("checkpoint")),
        )
    except BaseException:
        finish_loggers(loggers, failed=True)
        raise

    if result.global_rank != 0:  # a DDP process besides the first: the first writes the run's files
        return {"metrics": result.best_metrics, "main_metric": task.main_metric}
    student_dir = run_dir / "student"
    with replaced_directory(student_dir) as partial:  # whole or absent; files follow the umask
        module.student.save_pretrained(partial)
        data.tokenizer.save_pretrained(partial)
    results = {
        "task": task.name,
        "method": cfg.method.name,
        "seed": int(cfg.seed),
        "main_metric": task.main_metric,
        "metrics": result.best_metrics,
        "teacher_metrics": teacher_metrics,
        "majority_metrics": floor,
        "teacher_key": teacher.key,
        "teacher_path": teacher.path,
        "student_params": count_parameters(module.student),
        "teacher_params": teacher.num_parameters,
        "best_epoch": result.best_epoch,
        "epochs_trained": result.epochs_trained,
        "resumed_from_epoch": result.resumed_from_epoch,
        "train_examples": len(data.train),
        "train_seconds": result.train_seconds,
        "train_examples_per_second": result.train_examples_per_second,
        "wall_seconds": time.perf_counter() - started,
        "method_info": context.method_info,
        "overrides": list(overrides or []),
        "student_dir": str(student_dir),
        "config_hash": identity,
        "environment": run_environment(hardware),
        "config": resolved,
    }
    finish_loggers(loggers, results, log_model=bool(cfg.logger.get("log_model", False)))
    atomic_write_json(folder.results_file, results)
    if not cfg.get("keep_checkpoints", False):
        shutil.rmtree(folder.checkpoints, ignore_errors=True)
    log.info("Best dev %s: %s", task.main_metric, result.best_metrics)
    return results


def warn_if_teacher_at_floor(task: GlueTask, teacher_metrics: dict[str, float], floor: dict[str, float]) -> None:
    """One line when the teacher does no better on dev than answering every row with the most frequent label:
    its students would be distilled from what is, for this task, noise."""
    key = f"val/{task.main_metric}"
    if at_majority_floor(teacher_metrics, floor, key):
        log.warning(
            "The teacher's dev %s (%.4f) is no better than answering every dev row with its most frequent label "
            "(%.4f): its students learn from noise. Train it longer or on more data (teacher.epochs, "
            "teacher.learning_rate, teacher.max_train_samples) before comparing methods.",
            task.main_metric,
            teacher_metrics[key],
            floor[key],
        )
