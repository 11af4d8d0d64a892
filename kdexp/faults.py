"""Fault injection for the tests of resume, cache integrity, folder locks, sweeps and OS errors.

`KDEXP_FAULT_AT=<point>[:<key>=<value>...]` acts when the process reaches that point with those
values, e.g. `train_batch:epoch=2:batch=1` or `teacher_train_batch:epoch=1:batch=0`; a sweep job
also matches its number, `job` (`train_batch:job=0:epoch=0:batch=0`). `KDEXP_FAULT_ACTION` says what
happens there:

- `kill` (the default): SIGKILL, with no clean-up, as a power loss or the OOM killer would;
- `raise`: an `InjectedFault` exception, as a bug in the code would;
- `wait:<file>`: block until `<file>` exists (a test holds the run there, e.g. to launch a second one);
- `signal:<NAME>` (`signal:TERM`, `signal:USR1`, `signal:INT`): the process sends itself that signal, as
  a scheduler pre-empting it would (kdexp.preemption), and goes on;
- `signal-group:<NAME>`: the same signal to every process of its process group (a sweep's launching process
  and its joblib workers), as SLURM signals every process of a job it cancels or pre-empts;
- `oserror:<ERRNO>` (`oserror:ENOSPC`, `oserror:EACCES`, `oserror:EPERM`, `oserror:EROFS`): an `OSError`
  with that number and the point's `path`, as a full disk, a folder without permission or a read-only
  file system would.

The points of the OS-error tests, each with `file` (the name of the file or folder written), `dir` (the
name of the folder holding it) and `path`:

- `write`: kdexp's own atomic writes (kdexp.cache: `atomic_write_text`/`_json`, `atomic_torch_save`,
  `save_tensors`, `atomic_directory`, `replaced_directory`, `publish_folder`), once the content is in the
  temporary file or folder and before it is renamed into place (`write:file=results.json`,
  `write:dir=teacher_logits`);
- `write_probe`: the probe that tells whether a folder can be written (kdexp.errors.write_refusal), with
  `key`, the setting that chose the folder (`write_probe:key=cache_dir`);
- `open`: any file a library opens for writing, or renames onto, from Python (an audit hook installed
  when this module is imported with `KDEXP_FAULT_AT=open:...`): Lightning's checkpoints
  (`open:file=last.ckpt.tmp`), datasets' `save_to_disk`.

Unset, `maybe_fail` costs one dictionary lookup.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
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


def injected_os_error(action: str, where: dict[str, object]) -> OSError:
    """The `OSError` of `oserror:<ERRNO>`, naming the point's `path` (as the OS names the file it refused)."""
    name = action.partition(":")[2].upper()
    code = {label: number for number, label in errno.errorcode.items()}.get(name)
    if code is None:
        raise ValueError(f"{ACTION_VAR}={action}: {name} is not an errno name; use e.g. oserror:ENOSPC")
    path = where.get("path")
    return OSError(code, os.strerror(code), None if path is None else str(path))


def _act(point: str, where: dict[str, object]) -> None:
    action = os.environ.get(ACTION_VAR, "kill")
    if action == "raise":
        raise InjectedFault(f"injected fault at {point} ({ENV_VAR}={os.environ[ENV_VAR]})")
    if action.startswith("oserror:"):
        raise injected_os_error(action, where)
    if action.startswith("wait:"):
        release = action.partition(":")[2]
        while not os.path.exists(release):
            time.sleep(0.1)
        return
    if action.startswith(("signal:", "signal-group:")):
        kind, _, name = action.partition(":")
        signum = getattr(signal, name.upper() if name.upper().startswith("SIG") else f"SIG{name.upper()}")
        if kind == "signal-group":
            os.killpg(os.getpgrp(), signum)
        else:
            os.kill(os.getpid(), signum)
        return
    os.kill(os.getpid(), signal.SIGKILL)


def maybe_fail(point: str, **where: object) -> None:
    spec = os.environ.get(ENV_VAR)
    if spec and _matches(spec, point, {**_context, **where}):
        _act(point, {**_context, **where})


def file_point(path: str | os.PathLike[str]) -> dict[str, object]:
    """The values of a `write` or `open` point for `path`: its name, its folder's name, and the path."""
    path = os.path.abspath(os.fspath(path))
    return {"file": os.path.basename(path), "dir": os.path.basename(os.path.dirname(path)), "path": path}


_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _written_path(event: str, args: tuple) -> str | None:
    """The path an audited `open` (for writing) or rename writes to; None for other events."""
    if event == "open":
        path, mode, flags = args
        writing = (isinstance(mode, str) and any(c in mode for c in "wxa+")) or (
            isinstance(flags, int) and bool(flags & _WRITE_FLAGS)
        )
    elif event == "os.rename":  # os.rename and os.replace
        path, writing = args[1], True
    else:
        return None
    if not writing or not isinstance(path, (str, os.PathLike)):
        return None
    return os.fspath(path)


def _open_fault_hook(event: str, args: tuple) -> None:
    path = _written_path(event, args) if event in ("open", "os.rename") else None
    if path is not None:
        maybe_fail("open", **file_point(path))


def install_open_faults() -> None:
    """With `KDEXP_FAULT_AT=open:...`, act at every Python-level open for writing (or rename onto a file)
    that matches; nothing otherwise (an audit hook cannot be removed: it is only added when asked for)."""
    if os.environ.get(ENV_VAR, "").split(":")[0] == "open":
        sys.addaudithook(_open_fault_hook)


install_open_faults()
