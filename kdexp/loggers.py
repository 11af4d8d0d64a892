"""Experiment loggers: Lightning's CSV logger, wandb (offline when no account or server), or none."""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path
from typing import Any

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


def build_loggers(logger_cfg: Any, run_dir: Path, run_name: str, job_type: str, group: str | None,
                  config: dict[str, Any]) -> list[Any]:
    kind = logger_cfg.type
    if kind == "none":
        return []
    if kind == "csv":
        return [_resumable_csv_logger(run_dir)]
    if kind == "wandb":
        return [_wandb_logger(logger_cfg, run_dir, run_name, job_type, group, config)]
    raise ValueError(f"logger.type='{kind}' is unknown: use csv, wandb or none.")


def _resumable_csv_logger(run_dir: Path) -> Any:
    """Lightning's CSV step log (`<run>/csv/metrics.csv`), kept whole across a resume.

    Lightning's writer deletes an existing file when it starts; this one keeps it, and
    `truncate_to_epoch(k)` (called by the trainer's `ResumePoint` when training starts from
    the checkpoint of epoch k) drops only the rows of epochs that will run again.
    """
    import csv

    from pytorch_lightning.loggers import CSVLogger
    from pytorch_lightning.loggers.csv_logs import ExperimentWriter
    from pytorch_lightning.loggers.logger import rank_zero_experiment

    class KeepingWriter(ExperimentWriter):
        def _check_log_dir_exists(self) -> None:
            pass

        def truncate_to_epoch(self, epoch: int) -> None:
            path = Path(self.metrics_file_path)
            if not path.exists():
                return
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                fields = list(reader.fieldnames or [])
                rows = [row for row in reader if row.get("epoch") not in (None, "") and int(float(row["epoch"])) < epoch]
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

        def truncate_to_epoch(self, epoch: int) -> None:
            self.experiment.truncate_to_epoch(epoch)

    return ResumableCSVLogger(save_dir=str(run_dir), name="csv", version="")


def _wandb_logger(logger_cfg: Any, run_dir: Path, run_name: str, job_type: str, group: str | None,
                  config: dict[str, Any]) -> Any:
    import wandb
    from pytorch_lightning.loggers import WandbLogger

    def make(mode: str) -> WandbLogger:
        logger = WandbLogger(
            project=logger_cfg.project,
            entity=logger_cfg.get("entity"),
            group=logger_cfg.get("group") or group,
            job_type=job_type,
            tags=list(logger_cfg.get("tags") or []),
            name=run_name,
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


def finish_loggers(loggers: list[Any], summary: dict[str, Any], failed: bool = False) -> None:
    """Write the final metrics to each logger and close wandb runs (one run per multirun job)."""
    for logger in loggers:
        if type(logger).__name__ == "WandbLogger":
            import wandb

            logger.experiment.summary.update(summary)
            wandb.finish(exit_code=1 if failed else 0)
        else:
            logger.finalize("failed" if failed else "success")
