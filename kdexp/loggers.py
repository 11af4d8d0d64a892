"""Experiment loggers: Lightning's CSV logger, wandb (offline when no account or server), TensorBoard, or none.

TensorBoard (`logger=tensorboard`) writes event files into `<run>/tensorboard`: through Lightning's
TensorBoardLogger when the `tensorboard` (or `tensorboardX`) package is installed, else through
`scalar_event_logger` below, which writes the same scalar events itself (TFRecord framing, the
`Event`/`Summary` protobuf messages encoded by hand), so the option needs no extra package.
"""

from __future__ import annotations

import logging
import netrc
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, cast

from kdexp.cache import atomic_write_text
from kdexp.hardware import is_global_zero

log = logging.getLogger(__name__)

WandbMode = Literal["online", "offline", "disabled", "shared"]  # the modes wandb.init takes


def wandb_mode(requested: str) -> WandbMode:
    """`auto` means online only when an API key is configured; otherwise offline (sync later)."""
    if requested != "auto":
        return cast(WandbMode, requested)  # logger.mode is checked against these (kdexp.config)
    if os.environ.get("WANDB_MODE"):
        return cast(WandbMode, os.environ["WANDB_MODE"])  # passed on as set, for wandb to judge
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("//")[-1].split("/")[0]
        if netrc.netrc().authenticators(host):
            return "online"
    except (FileNotFoundError, netrc.NetrcParseError):
        pass
    return "offline"


WANDB_ID_FILE = "wandb_id"


def build_loggers(
    logger_cfg: Any,
    run_dir: Path,
    run_name: str,
    job_type: str,
    group: str | None,
    config: dict[str, Any],
    tags: list[str] | None = None,
) -> list[Any]:
    """The run's loggers. `group`: the experiment or the sweep (`logger.group` overrides it);
    `tags`: what the run is (task, method, experiment), added to `logger.tags`."""
    kind = logger_cfg.type
    if kind == "none":
        return []
    if kind == "csv":
        return [_resumable_csv_logger(run_dir)]
    if kind == "wandb":
        return [_wandb_logger(logger_cfg, run_dir, run_name, job_type, group, config, tags or [])]
    if kind == "tensorboard":
        return [tensorboard_logger(run_dir)]
    raise ValueError(f"logger.type='{kind}' is unknown: use csv, wandb, tensorboard or none.")


def _wandb_run_id(run_dir: Path) -> str:
    """The run folder's wandb id, made once and kept in `<run>/wandb_id`: a resumed run continues it."""
    path = run_dir / WANDB_ID_FILE
    if path.exists():
        return path.read_text().strip()
    run_id = secrets.token_hex(4)  # os.urandom: draws nothing from the seeded generators
    if is_global_zero():  # other DDP processes start no wandb run (Lightning's rank-zero experiment)
        run_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(run_id + "\n")
    return run_id


def _resumable_csv_logger(run_dir: Path) -> Any:
    """Lightning's CSV step log (`<run>/csv/metrics.csv`), kept whole across a resume.

    Lightning's writer deletes an existing file when it starts; this one keeps it, and
    `truncate_to(epoch, step)` (called by `kdexp.training.fit` before training resumes from the
    checkpoint taken as `epoch` started, at `step`) drops only the rows that will be logged again:
    those of later epochs, and rows without an epoch (the learning rate) from `step` on.
    """
    import csv
    import io

    from pytorch_lightning.loggers import CSVLogger
    from pytorch_lightning.loggers.csv_logs import ExperimentWriter
    from pytorch_lightning.loggers.logger import rank_zero_experiment

    def logged_again(row: dict[str, str], epoch: int, step: int) -> bool:
        if row.get("epoch") not in (None, ""):
            return int(float(row["epoch"])) >= epoch
        return row.get("step") in (None, "") or int(float(row["step"])) >= step

    class KeepingWriter(ExperimentWriter):
        def __init__(self, log_dir: str) -> None:
            super().__init__(log_dir)
            if os.path.isfile(self.metrics_file_path):  # later rows must keep the existing columns
                with open(self.metrics_file_path, newline="") as f:
                    self.metrics_keys = sorted(next(csv.reader(f), []))

        def _check_log_dir_exists(self) -> None:
            pass

        def truncate_to(self, epoch: int, step: int) -> None:
            path = Path(self.metrics_file_path)
            if not path.exists():
                return
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                fields = list(reader.fieldnames or [])
                rows = [row for row in reader if not logged_again(row, epoch, step)]
            if not rows:
                path.unlink()
                self.metrics_keys = []
                return
            out = io.StringIO(newline="")
            writer = csv.DictWriter(out, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
            atomic_write_text(path, out.getvalue())
            self.metrics_keys = sorted(fields)

    class ResumableCSVLogger(CSVLogger):
        @property
        @rank_zero_experiment
        def experiment(self) -> Any:
            if self._experiment is None:
                os.makedirs(self.root_dir, exist_ok=True)
                self._experiment = KeepingWriter(log_dir=self.log_dir)
            return self._experiment

        def truncate_to(self, epoch: int, step: int) -> None:
            self.experiment.truncate_to(epoch, step)

    return ResumableCSVLogger(save_dir=str(run_dir), name="csv", version="")


def _wandb_logger(
    logger_cfg: Any,
    run_dir: Path,
    run_name: str,
    job_type: str,
    group: str | None,
    config: dict[str, Any],
    tags: list[str],
) -> Any:
    import wandb
    from pytorch_lightning.loggers import WandbLogger

    run_id = _wandb_run_id(run_dir)

    def make(mode: str) -> WandbLogger:
        logger = WandbLogger(
            project=logger_cfg.project,
            entity=logger_cfg.get("entity"),
            group=logger_cfg.get("group") or group,
            job_type=job_type,
            tags=list(dict.fromkeys([*(logger_cfg.get("tags") or []), *tags])),
            name=run_name,
            id=run_id,
            resume="allow",
            save_dir=str(run_dir),
            mode=mode,
            config=config,
            reinit="finish_previous",
            settings=wandb.Settings(init_timeout=float(logger_cfg.get("init_timeout", 60)), silent=True),
        )
        _ = logger.experiment  # start the run now, so that a failure shows here and not mid-training
        return logger

    mode = wandb_mode(logger_cfg.get("mode", "auto"))
    try:
        return make(mode)
    except Exception as err:
        if mode == "offline":
            raise
        log.warning(
            "wandb could not start online (%s); logging offline: `wandb sync %s/wandb` uploads it.", err, run_dir
        )
        return make("offline")


# --------------------------------------------------------------------------- TensorBoard

TENSORBOARD_DIR = "tensorboard"


def tensorboard_logger(run_dir: Path) -> Any:
    """TensorBoard event files in `<run>/tensorboard`: Lightning's TensorBoardLogger when `tensorboard` or
    `tensorboardX` is installed, else `scalar_event_logger` (the same scalars, written without either).

    A resumed run adds an event file beside the first one, so steps logged after the checkpoint and before
    the kill may appear twice; `<run>/metrics.csv` (one row per epoch) stays the exact record."""
    import importlib.util

    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        from pytorch_lightning.loggers import TensorBoardLogger

        return TensorBoardLogger(save_dir=str(run_dir), name=TENSORBOARD_DIR, version="", default_hp_metric=False)
    return scalar_event_logger(run_dir / TENSORBOARD_DIR)


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        crc = n
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the checksum of TFRecord files."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
    """One TFRecord: length, its masked CRC, the data, the data's masked CRC (little endian)."""
    import struct

    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", _masked_crc(header)) + data + struct.pack("<I", _masked_crc(data))


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # an int64 below 0 as its two's complement
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | 0x80 if value else low)
        if not value:
            return bytes(out)


def _length_delimited(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def event_record(
    wall_time: float, step: int = 0, scalars: Mapping[str, float] | None = None, file_version: str | None = None
) -> bytes:
    """A TensorBoard `Event` (wall_time = 1, step = 2, file_version = 3, summary = 5) as one TFRecord; each
    scalar is a `Summary.Value` (tag = 1, simple_value = 2), as `SummaryWriter.add_scalar` writes it."""
    import struct

    event = b"\x09" + struct.pack("<d", wall_time)
    if step:
        event += b"\x10" + _varint(step)
    if file_version is not None:
        event += _length_delimited(3, file_version.encode())
    if scalars:
        values = b"".join(
            _length_delimited(1, _length_delimited(1, tag.encode()) + b"\x15" + struct.pack("<f", value))
            for tag, value in scalars.items()
        )
        event += _length_delimited(5, values)
    return tfrecord(event)


def scalar_event_logger(log_dir: Path) -> Any:
    """A Lightning logger writing TensorBoard scalar events (`events.out.tfevents.*`) into `log_dir` without
    the tensorboard package: one file per process, global rank 0 only, flushed at every checkpoint (`save`)
    and at the end. Every logged number is a scalar of its own tag (`train/loss`, `val/accuracy`)."""
    import socket
    import time

    from pytorch_lightning.loggers.logger import Logger

    class ScalarEventLogger(Logger):
        def __init__(self) -> None:
            super().__init__()
            self._file: Any = None
            self._path: Path | None = None  # reopened after `finalize` (Lightning finalizes before a last evaluation)

        @property
        def name(self) -> str:
            return TENSORBOARD_DIR

        @property
        def version(self) -> str:
            return ""

        @property
        def log_dir(self) -> str:
            return str(log_dir)

        @property
        def save_dir(self) -> str:
            return str(Path(log_dir).parent)

        def _events(self) -> Any:
            if self._file is None and self._path is not None:
                self._file = open(self._path, "ab")
            if self._file is None:
                Path(log_dir).mkdir(parents=True, exist_ok=True)
                now = time.time()
                name = f"events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(2)}"
                self._path = Path(log_dir) / name
                self._file = open(self._path, "ab")
                self._file.write(event_record(now, file_version="brain.Event:2"))
            return self._file

        def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
            """Nothing: the run's config is `<run>/config.yaml`."""

        def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
            if not is_global_zero():
                return
            scalars = {}
            for tag, value in metrics.items():
                try:
                    scalars[tag] = float(value)
                except (TypeError, ValueError):
                    continue
            if scalars:
                self._events().write(event_record(time.time(), int(step or 0), scalars))

        def save(self) -> None:
            if self._file is not None:
                self._file.flush()

        def finalize(self, status: str) -> None:
            if self._file is not None:
                self._file.close()
                self._file = None

    return ScalarEventLogger()


SUMMARY_FIELDS = (
    "task",
    "method",
    "seed",
    "main_metric",
    "metrics",
    "teacher_metrics",
    "teacher_key",
    "student_params",
    "teacher_params",
    "best_epoch",
    "epochs_trained",
    "resumed_from_epoch",
    "train_examples",
    "train_seconds",
    "train_examples_per_second",
    "wall_seconds",
    "config_hash",
)


def finish_loggers(
    loggers: list[Any], results: dict[str, Any] | None = None, failed: bool = False, log_model: bool = False
) -> None:
    """Close each logger; a wandb run gets the results.json fields in its summary (`best/...` for the
    best epoch's metrics, `teacher/...` for the teacher's, `majority/...` for the most frequent label's),
    and the student as a model artifact when `log_model`. One wandb run per multirun job."""
    for logger in loggers:
        if type(logger).__name__ != "WandbLogger":
            logger.finalize("failed" if failed else "success")
            continue
        import wandb

        if results is not None:
            summary = {
                key: results[key]
                for key in SUMMARY_FIELDS
                if key in results and key not in ("metrics", "teacher_metrics")
            }
            summary.update({f"best/{k}": v for k, v in results.get("metrics", {}).items()})
            summary.update({f"teacher/{k}": v for k, v in (results.get("teacher_metrics") or {}).items()})
            summary.update({f"majority/{k}": v for k, v in (results.get("majority_metrics") or {}).items()})
            logger.experiment.summary.update(summary)
            if log_model and results.get("student_dir"):
                artifact = wandb.Artifact(
                    f"student-{logger.experiment.id}",
                    type="model",
                    metadata={k: summary[k] for k in ("task", "method", "seed") if k in summary},
                )
                artifact.add_dir(results["student_dir"])
                logger.experiment.log_artifact(artifact)
        wandb.finish(exit_code=1 if failed else 0)
