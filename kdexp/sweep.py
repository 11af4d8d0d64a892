"""Sweeps (`kdexp-train -m`): one owner per sweep folder, every job checked before the first starts,
and a failed job recorded while the others go on.

`SweepGuard` is a Hydra callback that `kdexp-train` adds to every launch
(`hydra.callbacks.kdexp_sweep`). Callbacks run in the launching process whatever the launcher
(basic, joblib, submitit), so it works with all of them:

- `on_multirun_start`, before any job: holds the sweep folder (`hydra.sweep.dir`, lock file
  `.kdexp-sweep.lock`; a second sweep launched into it stops in one line naming the first), then
  composes every job's config and runs on it the checks a single run makes before any work
  (`kdexp.run.check_run`: config values, method options, the models' config.json). A bad value in
  any job stops the whole sweep in one line naming the job (its overrides) and the key. This needs
  the job list before the sweep starts, which only Hydra's BasicSweeper (the default) gives; a
  sweeper that samples values as it goes (Optuna) is not pre-checked: each job checks its values
  when it starts, and a bad sampled value fails that trial, recorded as below.
- each job (`kdexp.train.run_sweep_job`): an exception is recorded in the job's folder as
  `failed.json` (the one-line error and the traceback's last frame) and the job returns None
  instead of raising. Hydra's BasicLauncher and joblib launcher already catch a job's exception
  (`hydra.core.utils.run_job` marks it FAILED), but the BasicSweeper then re-raises the first one
  once the batch is over, which ends the sweep with a traceback and skips later batches; returning
  lets every batch run, and Optuna marks a trial with no float value as failed and goes on.
- `on_multirun_end`: prints the failed jobs (folder, one-line error) and exits with status 1.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import sys
import traceback
from datetime import datetime
from pathlib import Path
from typing import Any

from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from omegaconf.errors import OmegaConfBaseException

from kdexp.errors import ConfigError, KdexpError
from kdexp.run_folder import FAILED_FILE, claim_folder, folder_holder, release_folder

log = logging.getLogger(__name__)


def refuse_ddp_in_a_sweep(cfg: DictConfig, mode: RunMode | None) -> None:
    """Lightning's DDP re-launches the script once per extra process: under -m it would re-run the sweep."""
    devices = cfg.trainer.get("devices", "auto")
    if mode == RunMode.MULTIRUN and devices != 1:
        raise ConfigError(
            f"trainer.devices={devices} under -m: several devices mean DDP, which re-launches the script "
            "per device and would re-run the whole sweep. Launch DDP runs one at a time (without -m), "
            "or sweep with trainer.devices=1 per job (trainer=gpu) through hydra/launcher=joblib or slurm."
        )


SWEEP_LOCK_FILE = ".kdexp-sweep.lock"
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


class SweepGuard(Callback):
    """The Hydra callback of a kdexp sweep (see the module docstring). Holds no state: the launchers
    copy callbacks into their job processes."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        folder = sweep_folder(config)
        try:
            claim_sweep_folder(folder)
        except KdexpError as err:
            _stop(f"kdexp-train: error: {err}", status=2)
        try:
            check_jobs(config)
        except KdexpError as err:
            _let_go(folder)
            _stop(f"kdexp-train: error: {err}", status=2)
        except Exception:  # a bug, not a bad value: Hydra would turn it into a warning and sweep on
            traceback.print_exc()
            _let_go(folder)
            _stop("kdexp-train: error: the checks of the sweep's jobs failed (traceback above).", status=2)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        folder = sweep_folder(config)
        failures = failed_jobs(folder, folder_holder(folder, SWEEP_LOCK_FILE))
        release_folder(folder, SWEEP_LOCK_FILE)
        if str(OmegaConf.select(config, "logger.type")) == "wandb":
            log_sweep_summary(folder, config)
        if failures:
            lines = [f"  {job_dir}: {record.get('error')}" for job_dir, record in failures]
            _stop(
                f"kdexp-train: {len(failures)} job(s) of the sweep failed (each folder has {FAILED_FILE}; launch "
                "the same sweep again to run them again: with resume=true its finished jobs are not trained "
                "again):\n" + "\n".join(lines),
                status=1,
            )


SUMMARY_COLUMNS = (
    "row",
    "column",
    "task",
    "metric",
    "n",
    "mean",
    "std",
    "ci_low",
    "ci_high",
    "diff",
    "diff_ci_low",
    "diff_ci_high",
    "p_permutation",
    "p_t",
    "n_pairs",
    "significant",
)


def summary_baseline(records: list[dict[str, Any]]) -> str | None:
    """The row a sweep's summary compares every other with: vanilla_kd, else finetune, when the sweep ran it."""
    rows = {record["row"] for record in records}
    return next((name for name in ("vanilla_kd", "finetune") if name in rows), None)


def summary_rows(records: list[dict[str, Any]]) -> list[list[Any]]:
    """The report's cells, one row each (`kdexp.report.table_records`), in `SUMMARY_COLUMNS` order."""
    return [
        [record["row"], column, *(stats.get(name) for name in SUMMARY_COLUMNS[2:])]
        for record in records
        for column, stats in record["cells"].items()
    ]


def log_sweep_summary(folder: Path, config: DictConfig) -> None:
    """A wandb run of the sweep's group holding the report's figures: every cell's n, mean, std and 95% CI, and
    each method's paired difference from vanilla_kd (else finetune) with its CI and tests, as `kdexp-report
    --baseline` prints them. A problem here is logged, never raised: the sweep's results are on disk."""
    try:
        from kdexp.report import find_runs, load_results, table_records

        results = list(load_results(find_runs(folder).results).values())
        if not results:
            return
        plain = table_records(results)
        baseline = summary_baseline(plain)
        records = table_records(results, baseline=baseline) if baseline else plain
        _write_wandb_summary(folder, config, records, baseline)
    except Exception as err:  # noqa: BLE001 - the summary is a convenience; the report reads the files
        log.warning(
            "The sweep's wandb summary was not written (%s); kdexp-report %s gives the same table.", err, folder
        )


def _write_wandb_summary(folder: Path, config: DictConfig, records: list[dict[str, Any]], baseline: str | None) -> None:
    import wandb

    from kdexp.loggers import wandb_mode

    logger = config.logger
    group = logger.get("group") or "/".join(folder.parts[-2:])
    run = wandb.init(
        project=logger.get("project"),
        entity=logger.get("entity"),
        group=group,
        job_type="sweep-summary",
        name=f"summary {group}",
        dir=str(folder),
        mode=wandb_mode(logger.get("mode", "auto")),
        config={"sweep_dir": str(folder), "baseline": baseline},
        reinit="finish_previous",
    )
    rows = summary_rows(records)
    run.log({"report": wandb.Table(columns=list(SUMMARY_COLUMNS), data=rows)})
    for row in rows:
        stats = dict(zip(SUMMARY_COLUMNS, row))
        for name in ("n", "mean", "std", "ci_low", "ci_high", "diff", "diff_ci_low", "diff_ci_high", "p_permutation"):
            if stats[name] is not None:
                run.summary[f"{stats['row']}/{stats['column']}/{name}"] = stats[name]
    run.finish()


def _let_go(folder: Path) -> None:
    """Release a sweep folder no job ran in (and remove it if this launch left it empty)."""
    release_folder(folder, SWEEP_LOCK_FILE)
    try:
        folder.rmdir()
    except OSError:
        pass


def _stop(message: str, status: int) -> None:
    if status == 2 and os.environ.get("HYDRA_FULL_ERROR") == "1" and sys.exc_info()[0] is not None:
        traceback.print_exc()
    print(message, file=sys.stderr, flush=True)
    sys.exit(status)  # SystemExit passes through Hydra's callback runner, which turns exceptions into warnings


def sweep_folder(config: DictConfig) -> Path:
    """The sweep's folder (`hydra.sweep.dir`), absolute against the launch's working directory."""
    folder = Path(str(config.hydra.sweep.dir))
    if folder.is_absolute():
        return folder
    cwd = OmegaConf.select(config, "hydra.runtime.cwd") or os.getcwd()
    return Path(cwd) / folder


def claim_sweep_folder(folder: Path) -> None:
    """Hold the sweep folder for this sweep; a `ConfigError` names the live sweep that holds it."""
    claim_folder(
        folder,
        SWEEP_LOCK_FILE,
        "wait for that sweep to end (a re-launch then runs only its unfinished "
        "jobs), stop it, or launch in another folder (hydra.sweep.dir=<another folder>).",
    )


# --------------------------------------------------------------------------- checks before the first job


def sweep_jobs(config: DictConfig) -> list[list[str]] | None:
    """Every job's overrides, in launch order, as the BasicSweeper expands them; None for a sweeper
    that chooses the values as it goes."""
    if OmegaConf.select(config, "hydra.sweeper._target_") != BASIC_SWEEPER:
        return None
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    arguments = [f"{key}={value}" for key, value in params.items()] + list(config.hydra.overrides.task)
    parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
    [jobs] = BasicSweeper.split_arguments(parser.parse_overrides(arguments), max_batch_size=None)
    return jobs


def check_jobs(config: DictConfig) -> int | None:
    """Run a single run's checks on every job of the sweep, before the first starts; the number of jobs
    checked, or None where the sweeper chooses values as it goes (Optuna: each job checks its own)."""
    jobs = sweep_jobs(config)
    if jobs is None:
        sweeper = OmegaConf.select(config, "hydra.sweeper._target_")
        log.info("Sweeper %s chooses its values as it goes: each job checks its config when it starts.", sweeper)
        return None
    loader = GlobalHydra.instance().config_loader()
    launching = HydraConfig.instance().cfg
    try:
        for num, overrides in enumerate(jobs):
            _check_job(loader, config, overrides, num, job_name(num, overrides, jobs))
    finally:
        HydraConfig.instance().cfg = launching
    log.info("Checked the configs of the sweep's %d job(s).", len(jobs))
    return len(jobs)


def stopped_sweep_line(job_num: int, sweep_dir: Path) -> str:
    """What a signal that stopped a sweep in job `job_num` left undone: that job and every later one
    (the jobs as the sweep's `multirun.yaml` expands them; a count where its sweeper samples as it goes)."""
    rerun = "launch the same sweep again to run them (its finished jobs are not trained again)"
    try:
        launched = OmegaConf.load(sweep_dir / "multirun.yaml")
        jobs = sweep_jobs(launched) if isinstance(launched, DictConfig) else None
    except Exception:  # an unreadable multirun.yaml must not hide the stop line itself
        jobs = None
    if jobs is None:
        return f"kdexp-train: the sweep stopped in job #{job_num}; it and any later jobs did not run: {rerun}."
    undone = [job_name(num, overrides, jobs) for num, overrides in enumerate(jobs) if num >= job_num]
    return (
        f"kdexp-train: the sweep stopped in job #{job_num}: {len(undone)} of its {len(jobs)} jobs did not "
        f"finish: {', '.join(undone)}; {rerun}."
    )


def job_name(num: int, overrides: list[str], jobs: list[list[str]]) -> str:
    """`job #1 (method=dbkd seed=2)`: the job's number and the overrides in which the jobs differ."""
    differing = [o for i, o in enumerate(overrides) if len({job[i] for job in jobs}) > 1]
    return f"job #{num}" + (f" ({' '.join(differing)})" if differing else "")


def _check_job(loader: Any, config: DictConfig, overrides: list[str], num: int, name: str) -> None:
    from kdexp.run import check_run

    try:
        job = loader.load_sweep_config(config, list(overrides))
        with open_dict(job):
            job.hydra.job.num = num
            job.hydra.job.id = num
        HydraConfig.instance().set_config(job)  # as the launcher sets it: `${hydra:...}` resolves as in the job
        job_cfg = copy.deepcopy(job)
        with read_write(job_cfg), open_dict(job_cfg):
            del job_cfg["hydra"]
        refuse_ddp_in_a_sweep(job_cfg, RunMode.MULTIRUN)
        check_run(job_cfg)
    except (KdexpError, HydraException, OmegaConfBaseException) as err:
        message = (
            one_line_error(err)
            if isinstance(err, KdexpError)
            else (str(err).strip().split("\n")[0] or type(err).__name__)
        )
        message = message.rstrip(".") + "."
        raise ConfigError(
            f"{name} of the sweep: {message} No job has started; fix that job's value (or leave it "
            "out of the sweep) and launch again."
        ) from None
    except Exception as err:
        raise RuntimeError(f"{name} of the sweep: its checks raised {type(err).__name__}") from err


# --------------------------------------------------------------------------- failed jobs


def one_line_error(err: BaseException) -> str:
    """The error in one line: a kdexp error's own message, else the exception's type and first line."""
    text = str(err).strip()
    first = text.splitlines()[0] if text else ""
    if isinstance(err, KdexpError):
        return first or type(err).__name__
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def last_frame(err: BaseException) -> str:
    """`file:line in function` of the frame that raised `err`."""
    frames = traceback.extract_tb(err.__traceback__)
    if not frames:
        return ""
    frame = frames[-1]
    return f"{frame.filename}:{frame.lineno} in {frame.name}"


def record_failure(job_dir: Path, err: BaseException, job: int, overrides: list[str], sweep_dir: Path) -> Path:
    """Write the job's `failed.json` (its one-line error, the traceback's last frame, the sweep it belongs to)."""
    holder = folder_holder(sweep_dir, SWEEP_LOCK_FILE)
    record = {
        "error": one_line_error(err),
        "type": type(err).__name__,
        "last_frame": last_frame(err),
        "job": job,
        "overrides": list(overrides),
        "sweep": None if holder is None else holder.__dict__,
        "time": datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    job_dir.mkdir(parents=True, exist_ok=True)
    path = job_dir / FAILED_FILE
    partial = path.with_name(f".{FAILED_FILE}.{os.getpid()}")
    partial.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(partial, path)  # whole or absent: the end of the sweep reads it
    return path


def failed_jobs(sweep_dir: Path, holder: Any) -> list[tuple[Path, dict[str, Any]]]:
    """The jobs of this sweep (`holder`: the process holding the sweep folder) whose folder has a
    `failed.json`; a job clears its own when it starts again."""
    wanted = None if holder is None else holder.__dict__
    failures = []
    for path in sorted(sweep_dir.rglob(FAILED_FILE)):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if record.get("sweep") == wanted:
            failures.append((path.parent, record))
    return failures
