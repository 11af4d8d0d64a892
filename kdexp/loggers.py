"""Experiment loggers: Lightning's CSV logger, wandb (offline when no account or server), or none."""

from __future__ import annotations

import logging
import netrc
import os
import secrets
from pathlib import Path
from typing import Any

from kdexp.hardware import is_global_zero

log = logging.getLogger(__name__)


def wandb_mode(requested: str) -> str:
    """`auto` means online only when an API key is configured; otherwise offline (sync later)."""
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
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


def build_loggers(logger_cfg: Any, run_dir: Path, run_name: str, job_type: str, group: str | None,
                  config: dict[str, Any], tags: list[str] | None = None) -> list[Any]:
    """The run's loggers. `group`: the experiment or the sweep (`logger.group` overrides it);
    `tags`: what the run is (task, method, experiment), added to `logger.tags`."""
    kind = logger_cfg.type
    if kind == "none":
        return []
    if kind == "csv":
        return [_resumable_csv_logger(run_dir)]
    if kind == "wandb":
        return [_wandb_logger(logger_cfg, run_dir, run_name, job_type, group, config, tags or [])]
    raise ValueError(f"logger.type='{kind}' is unknown: use csv, wandb or none.")


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
            with open(path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=fields)
                writer.writeheader()
                writer.writerows(rows)
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


def _wandb_logger(logger_cfg: Any, run_dir: Path, run_name: str, job_type: str, group: str | None,
                  config: dict[str, Any], tags: list[str]) -> Any:
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
        logger.experiment  # start the run now, so that a failure shows here and not mid-training
        return logger

    mode = wandb_mode(logger_cfg.get("mode", "auto"))
    try:
        return make(mode)
    except Exception as err:
        if mode == "offline":
            raise
        log.warning("wandb could not start online (%s); logging offline: `wandb sync %s/wandb` uploads it.", err, run_dir)
        return make("offline")


SUMMARY_FIELDS = ("task", "method", "seed", "main_metric", "metrics", "teacher_metrics", "teacher_key", "student_params",
                  "teacher_params", "best_epoch", "epochs_trained", "resumed_from_epoch", "train_examples",
                  "train_seconds", "train_examples_per_second", "wall_seconds", "config_hash")


def finish_loggers(loggers: list[Any], results: dict[str, Any] | None = None, failed: bool = False,
                   log_model: bool = False) -> None:
    """Close each logger; a wandb run gets the results.json fields in its summary (`best/...` for the
    best epoch's metrics, `teacher/...` for the teacher's), and the student as a model artifact when
    `log_model`. One wandb run per multirun job."""
    for logger in loggers:
        if type(logger).__name__ != "WandbLogger":
            logger.finalize("failed" if failed else "success")
            continue
        import wandb

        if results is not None:
            summary = {key: results[key] for key in SUMMARY_FIELDS if key in results and key not in ("metrics", "teacher_metrics")}
            summary.update({f"best/{k}": v for k, v in results.get("metrics", {}).items()})
            summary.update({f"teacher/{k}": v for k, v in (results.get("teacher_metrics") or {}).items()})
            logger.experiment.summary.update(summary)
            if log_model and results.get("student_dir"):
                artifact = wandb.Artifact(f"student-{logger.experiment.id}", type="model",
                                          metadata={k: summary[k] for k in ("task", "method", "seed") if k in summary})
                artifact.add_dir(results["student_dir"])
                logger.experiment.log_artifact(artifact)
        wandb.finish(exit_code=1 if failed else 0)
