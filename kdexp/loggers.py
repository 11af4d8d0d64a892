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
        from pytorch_lightning.loggers import CSVLogger

        return [CSVLogger(save_dir=str(run_dir), name="csv", version="")]
    if kind == "wandb":
        return [_wandb_logger(logger_cfg, run_dir, run_name, job_type, group, config)]
    raise ValueError(f"logger.type='{kind}' is unknown: use csv, wandb or none.")


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
