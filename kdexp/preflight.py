"""`kdexp-check`: every method, a few optimisation steps, in each precision the hardware supports.

Run it on a new machine or cluster before a sweep. For each config in `conf/method` and each
precision (32-true and bf16-mixed everywhere; 16-mixed on a GPU), it builds the method as a run
does (every stage outside the Trainer included: teacher passes, DBKD queries and surrogate, MLM
adaptation and top-k store, the knowledge-selection agent), trains it for `--steps` optimiser
steps with the Lightning Trainer, and reports one row:

- `finite_loss`: every training loss was finite;
- `max_rel_diff_vs_fp32`: each loss term on one batch, the same weights, computed in the row's
  precision and in float32: the largest relative difference (null for 32-true), and the term;
- `steps_per_second`: optimiser steps per second during training;
- `peak_memory_mb`: the device's peak allocated memory (GPU), or the process's peak RSS (CPU);
- `device_ok`: every parameter and buffer of the student, the method's modules and the live
  teacher, and every tensor of every batch, was on the Trainer's device;
- `dev`: the dev metrics of one validation pass after the steps (the task's whole dev slice).

By default the models are tiny random encoders (`--family`, built offline) and the data is the
embedded SST-2 slice, so the check downloads nothing and takes minutes; Hydra overrides after the
options (`teacher=bert_base student.num_layers=6`) check the configured models instead.
`--task` checks another task's family on the first rows of its own data, read as a run reads it
(GLUE_DIR, MRC_DIR, `task.train_file`, or the Hub), with tiny models of that family's head and a
vocabulary of those rows; the methods a run would refuse on the task are listed, not checked.
`--family gpt2` makes the tiny teacher a decoder LM (multiple choice through its label words).
`--devices 2` runs the same under DDP with two processes (gloo on CPU, NCCL on GPUs);
`--out FILE` writes the rows as JSON.

    kdexp-check
    kdexp-check --devices 2 --out check.json
    kdexp-check --methods dbkd,internal_all --precisions bf16-mixed --family roberta
    kdexp-check --task dream --family gpt2 --devices 2
    kdexp-check --task squad_v2
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import resource
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

from kdexp.config import CONFIG_DIR

log = logging.getLogger(__name__)

EMBEDDED_GLUE = Path(__file__).resolve().parent / "resources" / "glue"
# Settings that keep every method's own stages to a few seconds; applied where the method has the key.
QUICK_METHOD_SETTINGS = {
    "queries.num_queries": 3,
    "surrogate_epochs": 1,
    "mlm.adapt.steps": 2,
    "mlm.adapt.batch_size": 8,
    "agent.episodes": 1,
    "agent.episode_phases": 2,
    "phase_steps": 2,
    "reward.rows": 8,
    "epochs_per_stage": 1,
    "kd_epochs": 1,
}
# Lengths the tiny models (TINY_POSITIONS positions) hold, by task family: an option sequence, a QA window.
TINY_POSITIONS = 160
FAMILY_LENGTHS = {
    "classification": ["data.max_length=64"],
    "multiple_choice": ["data.max_length=128"],
    "extractive_qa": ["data.max_length=128", "task.doc_stride=32"],
}
TINY_HEADS = {
    "classification": "classifier",
    "multiple_choice": "multiple_choice",
    "extractive_qa": "question_answering",
}
VOCABULARY_ROWS = 200  # the training rows whose words make a tiny model's vocabulary
RELATIVE_FLOOR = 1e-6
WORKDIR_ENV = "KDEXP_CHECK_DIR"  # |fp32 term| below this is compared as an absolute difference


@dataclass
class CheckRow:
    method: str
    precision: str
    devices: int
    finite_loss: bool
    max_rel_diff_vs_fp32: float | None
    worst_term: str | None
    steps_per_second: float
    peak_memory_mb: float
    device_ok: bool
    terms: dict[str, dict[str, float]] = field(default_factory=dict)  # term -> {"fp32": v, precision: v}
    dev: dict[str, float] = field(default_factory=dict)  # the dev metrics after the steps (val/accuracy, ...)
    error: str | None = None


def method_names() -> list[str]:
    return sorted(path.stem for path in (Path(CONFIG_DIR) / "method").glob("*.yaml"))


def supported_precisions(accelerator: str) -> list[str]:
    import torch

    if accelerator == "cpu":
        return ["32-true", "bf16-mixed"]
    precisions = ["32-true"]
    if torch.cuda.is_bf16_supported():
        precisions.append("bf16-mixed")
    return precisions + ["16-mixed"]


# --------------------------------------------------------------------------- the workspace


def task_overrides(task_name: str) -> list[str]:
    """The task and where its data comes from: SST-2 from the embedded slice; any other task as a run reads it."""
    from kdexp.tasks import MRC_TASKS, TASKS

    task = MRC_TASKS.get(task_name) or TASKS[task_name]
    embedded = ["data.source=local", f"data.glue_dir={EMBEDDED_GLUE}"] if task_name == "sst2" else []
    return [f"task={task_name}", *embedded, *FAMILY_LENGTHS[task.family]]


def training_texts(overrides: list[str], rows: int = VOCABULARY_ROWS) -> list[str]:
    """Every text of the first `rows` training rows of the task the overrides name (options included)."""
    from kdexp.data import DataSource, load_split
    from kdexp.run import compose_config, task_from_config

    cfg = compose_config(overrides)
    task = task_from_config(cfg.task)
    split = load_split(task, task.train_split, DataSource.from_data_config(cfg.data), rows)
    texts: list[str] = []
    for row in split:
        for value in row.values():
            values = value if isinstance(value, list) else [value]
            texts += [v for v in values if isinstance(v, str)]
    return texts


def tiny_teacher(folder: Path, family: str, overrides: list[str]) -> Path:
    """A tiny random model of `family` with the head of the overrides' task family (counted as fine-tuned),
    its tokenizer's words those of the task's first training rows; a decoder (gpt2) is a causal LM."""
    from kdexp.run import compose_config, task_from_config
    from kdexp.tiny_models import DECODERS, save_tiny_model, vocabulary_of

    task = task_from_config(compose_config(overrides).task)
    model_dir = folder / f"tiny-{family}-{task.name}"
    if not (model_dir / "config.json").exists():
        head = "causal_lm" if family in DECODERS else TINY_HEADS[task.family]
        vocabulary = vocabulary_of(training_texts(overrides), 1500)
        save_tiny_model(model_dir, family, vocabulary, num_labels=task.num_labels, head=head, max_length=TINY_POSITIONS)
    return model_dir


def model_overrides(teacher_dir: Path | None, family: str) -> list[str]:
    """The tiny teacher, fine-tuned as it is, and a student of its first 2 layers."""
    from kdexp.tiny_models import DECODERS

    if teacher_dir is None:
        return []
    return [
        *(["teacher=causal_lm"] if family in DECODERS else []),
        f"teacher.name_or_path={teacher_dir}",
        "teacher.finetuned=true",
        "student=first_layers",
        "student.num_layers=2",
    ]


def run_overrides(
    method: str,
    precision: str,
    accelerator: str,
    devices: int,
    workdir: Path,
    models: list[str],
    user: list[str],
    task: str = "sst2",
) -> list[str]:
    """The overrides of one check: a small slice of the data, the method's quick settings, the hardware."""
    from omegaconf import OmegaConf

    from kdexp.run import compose_config

    method_cfg = compose_config([f"method={method}"]).method
    quick = [
        f"method.{key}={value}"
        for key, value in QUICK_METHOD_SETTINGS.items()
        if OmegaConf.select(method_cfg, key) is not None
    ]
    strategy = ["++trainer.strategy=ddp_find_unused_parameters_true"] if devices > 1 else []  # as trainer=ddp
    return [
        f"method={method}",
        *task_overrides(task),
        "data.max_train_samples=48",
        "data.max_eval_samples=16",
        "data.batch_size=8",
        "data.eval_batch_size=16",
        f"cache_dir={workdir / 'cache'}",
        "logger=none",
        "trainer.max_epochs=20",
        f"trainer.accelerator={accelerator}",
        f"trainer.devices={devices}",
        f"trainer.precision={precision}",
        "trainer.enable_progress_bar=false",
        "teacher.epochs=1",
        *strategy,
        *models,
        *quick,
        *user,
    ]


# --------------------------------------------------------------------------- one check


def refusal(overrides: list[str]) -> str | None:
    """Why a run with these overrides would refuse its method on its task and models (as `kdexp-train` does,
    before any work), or None."""
    from kdexp.errors import ConfigError
    from kdexp.run import compose_config, resolve_method, task_from_config

    cfg = compose_config(overrides)
    method_cls, _ = resolve_method(cfg.method)
    try:
        method_cls.check_config(cfg, task_from_config(cfg.task))
    except ConfigError as err:
        return str(err).splitlines()[0]
    return None


def check_method(
    method: str,
    precision: str,
    accelerator: str,
    devices: int,
    steps: int,
    workdir: Path,
    models: list[str],
    user_overrides: list[str],
    task: str = "sst2",
) -> CheckRow:
    """Build `method` as a run does, compare its loss terms with float32, train it `steps` steps, validate."""
    from kdexp.hardware import Hardware
    from kdexp.run import build_context, build_module, compose_config, trainer_options

    overrides = run_overrides(method, precision, accelerator, devices, workdir, models, user_overrides, task)
    cfg = compose_config(overrides)
    hardware = Hardware.from_trainer(trainer_options(cfg))
    context, method_cls, options = build_context(cfg, workdir / "runs" / f"{task}-{method}-{precision}", hardware)
    module = build_module(context, method_cls, options)
    terms, worst, max_diff = loss_terms_against_fp32(module, context, hardware)
    losses, seconds, device_ok, dev = train_steps(module, context, trainer_options(cfg), steps)
    finite = bool(losses) and all(math.isfinite(loss) for loss in losses)
    return CheckRow(
        method,
        precision,
        devices,
        hardware.all_true(finite),
        max_diff,
        worst,
        len(losses) / seconds if seconds > 0 else 0.0,
        peak_memory_mb(hardware),
        hardware.all_true(device_ok),
        terms,
        dev,
    )


def first_batch(context: Any, module: Any) -> dict[str, Any]:
    """The first training batch as the Trainer would hand it over: padded, with the method's rows attached."""
    from kdexp.data import pad_batch

    train = context.data.train
    rows = [train[i] for i in range(min(len(train), int(context.cfg.data.batch_size)))]
    batch = pad_batch(rows, context.data.pad_token_id, context.task.is_regression)
    batch.update(module.batch_rows(batch))
    return batch


def loss_terms_against_fp32(
    module: Any, context: Any, hardware: Any
) -> tuple[dict[str, dict[str, float]], str | None, float | None]:
    """Each loss term on one batch in the run's precision, and the largest relative difference from float32
    (same weights, dropout off); no difference for 32-true."""
    import torch

    module = hardware.to_device(module)
    module.eval()
    batch = hardware.to_device(first_batch(context, module))
    with torch.no_grad():
        torch.manual_seed(0)
        reference = {k: float(v) for k, v in module.loss_terms(dict(batch)).items()}
        torch.manual_seed(0)
        with hardware.autocast():
            mixed = {k: float(v) for k, v in module.loss_terms(dict(batch)).items()}
    module.train()
    terms = {k: {"fp32": v, hardware.precision: mixed[k]} for k, v in reference.items()}
    if hardware.precision == "32-true":
        return terms, None, None
    differences = {k: abs(mixed[k] - v) / max(abs(v), RELATIVE_FLOOR) for k, v in reference.items()}
    worst = max(differences, key=lambda k: differences[k])
    return terms, worst, differences[worst]


def train_steps(
    module: Any, context: Any, trainer_cfg: dict[str, Any], steps: int
) -> tuple[list[float], float, bool, dict[str, float]]:
    """`steps` optimiser steps with the Lightning Trainer, then one pass over the dev slice: the losses, the
    seconds, whether every tensor was on the Trainer's device, the dev metrics."""
    from kdexp.training import GlueDataModule

    placement, recorder = DevicePlacement(), LossRecorder()
    options = {
        key: trainer_cfg[key] for key in ("accelerator", "devices", "strategy", "precision") if key in trainer_cfg
    }
    trainer = pl.Trainer(
        **options,
        max_steps=steps,
        limit_val_batches=0,  # the pass after training reads the whole dev slice (QA scores whole examples)
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=[placement, recorder],
        gradient_clip_val=trainer_cfg.get("gradient_clip_val"),
    )
    datamodule = GlueDataModule(
        context.data, int(context.cfg.data.batch_size), int(context.cfg.data.eval_batch_size), int(context.cfg.seed), 0
    )
    trainer.fit(module, datamodule=datamodule)
    trainer.limit_val_batches = 1.0
    dev = {
        key: float(value) for key, value in trainer.validate(module, datamodule=datamodule, verbose=False)[0].items()
    }
    return recorder.losses, recorder.seconds, placement.ok, dev


def peak_memory_mb(hardware: Any) -> float:
    import torch

    if hardware.device.type == "cuda":
        return torch.cuda.max_memory_allocated(hardware.device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


# --------------------------------------------------------------------------- callbacks


class DevicePlacement(pl.Callback):
    """Records whether every parameter, buffer (student, method modules, live teacher and MLM) and every
    batch tensor is on the Trainer's device at each training batch."""

    def __init__(self) -> None:
        self.ok = True
        self.misplaced: list[str] = []

    def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
        device = trainer.strategy.root_device
        tensors = [(f"batch.{k}", v) for k, v in batch.items() if hasattr(v, "device")]
        for owner, model in _models_of(module):
            tensors += [(f"{owner}.{n}", t) for n, t in model.named_parameters()]
            tensors += [(f"{owner}.{n}", t) for n, t in model.named_buffers()]
        wrong = [name for name, tensor in tensors if tensor.device != device]
        if wrong:
            self.ok = False
            self.misplaced = wrong[:5]


def _models_of(module: Any) -> list[tuple[str, Any]]:
    models = [("module", module)]
    teacher = getattr(module, "teacher", None)
    if teacher is not None and getattr(teacher, "model", None) is not None:
        models.append(("teacher", teacher.model))
    for mlm in getattr(module, "_mlm", []):
        models.append(("mlm", mlm))
    return models


class LossRecorder(pl.Callback):
    """The training loss of every batch, and the seconds spent in training batches."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.seconds = 0.0
        self._started = 0.0

    def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.seconds += time.perf_counter() - self._started
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None:
            self.losses.append(float(loss.detach()))


# --------------------------------------------------------------------------- the table


def format_table(rows: list[CheckRow], hardware_name: str, task: str = "sst2", main_metric: str = "accuracy") -> str:
    header = (
        "method",
        "precision",
        "devices",
        "finite loss",
        "max rel. diff vs fp32 (term)",
        "steps/s",
        "peak MB",
        "device ok",
        f"dev {main_metric}",
    )
    lines = [
        f"kdexp-check on {hardware_name}" + ("" if task == "sst2" else f", task {task}"),
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    for row in rows:
        if row.error is not None:
            lines.append(f"| {row.method} | {row.precision} | {row.devices} | ERROR: {row.error} | | | | | |")
            continue
        diff = "–" if row.max_rel_diff_vs_fp32 is None else f"{row.max_rel_diff_vs_fp32:.2e} ({row.worst_term})"
        dev = row.dev.get(f"val/{main_metric}")
        lines.append(
            f"| {row.method} | {row.precision} | {row.devices} | {'yes' if row.finite_loss else 'NO'} | "
            f"{diff} | {row.steps_per_second:.2f} | {row.peak_memory_mb:.0f} | "
            f"{'yes' if row.device_ok else 'NO'} | {'–' if dev is None else f'{dev:.3f}'} |"
        )
    return "\n".join(lines)


def hardware_name(accelerator: str) -> str:
    import platform

    import torch

    if accelerator != "cpu" and torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), torch {torch.__version__}"


def quiet_libraries() -> None:
    """Only the table and real problems: no progress bars, tips or per-Trainer notices."""
    from transformers.utils import logging as transformers_logging

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    for name in ("pytorch_lightning", "lightning_fabric", "lightning.pytorch", "kdexp"):
        logging.getLogger(name).setLevel(logging.WARNING)
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    import datasets

    datasets.disable_progress_bars()
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="kdexp-check", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", default=None, help="comma-separated method configs (default: all of conf/method)")
    parser.add_argument("--precisions", default=None, help="comma-separated (default: all the device supports)")
    parser.add_argument("--devices", type=int, default=1, help="processes (DDP when 2 or more)")
    parser.add_argument("--accelerator", default=None, help="cpu or gpu (default: gpu when one is visible)")
    parser.add_argument(
        "--family", default="bert", help="tiny random models of bert, roberta, electra, distilbert, or gpt2 (MC)"
    )
    parser.add_argument("--task", default="sst2", help="a GLUE or MRC task (default: the embedded SST-2 slice)")
    parser.add_argument("--steps", type=int, default=4, help="optimiser steps per method and precision")
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    parser.add_argument("--workdir", type=Path, default=None, help="models, cache and runs (default: a temp folder)")
    parser.add_argument(
        "overrides", nargs="*", help="Hydra overrides: check the configured models instead of tiny ones"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from kdexp.errors import KdexpError
    from kdexp.hardware import Hardware, HardwareSpec
    from kdexp.tasks import MRC_TASKS, MULTIPLE_CHOICE, TASKS
    from kdexp.tiny_models import DECODERS, FAMILIES

    quiet_libraries()
    accelerator = args.accelerator or ("gpu" if torch.cuda.is_available() else "cpu")
    named_methods = args.methods is not None
    methods = args.methods.split(",") if args.methods else method_names()
    unknown = sorted(set(methods) - set(method_names()))
    precisions = args.precisions.split(",") if args.precisions else supported_precisions(accelerator)
    task = MRC_TASKS.get(args.task) or TASKS.get(args.task)
    if unknown or args.family not in FAMILIES + DECODERS or task is None:
        print(
            f"kdexp-check: unknown method(s) {', '.join(unknown) or '-'}, family {args.family} or task {args.task}; "
            f"methods: {', '.join(method_names())}; families: {', '.join(FAMILIES + DECODERS)}; "
            f"tasks: {', '.join([*TASKS, *MRC_TASKS])}",
            file=sys.stderr,
        )
        return 2
    if args.family in DECODERS and task.family != MULTIPLE_CHOICE:
        print(
            f"kdexp-check: --family {args.family} (a decoder LM) answers multiple choice only: use "
            f"--task dream or race, or an encoder family for {args.task}.",
            file=sys.stderr,
        )
        return 2
    # Set before the launch: the DDP processes it starts inherit it and share one cache and models. A
    # --workdir always wins (a second check in one process must not read the first one's cache).
    if args.workdir is not None:
        os.environ[WORKDIR_ENV] = str(args.workdir)
    os.environ.setdefault(WORKDIR_ENV, tempfile.mkdtemp(prefix="kdexp-check-"))
    workdir = Path(os.environ[WORKDIR_ENV])
    user_models = any(o.split("=")[0].startswith(("teacher", "student")) for o in args.overrides)
    data = [*task_overrides(args.task), *args.overrides]
    try:  # before the launch: the DDP processes it starts find the models whole
        models = [] if user_models else model_overrides(tiny_teacher(workdir, args.family, data), args.family)
    except KdexpError as err:  # the task's data cannot be read: one line, as a run says it
        print(f"kdexp-check: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    launcher = Hardware(
        HardwareSpec(accelerator=accelerator, devices=args.devices, strategy="ddp" if args.devices > 1 else "auto")
    )
    launcher.launch()  # the DDP processes exist from here on; every check's Trainer joins them
    refused: dict[str, str] = {}
    rows = []
    for method in methods:
        reason = refusal(
            run_overrides(method, precisions[0], accelerator, args.devices, workdir, models, args.overrides, args.task)
        )
        if reason is not None and not named_methods:  # a run refuses it on this task: nothing to check
            refused[method] = reason
            continue
        for precision in precisions:
            try:
                rows.append(
                    check_method(
                        method,
                        precision,
                        accelerator,
                        args.devices,
                        args.steps,
                        workdir,
                        models,
                        list(args.overrides),
                        args.task,
                    )
                )
            except (KdexpError, RuntimeError, ValueError, TypeError) as err:
                rows.append(
                    CheckRow(
                        method,
                        precision,
                        args.devices,
                        False,
                        None,
                        None,
                        0.0,
                        0.0,
                        False,
                        error=f"{type(err).__name__}: {str(err).splitlines()[0][:200]}",
                    )
                )
    if not launcher.is_global_zero:
        return 0
    print(format_table(rows, hardware_name(accelerator), args.task, task.main_metric))
    if refused:
        print(f"\nNot checked: {', '.join(refused)} (kdexp-train refuses them here; --methods names one to see why).")
    if args.out is not None:
        args.out.write_text(json.dumps([asdict(row) for row in rows], indent=2) + "\n")
    failed = [row for row in rows if row.error or not row.finite_loss or not row.device_ok]
    return 1 if failed or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
