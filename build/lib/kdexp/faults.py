"""Fault injection for the tests of resume and cache integrity.

`KDEXP_FAULT_AT=<point>[:<key>=<value>...]` makes the process kill itself with SIGKILL (no
clean-up, as a power loss or the OOM killer would) when it reaches that point with those
values, e.g. `train_batch:epoch=2:batch=1` or `teacher_train_batch:epoch=1:batch=0`.
Unset, `maybe_fail` costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

ENV_VAR = "KDEXP_FAULT_AT"


def _matches(spec: str, point: str, where: dict[str, object]) -> bool:
    name, *conditions = spec.split(":")
    if name != point:
        return False
    for condition in conditions:
        key, _, value = condition.partition("=")
        if str(where.get(key)) != value:
            return False
    return True


def maybe_fail(point: str, **where: object) -> None:
    spec = os.environ.get(ENV_VAR)
    if spec and _matches(spec, point, where):
        os.kill(os.getpid(), signal.SIGKILL)
