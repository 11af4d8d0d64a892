"""Fault injection for the tests of resume, cache integrity, folder locks and sweeps.

`KDEXP_FAULT_AT=<point>[:<key>=<value>...]` acts when the process reaches that point with those
values, e.g. `train_batch:epoch=2:batch=1` or `teacher_train_batch:epoch=1:batch=0`; a sweep job
also matches its number, `job` (`train_batch:job=0:epoch=0:batch=0`). `KDEXP_FAULT_ACTION` says what
happens there:

- `kill` (the default): SIGKILL, with no clean-up, as a power loss or the OOM killer would;
- `raise`: an `InjectedFault` exception, as a bug in the code would;
- `wait:<file>`: block until `<file>` exists (a test holds the run there, e.g. to launch a second one);
- `signal:<NAME>` (`signal:TERM`, `signal:USR1`, `signal:INT`): the process sends itself that signal, as
  a scheduler pre-empting it would (kdexp.preemption), and goes on.

Unset, `maybe_fail` costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal
import time

ENV_VAR = "KDEXP_FAULT_AT"
ACTION_VAR = "KDEXP_FAULT_ACTION"

_context: dict[str, object] = {}


class InjectedFault(RuntimeError):
    """The exception `KDEXP_FAULT_ACTION=raise` raises."""


def set_context(**values: object) -> None:
    """Values every point matches besides its own (the job number of a sweep job)."""
    _context.update(values)


def _matches(spec: str, point: str, where: dict[str, object]) -> bool:
    name, *conditions = spec.split(":")
    if name != point:
        return False
    for condition in conditions:
        key, _, value = condition.partition("=")
        if str(where.get(key)) != value:
            return False
    return True


def _act(point: str) -> None:
    action = os.environ.get(ACTION_VAR, "kill")
    if action == "raise":
        raise InjectedFault(f"injected fault at {point} ({ENV_VAR}={os.environ[ENV_VAR]})")
    if action.startswith("wait:"):
        release = action.partition(":")[2]
        while not os.path.exists(release):
            time.sleep(0.1)
        return
    if action.startswith("signal:"):
        name = action.partition(":")[2].upper()
        os.kill(os.getpid(), getattr(signal, name if name.startswith("SIG") else f"SIG{name}"))
        return
    os.kill(os.getpid(), signal.SIGKILL)


def maybe_fail(point: str, **where: object) -> None:
    spec = os.environ.get(ENV_VAR)
    if spec and _matches(spec, point, {**_context, **where}):
        _act(point)
