"""Stopping on a signal without losing work, and when long loops write their step checkpoints.

A cluster pre-empts a job with SIGTERM (SLURM, submitit), warns it ahead of its time limit with
SIGUSR1 (`#SBATCH --signal=USR1@120`), and a person stops a run with Ctrl+C (SIGINT). `install`
(kdexp-train calls it as it starts, in the main thread of each of its processes) records the first
of these signals:

- inside a stage that stops at its own batch boundaries (`deferring`: training in
  `kdexp.training.fit`, the teacher's fine-tuning included, and the MLM adaptation), the stage sees
  `stop_requested()` at its next boundary, saves its step checkpoint there and raises `Preempted`;
- anywhere else (loading data, teacher passes, writing results) `Preempted` is raised at once, from
  the handler, as Ctrl+C raises KeyboardInterrupt: what is finished is on disk (cache entries,
  checkpoints), and what was half written is in temporary files that are never taken for finished ones.

`kdexp-train` then prints one line (the signal, what was saved, how to resume) and exits with
128 + the signal's number, the status a shell gives a process that signal ended: 143 for SIGTERM,
138 for SIGUSR1, 130 for SIGINT. Rerunning the same command resumes. Under SLURM, SIGUSR1 also
requeues the job (`requeue_slurm_job`, once the checkpoint is saved): the part Lightning's
SLURMEnvironment auto-requeue plays. Lightning installs its SIGUSR1 handler only where no handler
is installed, so it stays out, as its SIGTERM handler does (`kdexp.training.build_trainer`): both
would stop or save where no resumable checkpoint is (mid-step, or into the launch folder).

The same signal a second time ends the first process at once (the signal's default action): a
second Ctrl+C does not wait for the batch to end.

DDP: every process records its signal; training stops when any process has one, all processes at
the same batch boundary (`kdexp.training` all-reduces the decision), and the checkpoint that counts
is global rank 0's. The other processes exit with status 0 and say nothing (rank 0 reports), so
that Lightning's watcher of the processes it launched does not kill rank 0 before it has reported;
they ignore repeated signals. A signal the first process alone receives outside a deferring stage
is forwarded to the processes it launched (`forward_to_launched`).

Nothing here imports torch: `kdexp-train` installs the handlers before its heavy imports.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
# A process's rank as a launcher sets it (kdexp.hardware.RANK_VARIABLES; that module imports torch).
RANK_VARIABLES = ("LOCAL_RANK", "NODE_RANK", "RANK", "SLURM_PROCID")


class Preempted(BaseException):
    """A stop signal ended the run; `saved` says what was saved to resume from (None: nothing was in progress).

    A BaseException, as KeyboardInterrupt is, so that no `except Exception` takes it for a failure
    (a sweep job records failures and goes on with the next job; a stop must stop the sweep).
    """

    def __init__(self, signum: int, saved: str | None = None):
        self.signum = int(signum)
        self.saved = saved
        super().__init__(f"stopped by {signal_name(signum)}" + (f": {saved}" if saved else ""))

    @property
    def exit_status(self) -> int:
        """128 + the signal's number (143 for SIGTERM, 138 for SIGUSR1, 130 for SIGINT)."""
        return 128 + self.signum


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def is_first_process() -> bool:
    """True in the process that reports and writes (global rank 0; the only process of a plain run)."""
    return all(os.environ.get(name, "0") in ("", "0") for name in RANK_VARIABLES)


class _StopState:
    """This process's signal bookkeeping."""

    def __init__(self) -> None:
        self.signum: int | None = None  # the first stop signal received
        self.owner_pid: int | None = None  # the process that installed the handlers (forked children inherit them)
        self.deferring = 0  # depth of `deferring` blocks
        self.children: list[Any] = []  # processes this one launched (subprocess.Popen), to forward a signal to


_state = _StopState()


def install() -> bool:
    """Handle SIGTERM, SIGUSR1 and SIGINT in this process from now on (see the module docstring).

    Only the main thread may set handlers: elsewhere nothing is done and False is returned.
    """
    if threading.current_thread() is not threading.main_thread():
        return False
    for signum in STOP_SIGNALS:
        signal.signal(signum, _on_signal)
    _state.owner_pid = os.getpid()
    return True


def installed() -> bool:
    return _state.owner_pid == os.getpid() and signal.getsignal(signal.SIGTERM) is _on_signal


def stop_requested() -> int | None:
    """The stop signal this process received (its number), or None."""
    return _state.signum


def _on_signal(signum: int, frame: Any) -> None:
    if os.getpid() != _state.owner_pid:
        return  # a forked child (a data-loader worker): the process that forked it decides
    if _state.signum is not None:
        if signum == _state.signum and is_first_process():
            _end_now(signum)
        return
    _state.signum = signum
    if not _state.deferring:
        _forward(signum)
        raise Preempted(signum)


def _end_now(signum: int) -> None:
    """The signal's default action, now (a second Ctrl+C)."""
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def forward_to_launched(hardware: Any) -> None:
    """Remember the DDP processes `hardware` launched from this one (none for one device), so that a
    signal this process alone receives outside a deferring stage reaches them too."""
    launcher = getattr(getattr(hardware.fabric, "strategy", None), "launcher", None)
    _state.children = list(getattr(launcher, "procs", None) or [])


def _forward(signum: int) -> None:
    for child in _state.children:
        if child.poll() is None:
            child.send_signal(signum)


@contextmanager
def deferring(last_saved: Callable[[], str | None] | None = None) -> Iterator[None]:
    """A stage that stops at its own batch boundaries: inside the block a signal is only recorded.

    The stage checks `stop_requested()` at each boundary, saves and raises `Preempted`. A signal
    recorded after its last check raises `Preempted` as the block ends, saying what `last_saved()`
    says the stage saved last. Where `install` was not called (a library caller, a test), the
    handlers are installed for the block only and the previous ones put back after it.
    """
    previous = _install_for_block()
    _state.deferring += 1
    try:
        yield
    except BaseException:
        _leave_block(previous)
        raise
    pending = _leave_block(previous)
    if pending is not None and not _state.deferring:
        raise Preempted(pending, last_saved() if last_saved else None)


def _install_for_block() -> dict[signal.Signals, Any] | None:
    if installed():
        return None
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    return previous if install() else None


def _leave_block(previous: dict[signal.Signals, Any] | None) -> int | None:
    """End a `deferring` block; the signal recorded (None if none)."""
    _state.deferring -= 1
    pending = _state.signum
    if previous is not None:  # handlers installed for this block only: put the caller's back, forget the signal
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _state.owner_pid, _state.signum = None, None
    return pending


def requeue_slurm_job() -> str | None:
    """`scontrol requeue` this SLURM job, as Lightning's SLURM auto-requeue does on SIGUSR1; the job's id,
    or None outside SLURM or if scontrol refused (then logged)."""
    from lightning_fabric.plugins.environments import SLURMEnvironment

    if not SLURMEnvironment.detect():
        return None
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array_job}_{os.environ.get('SLURM_ARRAY_TASK_ID')}" if array_job else os.environ.get("SLURM_JOB_ID")
    if not job:
        return None
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        log.warning("Could not requeue SLURM job %s: %s", job, err)
        return None
    if done.returncode != 0:
        log.warning("scontrol requeue %s failed (%d): %s", job, done.returncode, done.stderr.strip())
        return None
    return job


# --------------------------------------------------------------------------- when to checkpoint


@dataclass(frozen=True)
class CheckpointEvery:
    """How often a long loop writes its step checkpoint (the run config's `checkpoint.*`): every
    `n_steps` optimiser steps, every `minutes` of wall-clock time, or both (whichever comes first).
    With neither it checkpoints only at its natural boundaries (epochs) and when a signal stops it."""

    n_steps: int | None = None
    minutes: float | None = None

    @classmethod
    def from_config(cls, checkpoint_cfg: Any) -> "CheckpointEvery":
        """From the run config's `checkpoint` block (None: no step checkpoints)."""
        if checkpoint_cfg is None:
            return cls()
        return cls(checkpoint_cfg.get("every_n_steps"), checkpoint_cfg.get("every_minutes"))


class CheckpointClock:
    """Whether a step checkpoint is due: at every multiple of `n_steps` optimiser steps (counted from the
    start of training, so a resumed run saves at the same steps), or `minutes` after the last save."""

    def __init__(self, every: CheckpointEvery | None = None):
        self.every = every or CheckpointEvery()
        self.last_save = time.monotonic()

    def due(self, step: int) -> bool:
        n_steps, minutes = self.every.n_steps, self.every.minutes
        if n_steps and step > 0 and step % n_steps == 0:
            return True
        if not minutes:
            return False
        return time.monotonic() - self.last_save >= 60.0 * float(minutes)

    def saved(self) -> None:
        self.last_save = time.monotonic()
