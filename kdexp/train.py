"""`kdexp-train`: the Hydra app. One run, or a sweep with `-m` (e.g. `method=finetune,vanilla_kd seed=1,2,3`).

Only Hydra is imported at start-up, so `--help`, `--cfg job` and shell completion answer fast;
torch, Lightning and transformers load when a run starts. A config, data or model error
(`kdexp.errors.KdexpError`) prints one line and exits with status 2 (`HYDRA_FULL_ERROR=1`
shows the traceback).

A run first claims its folder (`kdexp.run_folder`: a second launch into a folder a live process
holds stops in one line). Every launch carries the sweep callback `kdexp.sweep.SweepGuard`
(`hydra.callbacks.kdexp_sweep`): under `-m` it holds the sweep folder, checks every job's config
before the first starts, and lists the failed jobs at the end (exit status 1), while a failed job
is recorded in its folder (`failed.json`) and the sweep goes on.

SIGTERM, SIGUSR1 and SIGINT (a scheduler's pre-emption, Ctrl+C) stop a run at its next batch
boundary with a step checkpoint (kdexp.preemption): one line says what was saved and how to
resume, and the exit status is 128 + the signal's number (143, 138, 130), a sweep's included;
rerunning the same command resumes. Under SLURM, SIGUSR1 also requeues the job.

A refusal of the operating system to write (no space left, permission denied, a read-only file
system), wherever the run writes (its folder, the cache, Lightning's checkpoints, Hydra's own files),
is a `kdexp.errors.OSFailure`: one line naming the path and what would work, exit status 2.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any, NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from kdexp import faults, preemption
from kdexp.config import CONFIG_DIR, config_dict
from kdexp.errors import KdexpError, os_failure_of, os_failures_reported
from kdexp.run_folder import FAILED_FILE, RunFolder
from kdexp.sweep import refuse_ddp_in_a_sweep

log = logging.getLogger(__name__)

SWEEP_CALLBACK_KEY = "kdexp_sweep"  # the key of kdexp.sweep.SweepGuard under hydra.callbacks
SWEEP_CALLBACK = f"++hydra.callbacks.{SWEEP_CALLBACK_KEY}._target_=kdexp.sweep.SweepGuard"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def share_cores_with_parallel_jobs(launcher: DictConfig) -> None:
    """Under the joblib launcher, give each of its n_jobs processes its share of the cores
    (torch would otherwise start one thread per core in every job)."""
    if "joblib" not in str(launcher.get("_target_", "")):
        return
    import torch

    cores = os.cpu_count() or 1
    jobs = launcher.get("n_jobs", -1)
    jobs = cores if jobs in (None, -1) else max(1, int(jobs))
    torch.set_num_threads(max(1, cores // jobs))


def run_job(cfg: DictConfig) -> float:
    """Claim the run's folder (before the heavy imports: Hydra has just written its files there), then run."""
    hydra_cfg = HydraConfig.get()
    folder = RunFolder(Path(hydra_cfg.runtime.output_dir))
    with os_failures_reported():  # an OS refusal to write, anywhere in the run: one line naming the path
        folder.claim("hydra.sweep.dir" if hydra_cfg.mode == RunMode.MULTIRUN else "hydra.run.dir")
        try:
            return _run_claimed(cfg, folder.path)
        finally:
            folder.release()


def lease_a_gpu_for_parallel_jobs(cfg: DictConfig, launcher: DictConfig) -> Any:
    """Under the joblib launcher on a machine with several GPUs, hold one GPU for this job (each parallel
    job gets its own; kdexp.hardware.GpuLease); None otherwise."""
    from kdexp.hardware import GpuLease, sweep_job_devices, visible_gpus

    trainer = config_dict(cfg.trainer)
    if not sweep_job_devices(trainer, str(launcher.get("_target_", "")), visible_gpus()):
        return None
    lease = GpuLease(visible_gpus())
    log.info("This job trains on GPU %d (leased in %s)", lease.acquire(), lease.lease_dir)
    return lease


def _run_claimed(cfg: DictConfig, run_dir: Path) -> float:
    hydra_cfg = HydraConfig.get()
    refuse_ddp_in_a_sweep(cfg, hydra_cfg.mode)
    share_cores_with_parallel_jobs(hydra_cfg.launcher)
    lease = lease_a_gpu_for_parallel_jobs(cfg, hydra_cfg.launcher)
    try:
        return _run_on_hardware(cfg, run_dir)
    finally:
        if lease is not None:
            lease.release()


def _run_on_hardware(cfg: DictConfig, run_dir: Path) -> float:
    from kdexp.run import run

    hydra_cfg = HydraConfig.get()
    group = None
    if hydra_cfg.mode == RunMode.MULTIRUN:
        group = "/".join(Path(hydra_cfg.sweep.dir).parts[-2:])
    experiment = hydra_cfg.runtime.choices.get("experiment")
    results = run(
        cfg,
        run_dir,
        overrides=list(hydra_cfg.overrides.task),
        sweep_group=group,
        experiment=None if experiment in (None, "null") else experiment,
    )
    (run_dir / FAILED_FILE).unlink(missing_ok=True)  # a refused launch may have recorded one meanwhile
    return float(results["metrics"][f"val/{results['main_metric']}"])


def run_sweep_job(cfg: DictConfig) -> float | None:
    """One job of a sweep: an exception is recorded in the job's folder (`failed.json`) and the job
    returns None instead of raising, so the launcher goes on with the next job (kdexp.sweep)."""
    from kdexp.sweep import one_line_error, record_failure

    hydra_cfg = HydraConfig.get()
    faults.set_context(job=hydra_cfg.job.num)
    try:
        return run_job(cfg)
    except Exception as err:
        job_dir = Path(hydra_cfg.runtime.output_dir)
        sweep_dir = Path(hydra_cfg.runtime.cwd) / str(hydra_cfg.sweep.dir)
        record = record_failure(job_dir, err, hydra_cfg.job.num, list(hydra_cfg.overrides.task), sweep_dir)
        log.error(
            "Job #%s failed: %s (recorded in %s); the sweep goes on.",
            hydra_cfg.job.num,
            one_line_error(err),
            record,
            exc_info=not isinstance(err, KdexpError),
        )
        return None


def sweep_guarded() -> bool:
    """True in a sweep that `kdexp.sweep.SweepGuard` watches (it lists the failed jobs at the end)."""
    hydra_cfg = HydraConfig.get()
    return hydra_cfg.mode == RunMode.MULTIRUN and SWEEP_CALLBACK_KEY in (hydra_cfg.callbacks or {})


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def hydra_app(cfg: DictConfig) -> float | None:
    preemption.install()
    try:
        if sweep_guarded():
            return run_sweep_job(cfg)
        try:
            return run_job(cfg)
        except KdexpError as err:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            print(f"kdexp-train: error: {err}", file=sys.stderr)
            sys.exit(2)
    except preemption.Preempted as stop:
        status = report_stop(stop)
        if status and sweep_guarded():
            report_stopped_sweep()
        sys.exit(status)


def report_stopped_sweep() -> None:
    """After a sweep job's stop line: the jobs the signal left undone (kdexp.sweep.stopped_sweep_line)."""
    from kdexp.sweep import stopped_sweep_line

    hydra_cfg = HydraConfig.get()
    sweep_dir = Path(hydra_cfg.runtime.cwd) / str(hydra_cfg.sweep.dir)
    print(stopped_sweep_line(hydra_cfg.job.num, sweep_dir), file=sys.stderr, flush=True)


def report_stop(stop: preemption.Preempted) -> int:
    """The one line a stop signal ends a run with, and its exit status (kdexp.preemption).

    Only the first process reports; the other DDP processes exit with status 0, so that Lightning's
    watcher of the processes it launched does not kill the first before it has reported.
    """
    if not preemption.is_first_process():
        return 0
    name = preemption.signal_name(stop.signum)
    saved = f"saved {stop.saved}" if stop.saved else "nothing in progress needed saving"
    requeued = preemption.requeue_slurm_job() if stop.signum == signal.SIGUSR1 else None
    line = f"kdexp-train: stopped by {name}: {saved}; {resume_hint()}"
    line += f"; SLURM job {requeued} requeued" if requeued else ""
    print(f"{line} (exit status {stop.exit_status}).", file=sys.stderr, flush=True)
    return stop.exit_status


def resume_hint() -> str:
    """How to resume: the same command, naming the run's folder where the command left it to Hydra's
    default (a new time-stamped folder each launch)."""
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        key, folder = "hydra.sweep.dir", str(Path(hydra_cfg.runtime.cwd) / str(hydra_cfg.sweep.dir))
    else:
        key, folder = "hydra.run.dir", str(hydra_cfg.runtime.output_dir)
    if any(override.lstrip("+").split("=", 1)[0] == key for override in hydra_cfg.overrides.hydra):
        return "rerun the same command to resume"
    return f"rerun the same command with {key}={folder} to resume"


def with_sweep_callback(argv: list[str]) -> list[str]:
    """The command line with the sweep callback added next to the other overrides (argparse takes the
    overrides only as one run of arguments); unchanged if it names the callback already, asks for
    shell completion or the version, or does not parse (Hydra then says why)."""
    if any(f"hydra.callbacks.{SWEEP_CALLBACK_KEY}" in arg for arg in argv[1:]) or {
        "-sc",
        "--shell-completion",
        "--version",
    } & set(argv):
        return argv
    overrides = _parsed_overrides(argv[1:])
    if overrides is None:
        return argv
    at = argv.index(overrides[0], 1) if overrides else 1
    return [*argv[:at], SWEEP_CALLBACK, *argv[at:]]


class _Unparsable(Exception):
    pass


def _parsed_overrides(args: list[str]) -> list[str] | None:
    """The overrides among `args` as Hydra's own parser reads them; None if they do not parse."""
    from hydra._internal.utils import get_args_parser

    parser = get_args_parser()

    def refuse(message: str) -> NoReturn:
        raise _Unparsable(message)

    parser.error = refuse  # type: ignore[method-assign]  # say nothing: Hydra reports it when it parses
    try:
        return list(parser.parse_args(args).overrides)
    except _Unparsable:
        return None


def report_os_failures_of_hydra() -> None:
    """Hydra writes before the run starts (the run folder, `.hydra/`, the job's log file) and would print an
    OS error there as a traceback with exit status 1: print it as the same one line as in the run, exit 2.

    Wraps Hydra's `run_and_report` (hydra._internal.utils, Hydra 1.3), which every launch goes through."""
    import hydra._internal.utils as hydra_utils

    report = hydra_utils.run_and_report
    if getattr(report, "reports_os_failures", False):
        return

    def run_and_report(func: Any) -> Any:
        def reporting_os_failures() -> Any:
            try:
                return func()
            except Exception as err:
                failure = os_failure_of(err)
                if failure is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
                    raise
                print(f"kdexp-train: error: {failure}", file=sys.stderr, flush=True)
                sys.exit(2)

        return report(reporting_os_failures)

    run_and_report.reports_os_failures = True  # type: ignore[attr-defined]
    hydra_utils.run_and_report = run_and_report


def main() -> None:
    """`kdexp-train`: the Hydra app, with `kdexp.sweep.SweepGuard` among its callbacks."""
    sys.argv = with_sweep_callback(sys.argv)
    report_os_failures_of_hydra()
    hydra_app()


if __name__ == "__main__":
    main()
