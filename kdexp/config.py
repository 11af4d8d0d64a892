"""The run config: its schemas and checks, what in it decides a result, and how two configs differ.

A run's result is a function of its *result config*: the resolved config without the keys
that only change where files go, what is displayed or how fast it runs (`NON_RESULT_KEYS`).
Its hash is stored with the run's checkpoints and `results.json`; a re-launch whose result
config differs is refused with the differing keys named. `kdexp-report` uses the same list
to decide which overrides split a table's rows.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional, TypeVar, cast, get_type_hints

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException

from kdexp.errors import ConfigError

T = TypeVar("T")


# The config groups: kdexp/conf, shipped inside the package (the repository's conf/ links to it).
CONFIG_DIR = str(Path(__file__).resolve().parent / "conf")

# Keys (exact, or a prefix ending in ".") that cannot change a run's numbers.
NON_RESULT_KEYS: tuple[str, ...] = (
    "hydra.",
    "logger",
    "logger.",
    "cache_dir",
    "resume",
    "keep_checkpoints",
    "data.num_workers",
    "data.eval_batch_size",
    "teacher.eval_batch_size",
    "teacher.eval_tokens_per_batch",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.log_every_n_steps",
    "method.queries.batch_size",
    "method.mlm.eval_batch_size",
    "checkpoint.",  # when step checkpoints are written: a resumed run ends as an uninterrupted one
    "task.max_length",  # only data.max_length's default; data.max_length itself is compared
)


# Keys added after runs were made, with the value that means "as before": a config holding one at
# this value decides the same result as a config without it (so older run folders still match).
NEUTRAL_VALUES: dict[str, Any] = {
    "optim.lr_scheduler": "linear",
    "data.group_by_length": False,
    "method.kd_form": "hinton",
    "method.smoothing_form": "others",
    "method.final_alpha": None,
    "method.attention_heads": "mean",
    "method.mlm.adapt.passes": None,
    "teacher.dtype": "float32",
    "student.dtype": "float32",
    "data.hub_dataset": "nyu-mll/glue",
    "data.mrc_dir": None,
    "task.doc_stride": 128,
    "task.dev_articles": None,
    "task.num_choices": None,
}
NEUTRAL_VALUES["task.allow_empty_text"] = False  # own files: empty texts refused, as before the key existed

# Weights dtypes a model may be loaded in (kdexp.models.MODEL_DTYPES).
WEIGHT_DTYPES = ("float32", "bfloat16", "float16")


# Keys naming a local file or folder. A relative path is read from the launch folder, so the same data
# spelled `../shared/glue_data` or `/work/shared/glue_data` (launched from /work/main) is one config.
PATH_KEYS: tuple[str, ...] = ("data.glue_dir", "data.mrc_dir", "task.train_file", "task.dev_file")
# Keys naming a local folder or a Hub id: taken as a path only where one of that name exists.
PATH_OR_HUB_KEYS: tuple[str, ...] = (
    "data.hub_dataset",
    "teacher.name_or_path",
    "student.name_or_path",
    "method.mlm.name_or_path",
)


def launch_path(value: str) -> str:
    """`value` as an absolute, normalised path from the launch folder (Hydra's original cwd); symlinks are
    kept as written (a link and its target stay two names, so an older run folder's paths still match)."""
    from hydra.utils import to_absolute_path

    return os.path.normpath(to_absolute_path(os.path.expanduser(value)))


def with_launch_paths(flat: dict[str, Any]) -> dict[str, Any]:
    """A flattened config with its local paths absolute (see PATH_KEYS): what a run folder's identity compares."""
    out = dict(flat)
    for key in PATH_KEYS + PATH_OR_HUB_KEYS:
        value = out.get(key)
        if not isinstance(value, str) or not value or "://" in value:
            continue
        if key in PATH_KEYS or os.path.exists(launch_path(value)):
            out[key] = launch_path(value)
    return out


def is_result_key(key: str) -> bool:
    """False for a key in (or under) `NON_RESULT_KEYS`."""
    for k in NON_RESULT_KEYS:
        if k.endswith(".") and key.startswith(k):
            return False
        if key == k or key.startswith(k + "."):
            return False
    return True


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}`; lists stay values."""
    if isinstance(tree, dict):
        flat: dict[str, Any] = {}
        for key, value in tree.items():
            flat.update(flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: tree}


def unread_data_folders(flat: dict[str, Any]) -> set[str]:
    """The data-folder keys a run never reads: both with its own files (`task.train_file`), `data.mrc_dir` for a
    GLUE task and `data.glue_dir` for a reading-comprehension one. They default to `MRC_DIR` / `GLUE_DIR`, so
    without this a finished run would count as another config when relaunched from a shell that exports one."""
    from kdexp.tasks import MRC_TASKS

    if flat.get("task.train_file"):
        return {"data.glue_dir", "data.mrc_dir"}
    return {"data.glue_dir"} if flat.get("task.name") in MRC_TASKS else {"data.mrc_dir"}


def result_config(resolved: dict[str, Any]) -> dict[str, Any]:
    """The flattened result-deciding part of a resolved config (a plain dict)."""
    flat = with_launch_paths(flatten(resolved))
    unread = unread_data_folders(flat)
    return {
        k: v
        for k, v in sorted(flat.items())
        if is_result_key(k) and k not in unread and not (k in NEUTRAL_VALUES and NEUTRAL_VALUES[k] == v)
    }


def config_hash(resolved: dict[str, Any]) -> str:
    payload = json.dumps(result_config(resolved), sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def config_differences(old: dict[str, Any], new: dict[str, Any], limit: int = 8) -> list[str]:
    """`key: old -> new` for every result key that differs (at most `limit`, then a count)."""
    a, b = result_config(old), result_config(new)
    missing = object()
    lines = [
        f"{k}: {a.get(k, '(absent)')!r} -> {b.get(k, '(absent)')!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k, missing) != b.get(k, missing)
    ]
    if len(lines) > limit:
        lines = lines[:limit] + [f"... and {len(lines) - limit} more"]
    return lines


# --------------------------------------------------------------------------- schemas and checks
#
# The YAML files are the one source of default values; these schemas give every key its type
# and range. `validate_config` merges the composed config onto them before any work, so an
# unknown key (`+optim.learnin_rate=1`), a wrong type (`optim.learning_rate=abc`) or an
# out-of-range value stops the run with one line naming the key.


@dataclass
class DataSchema:
    source: str = MISSING
    glue_dir: Optional[str] = None
    hub_dataset: str = "nyu-mll/glue"  # a Hub id, or a local folder in that dataset's layout (kdexp.hub_folder)
    mrc_dir: Optional[str] = None  # machine reading comprehension: the official releases (dream/, race/, squad*/)
    max_length: int = MISSING
    max_train_samples: Optional[int] = None
    max_eval_samples: Optional[int] = None
    batch_size: int = MISSING
    eval_batch_size: int = MISSING
    num_workers: Any = "auto"  # "auto" or a count
    group_by_length: bool = False

    def check(self) -> None:
        require(self.source in ("auto", "hub", "local"), "data.source", self.source, "one of auto, hub, local")
        require(self.max_length > 0, "data.max_length", self.max_length, "a positive number of tokens (e.g. 128)")
        for key in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, key)
            require(value is None or value > 0, f"data.{key}", value, "a positive number of rows, or null for all")
        require(self.batch_size > 0, "data.batch_size", self.batch_size, "a positive batch size")
        require(self.eval_batch_size > 0, "data.eval_batch_size", self.eval_batch_size, "a positive batch size")
        workers = self.num_workers
        require(
            workers == "auto" or (isinstance(workers, int) and not isinstance(workers, bool) and workers >= 0),
            "data.num_workers",
            workers,
            "auto, or 0 or more worker processes",
        )


@dataclass
class OptimConfig:
    """The `optim` group: AdamW with warm-up and decay (the BERT recipe), for every method and the teacher stage."""

    learning_rate: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    adam_epsilon: float = 1e-8
    lr_scheduler: str = "linear"  # linear: warm-up then linear decay (BERT); cosine; constant; constant_with_warmup

    def check(self) -> None:
        require(
            self.lr_scheduler in ("linear", "cosine", "constant", "constant_with_warmup"),
            "optim.lr_scheduler",
            self.lr_scheduler,
            "linear, cosine, constant or constant_with_warmup",
        )
        require(
            self.learning_rate > 0, "optim.learning_rate", self.learning_rate, "a positive learning rate (e.g. 5e-5)"
        )
        require(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "0 or more")
        require(0 <= self.warmup_ratio < 1, "optim.warmup_ratio", self.warmup_ratio, "a fraction in [0, 1)")
        require(self.adam_epsilon > 0, "optim.adam_epsilon", self.adam_epsilon, "a small positive number")


@dataclass
class TeacherSchema:
    """The `teacher` group: a checkpoint, and how the teacher stage fine-tunes it (all in its key)."""

    name_or_path: str = MISSING
    finetuned: bool = False  # true: the checkpoint is already fine-tuned on the task
    learning_rate: float = 5e-5
    epochs: int = 3
    batch_size: int = 32
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    gradient_clip_val: Optional[float] = 1.0
    max_train_samples: Optional[int] = None
    max_eval_samples: Optional[int] = None
    seed: int = 42
    eval_batch_size: int = 128
    eval_tokens_per_batch: int = 16384
    dtype: str = "float32"  # the fine-tuned teacher's weights in its passes (fine-tuning is always float32)

    def check(self) -> None:
        require(self.dtype in WEIGHT_DTYPES, "teacher.dtype", self.dtype, " or ".join(WEIGHT_DTYPES))
        require(self.learning_rate > 0, "teacher.learning_rate", self.learning_rate, "a positive learning rate")
        require(self.epochs >= 1, "teacher.epochs", self.epochs, "at least 1 epoch")
        require(self.batch_size > 0, "teacher.batch_size", self.batch_size, "a positive batch size")
        require(self.eval_batch_size > 0, "teacher.eval_batch_size", self.eval_batch_size, "a positive batch size")
        require(
            self.eval_tokens_per_batch > 0,
            "teacher.eval_tokens_per_batch",
            self.eval_tokens_per_batch,
            "a positive number of tokens",
        )
        require(self.weight_decay >= 0, "teacher.weight_decay", self.weight_decay, "0 or more")
        require(0 <= self.warmup_ratio < 1, "teacher.warmup_ratio", self.warmup_ratio, "a fraction in [0, 1)")
        clip = self.gradient_clip_val
        require(clip is None or clip >= 0, "teacher.gradient_clip_val", clip, "0 or more, or null")
        for key in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, key)
            require(value is None or value > 0, f"teacher.{key}", value, "a positive number of rows, or null for all")


STUDENT_INITS = {
    "first_layers": ("num_layers", "from_finetuned_teacher"),
    "every_nth_layer": ("num_layers", "from_finetuned_teacher"),
    "pretrained": ("name_or_path",),
    "random": ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"),
}


@dataclass
class StudentSchema:
    init: str = MISSING
    num_layers: Optional[int] = None
    from_finetuned_teacher: bool = False
    name_or_path: Optional[str] = None
    hidden_size: Optional[int] = None
    num_hidden_layers: Optional[int] = None
    num_attention_heads: Optional[int] = None
    intermediate_size: Optional[int] = None
    dtype: str = "float32"  # the student's weights (mixed precision keeps them float32)

    def check(self) -> None:
        # AdamW stepping bf16 or fp16 weights directly rounds most small updates away (no float32 master copy).
        require(
            self.dtype == "float32",
            "student.dtype",
            self.dtype,
            "float32: the student trains, and its optimiser needs float32 weights; for bf16 compute set "
            "trainer.precision=bf16-mixed (float32 weights, bf16 matmuls)",
        )
        require(self.init in STUDENT_INITS, "student.init", self.init, "one of " + ", ".join(STUDENT_INITS))
        if self.init in ("first_layers", "every_nth_layer"):
            require(
                self.num_layers is not None and self.num_layers >= 1,
                "student.num_layers",
                self.num_layers,
                "at least 1 layer",
            )
        if self.init == "pretrained":
            require(
                bool(self.name_or_path), "student.name_or_path", self.name_or_path, "a Hub id or a checkpoint folder"
            )
        if self.init == "random":
            for key in STUDENT_INITS["random"]:
                value = getattr(self, key)
                require(
                    value is None or value >= 1, f"student.{key}", value, "a positive size, or null for the teacher's"
                )


@dataclass
class LoggerSchema:
    """`logger=csv|wandb|tensorboard|none` (conf/logger): where the step history goes besides metrics.csv."""

    type: str = MISSING
    project: Optional[str] = None
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: Optional[list[str]] = None
    mode: str = "auto"
    init_timeout: float = 60.0
    log_model: bool = False

    def check(self) -> None:
        require(
            self.type in ("csv", "wandb", "tensorboard", "none"),
            "logger.type",
            self.type,
            "csv, wandb, tensorboard or none",
        )
        require(
            self.mode in ("auto", "online", "offline", "disabled"),
            "logger.mode",
            self.mode,
            "auto, online, offline or disabled",
        )


@dataclass
class TaskSchema:
    """A GLUE task by name, or the user's own files (`task=custom`: `train_file` set)."""

    name: str = MISSING
    train_file: Optional[str] = None
    dev_file: Optional[str] = None
    text_columns: list[str] = field(default_factory=lambda: ["text"])
    label_column: str = "label"
    labels: Optional[list[str]] = None  # null: the labels found in the training file
    regression: bool = False
    metric: Optional[str] = None  # null: accuracy (classification) or combined_score (regression)
    allow_empty_text: bool = False  # own files: keep rows with an empty text (counted) instead of refusing them
    max_length: int = 128  # the task's usual input length in tokens: data.max_length's default (SQuAD: 384)
    doc_stride: int = 128  # extractive QA: tokens shared by consecutive windows of a long passage
    dev_articles: Optional[list[str]] = None  # extractive QA from one file: the articles (titles) of the dev split
    num_choices: Optional[int] = None  # multiple choice: options per question (null: the task's; DREAM 3, RACE 4)

    @property
    def is_custom(self) -> bool:
        return self.train_file is not None

    @property
    def is_mrc(self) -> bool:
        from kdexp.tasks import MRC_TASKS

        return self.name in MRC_TASKS

    def check(self) -> None:
        from kdexp.tasks import CUSTOM_METRICS, TASKS

        require(self.doc_stride >= 1, "task.doc_stride", self.doc_stride, "a positive number of tokens (run_qa: 128)")
        if self.is_mrc:  # its own files in the release's format (task.train_file / dev_file), or MRC_DIR / the Hub
            from kdexp.tasks import EXTRACTIVE_QA, MRC_TASKS, OPTION_LETTERS

            require(
                self.num_choices is None or MRC_TASKS[self.name].family != EXTRACTIVE_QA,
                "task.num_choices",
                self.num_choices,
                "null: extractive QA has no options",
            )
            require(
                self.num_choices is None or 2 <= self.num_choices <= len(OPTION_LETTERS),
                "task.num_choices",
                self.num_choices,
                f"null (the task's) or 2 to {len(OPTION_LETTERS)} options per question",
            )
            require(
                self.num_choices is None or self.train_file is not None,
                "task.num_choices",
                self.num_choices,
                "null with the release's files or the Hub (their own number of options); N with one's own task.train_file",
            )
            require(
                not self.dev_articles or MRC_TASKS[self.name].family == EXTRACTIVE_QA,
                "task.dev_articles",
                self.dev_articles,
                "task.dev_file for multiple choice (dev_articles splits a SQuAD-format file by article title)",
            )
            require(
                self.train_file is None or bool(self.dev_file or self.dev_articles),
                "task.dev_file",
                self.dev_file,
                "the dev file (or task.dev_articles, to take the dev split from train_file)",
            )
            return
        if not self.is_custom:
            require(self.name in TASKS, "task.name", self.name, "one of " + " ".join(TASKS) + ", or task=custom")
            return
        require(
            bool(self.dev_file), "task.dev_file", self.dev_file, "a labelled CSV/TSV/JSONL file for model selection"
        )
        require(
            1 <= len(self.text_columns) <= 2,
            "task.text_columns",
            list(self.text_columns),
            "one column (text) or two (a sentence pair)",
        )
        require(
            self.metric is None or self.metric in CUSTOM_METRICS[self.regression],
            "task.metric",
            self.metric,
            "null or one of " + ", ".join(CUSTOM_METRICS[self.regression]),
        )
        require(self.labels is None or len(self.labels) >= 2, "task.labels", self.labels, "null or two or more labels")


@dataclass
class CheckpointSchema:
    """The `checkpoint` block: how often long loops (training, the teacher's fine-tuning, the MLM
    adaptation) write their resumable step checkpoint besides epoch boundaries (kdexp.preemption)."""

    every_n_steps: Optional[int] = None
    every_minutes: Optional[float] = 30.0

    def check(self) -> None:
        steps, minutes = self.every_n_steps, self.every_minutes
        require(
            steps is None or steps >= 1,
            "checkpoint.every_n_steps",
            steps,
            "a positive number of optimiser steps (e.g. 1000), or null for none",
        )
        require(
            minutes is None or minutes > 0,
            "checkpoint.every_minutes",
            minutes,
            "a positive number of minutes (e.g. 30), or null for none",
        )


@dataclass
class RunSchema:
    """The top level of a composed config (the `method` and `trainer` groups are checked separately)."""

    task: TaskSchema = field(default_factory=TaskSchema)
    teacher: TeacherSchema = field(default_factory=TeacherSchema)
    student: StudentSchema = field(default_factory=StudentSchema)
    logger: LoggerSchema = field(default_factory=LoggerSchema)
    data: DataSchema = field(default_factory=DataSchema)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointSchema = field(default_factory=CheckpointSchema)
    method: Any = MISSING
    trainer: Any = MISSING
    seed: int = MISSING
    cache_dir: str = MISSING
    resume: bool = True
    keep_checkpoints: bool = False

    def check(self) -> None:
        for part in (self.task, self.data, self.optim, self.teacher, self.student, self.logger, self.checkpoint):
            part.check()
        self.check_qa_windows()

    def check_qa_windows(self) -> None:
        """A window is [CLS] question [SEP] passage [SEP]: its passage part must be longer than the stride."""
        from kdexp.tasks import EXTRACTIVE_QA, MRC_TASKS

        task = MRC_TASKS.get(self.task.name)
        if task is None or task.family != EXTRACTIVE_QA:
            return
        require(
            self.task.doc_stride < self.data.max_length - 3,
            "task.doc_stride",
            self.task.doc_stride,
            f"fewer tokens than windows of data.max_length={self.data.max_length} hold beside the question "
            "(run_qa: max_length 384, doc_stride 128)",
        )


def require(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} cannot work: use {expected}.")


def merged_onto(schema: type[T], values: Any, prefix: str = "", what: str = "") -> T:
    """`values` (a DictConfig or dict) typed and completed by `schema`; one-line ConfigError otherwise.

    `prefix` is where `values` sit in the run config (`"method."`), `what` how to name them in
    an unknown-key message (`"of method 'dbkd'"`).
    """
    if OmegaConf.is_config(values):
        values = OmegaConf.to_container(values, resolve=True)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), values)
        return cast(T, OmegaConf.to_object(merged))
    except OmegaConfBaseException as err:
        raise ConfigError(_one_line(err, schema, prefix, what)) from None


def config_dict(cfg: Any, resolve: bool = True) -> dict[str, Any]:
    """A config mapping (a DictConfig) as a plain dict, its interpolations resolved unless `resolve` is False."""
    container = OmegaConf.to_container(cfg, resolve=resolve)
    assert isinstance(container, dict), f"a config mapping was expected, got {type(container).__name__}"
    return cast(dict[str, Any], container)  # the keys of kdexp's configs are names


def _one_line(err: OmegaConfBaseException, schema: type, prefix: str, what: str) -> str:
    key = prefix + str(err.full_key or err.key or "")
    if isinstance(err, ConfigKeyError):
        inner = str(err.full_key or err.key or "")
        parent = inner.rsplit(".", 1)[0] if "." in inner else ""
        valid = ", ".join(_valid_keys(schema, parent)) or "(none)"
        place = what or (f"under {prefix}{parent}" if parent or prefix else "at the top level")
        return f"{key} is not a config key {place}; valid keys: {valid}."
    if isinstance(err, MissingMandatoryValue):
        return f"{key} has no value: set {key}=<value> (or add it to its YAML file)."
    message = (err.msg or str(err)).splitlines()[0]
    return f"{key}: {message}."


def _valid_keys(schema: type, path: str) -> list[str]:
    """The field names of the (nested) schema at a dotted `path`."""
    node: Any = schema
    for part in filter(None, path.split(".")):
        node = get_type_hints(node).get(part)
        if not is_dataclass(node):
            return []
    return sorted(f.name for f in fields(node))


PRECISIONS = (
    "64-true",
    "32-true",
    "16-mixed",
    "bf16-mixed",
    "16-true",
    "bf16-true",
    "transformer-engine",
    "transformer-engine-float16",
    "64",
    "32",
    "16",
    "bf16",
)


def check_trainer(trainer: dict[str, Any]) -> None:
    """Trainer keys must be `pytorch_lightning.Trainer` arguments; the ones that change results are range-checked."""
    import inspect

    import pytorch_lightning as pl

    valid = set(inspect.signature(pl.Trainer.__init__).parameters) - {"self", "callbacks", "logger"}
    for key in trainer:
        if key not in valid:
            raise ConfigError(
                f"trainer.{key} is not an argument of pytorch_lightning.Trainer; valid keys include "
                "accelerator, devices, precision, max_epochs, gradient_clip_val, accumulate_grad_batches, "
                "limit_train_batches, limit_val_batches."
            )
    if trainer.get("fast_dev_run"):
        raise ConfigError(
            "trainer.fast_dev_run skips the checkpoints and files a run leaves; use debug=fast (a few "
            "batches, one epoch, its own cache) or debug=overfit instead."
        )
    if trainer.get("max_steps", -1) not in (-1, None):
        raise ConfigError(
            f"trainer.max_steps={trainer['max_steps']}: kdexp trains and resumes by whole epochs; set "
            "trainer.max_epochs (and data.max_train_samples for a shorter epoch)."
        )
    if trainer.get("enable_checkpointing") is False:
        raise ConfigError(
            "trainer.enable_checkpointing=false: a run keeps its best epoch and resumes from checkpoints; "
            "leave it on (keep_checkpoints=false removes them when the run is finished)."
        )
    epochs = trainer.get("max_epochs")
    require(
        isinstance(epochs, int) and not isinstance(epochs, bool) and epochs >= 1,
        "trainer.max_epochs",
        epochs,
        "a whole number of epochs, at least 1",
    )
    precision = trainer.get("precision", "32-true")
    require(str(precision) in PRECISIONS, "trainer.precision", precision, "one of " + ", ".join(PRECISIONS[:6]))
    clip = trainer.get("gradient_clip_val")
    require(
        clip is None or (isinstance(clip, (int, float)) and clip >= 0),
        "trainer.gradient_clip_val",
        clip,
        "0 or more, or null",
    )
    accumulate = trainer.get("accumulate_grad_batches", 1)
    require(isinstance(accumulate, int) and accumulate >= 1, "trainer.accumulate_grad_batches", accumulate, "1 or more")
    for key in ("limit_train_batches", "limit_val_batches"):
        value = trainer.get(key)
        require(
            value is None or (isinstance(value, (int, float)) and value > 0),
            f"trainer.{key}",
            value,
            "a positive number of batches or a fraction in (0, 1]",
        )


def validate_config(cfg: Any) -> RunSchema:
    """Check every group of a composed run config before any work; returns it typed (method and trainer as dicts)."""
    validated = merged_onto(RunSchema, cfg)
    validated.check()
    trainer = config_dict(cfg.trainer) if OmegaConf.is_config(cfg.trainer) else dict(cfg.trainer)
    check_trainer(trainer)
    check_whole_dev_split(validated.task.name, trainer)
    return validated


def check_whole_dev_split(task_name: str, trainer: dict[str, Any]) -> None:
    """Extractive QA joins every window of an example before scoring it, so its dev split is read whole."""
    from kdexp.tasks import EXTRACTIVE_QA, MRC_TASKS

    task = MRC_TASKS.get(task_name)
    limit = trainer.get("limit_val_batches")
    whole = limit is None or (isinstance(limit, float) and limit == 1.0)
    require(
        task is None or task.family != EXTRACTIVE_QA or whole,
        "trainer.limit_val_batches",
        limit,
        "null or 1.0 with extractive QA, which scores an example from all its windows (data.max_eval_samples=N "
        "shortens the dev split by whole examples)",
    )
