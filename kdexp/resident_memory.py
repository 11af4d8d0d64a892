"""A process's resident memory as Linux reports it in /proc/self/status, with getrusage elsewhere."""

from __future__ import annotations

import resource
import sys
from pathlib import Path


def status_kb(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM, ...) in kB; KeyError where there is none."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError as error:
        raise KeyError(field) from error
    for line in lines:
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def own_peak_rss_mb() -> float:
    """This process's peak RSS since it started its program, in MB.

    VmHWM belongs to the address space that `exec` creates, so it starts afresh in a child. The
    rusage figure does not: Linux carries the peak of the forked copy of the parent across `exec`,
    so a child of a large parent reports at least the parent's size. That is the fallback only."""
    try:
        return status_kb("VmHWM") / 1024
    except KeyError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, kB on Linux
