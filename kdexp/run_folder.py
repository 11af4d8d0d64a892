"""A run's folder: what it holds, and whether a re-launch may use it.

A run folder holds `config.yaml` (the resolved config, written when training starts),
`checkpoints/` while training, and `results.json` once finished. A re-launch in the same
folder continues the run only if its result config (`kdexp.config.result_config`) is the one
that ran there; otherwise it is refused, naming the keys that differ, and Hydra's `.hydra/`
files are put back as they were, so the folder still describes the run it holds.

A folder has one owner: the process that trains there holds an OS lock (`fcntl.flock`) on
`.kdexp.lock` inside it for the whole run, with its host, pid and start time written in the file.
A second launch into a folder that a live process holds is refused in one line naming that
process; a lock left by a process that died (kill -9, a node lost: the OS releases the lock; or
the file names a pid of this host that no longer runs) is taken over, so a requeued job resumes.
Only the process of global rank 0 claims: the ranks Lightning's DDP re-launches share its folder.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import time
import weakref
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from omegaconf import OmegaConf

from kdexp.config import config_dict, config_differences, config_hash
from kdexp.errors import ConfigError, name_folder, os_failure, write_refusal
from kdexp.hardware import is_global_zero

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
CONFIG_FILE = "config.yaml"
HYDRA_FILES = ("config.yaml", "hydra.yaml", "overrides.yaml")
FIRST_LAUNCH = "first_launch"  # .hydra/first_launch/: Hydra's files as the run that holds the folder wrote them
LOCK_FILE = ".kdexp.lock"
HOLDER = "holder"  # .hydra/holder/: Hydra's files as the launch that holds the lock now wrote them
FAILED_FILE = "failed.json"  # a sweep job that failed: its one-line error (kdexp.sweep)


def check_writable(folder: Path, key: str) -> None:
    """Refuse, before any work, a folder that cannot be created or written (a probe file is tried: root
    ignores permission bits), in one line (`OSFailure`) naming it and what would work; `key` is the
    setting that chose it, named in that line and in any later OS failure under the folder."""
    name_folder(folder, key)
    refusal = write_refusal(folder, key)
    if refusal is not None:
        raise os_failure(refusal.errno or errno.EACCES, folder, refusal.strerror) from None


class RunFolder:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._release: weakref.finalize | None = None  # set when this object claims the folder

    @property
    def results_file(self) -> Path:
        return self.path / RESULTS_FILE

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def finished_results(self, resolved: dict[str, Any]) -> dict[str, Any] | None:
        """The stored results if this config already finished here; None if nothing finished here."""
        if not self.results_file.exists():
            return None
        try:
            results = json.loads(self.results_file.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(
                f"{self.results_file} is unreadable ({err}); move it away, or set resume=false to train this run again."
            ) from None
        stored = results.get("config") or {}
        if config_hash(stored) != config_hash(resolved):  # hashed anew: kdexp versions may hash differently
            self._refuse("holds a finished run", stored, resolved)
        return results

    def check_resumable(self, resolved: dict[str, Any]) -> None:
        """Refuse to continue checkpoints that were written under another config."""
        if not (self.checkpoints / "last.ckpt").exists() or not self.config_file.exists():
            return
        stored = config_dict(OmegaConf.load(self.config_file), resolve=False)
        if config_hash(stored) != config_hash(resolved):
            self._refuse("holds an unfinished run", stored, resolved)

    def set_aside_previous(self) -> None:
        """`resume=false`: start over; a finished result is kept as `results.json.bak`, never deleted."""
        if self.results_file.exists():
            backup = self.results_file.with_name(f"{RESULTS_FILE}.bak-{int(time.time())}")
            self.results_file.rename(backup)
            log.warning("resume=false: the previous result is kept as %s; training again.", backup)
        for stale in (self.checkpoints, self.path / "csv"):
            shutil.rmtree(stale, ignore_errors=True)
        (self.path / "metrics.csv").unlink(missing_ok=True)

    def claim(self, key: str = "hydra.run.dir") -> None:
        """Hold this folder for the run, before any work (see the module docstring); a `ConfigError`
        names the live process that holds it, and Hydra's files go back to that launch's.

        `key` is the config key that chose the folder, named in what would work instead.
        """
        instead = (
            f"wait for it to end (a re-launch then resumes the run or returns its result), stop it, or "
            f"launch in another folder ({key}=<another folder>)."
        )
        try:
            claimed = claim_folder(self.path, LOCK_FILE, instead)
        except ConfigError:
            self._restore_hydra_files(HOLDER)
            raise
        if claimed:
            # Held until `release`, or until this object goes (a direct caller of kdexp.run.run: when it returns).
            self._release = weakref.finalize(self, release_folder, self.path)
            self._copy_hydra_files(HOLDER)
            (self.path / FAILED_FILE).unlink(missing_ok=True)  # this launch runs the folder again

    def release(self) -> None:
        """Let go of the folder if this object claimed it (the run is over in this process)."""
        if self._release is not None:
            self._release()

    def keep_hydra_files(self) -> None:
        """Remember Hydra's files of the launch that trains here (restored if a later launch is refused)."""
        self._copy_hydra_files(FIRST_LAUNCH)

    def _copy_hydra_files(self, into: str) -> None:
        hydra_dir = self.path / ".hydra"
        if not hydra_dir.is_dir():
            return
        (hydra_dir / into).mkdir(exist_ok=True)
        for name in HYDRA_FILES:
            if (hydra_dir / name).exists():
                shutil.copy2(hydra_dir / name, hydra_dir / into / name)

    def _restore_hydra_files(self, source: str = FIRST_LAUNCH) -> None:
        kept = self.path / ".hydra" / source
        for name in HYDRA_FILES:
            if (kept / name).exists():
                shutil.copy2(kept / name, self.path / ".hydra" / name)

    def _refuse(self, holds: str, stored: dict[str, Any], resolved: dict[str, Any]) -> None:
        self._restore_hydra_files()
        differences = "; ".join(config_differences(stored, resolved))
        raise ConfigError(
            f"{self.path} {holds} of another config ({differences}). Launch in a new folder "
            f"(hydra.run.dir=... / hydra.sweep.dir=...), or set resume=false to start over here."
        )


# --------------------------------------------------------------------------- one owner per folder

_LOCKED_ERRNOS = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)


@dataclass(frozen=True)
class LockHolder:
    """The process that holds a folder: written in its lock file, named when another launch is refused."""

    host: str
    pid: int
    started: str

    @classmethod
    def this_process(cls) -> "LockHolder":
        return cls(socket.gethostname(), os.getpid(), datetime.now().astimezone().isoformat(timespec="seconds"))

    @classmethod
    def read(cls, lock_file: Path) -> "LockHolder | None":
        """The holder written in `lock_file`; None if the file is missing, empty or not a kdexp lock."""
        try:
            values = json.loads(lock_file.read_text())
            return cls(str(values["host"]), int(values["pid"]), str(values["started"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host} (started {self.started})"

    def is_gone(self) -> bool:
        """True when this holder surely runs no more: a pid of this host that is not alive."""
        return self.host == socket.gethostname() and not _pid_alive(self.pid)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _same_file(handle: IO[str], path: Path) -> bool:
    try:
        opened, named = os.fstat(handle.fileno()), os.stat(path)
    except FileNotFoundError:
        return False
    return (opened.st_dev, opened.st_ino) == (named.st_dev, named.st_ino)


def _write_holder(handle: IO[str], holder: LockHolder) -> None:
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps(asdict(holder)) + "\n")
    handle.flush()
    os.fsync(handle.fileno())


class FolderLock:
    """An exclusive OS lock on a folder's lock file, held until `release` or until the process ends
    (a kill -9 releases it too). `handle` is None where the filesystem has no OS locks."""

    def __init__(self, lock_file: Path, handle: IO[str] | None, holder: LockHolder):
        self.lock_file = lock_file
        self.handle = handle
        self.holder = holder

    def release(self) -> None:
        """Remove the lock file, then unlock: a launch that opened the file meanwhile sees it gone and retries."""
        if self.handle is None:
            if LockHolder.read(self.lock_file) == self.holder:
                _remove_lock_file(self.lock_file)
            return
        if _same_file(self.handle, self.lock_file):
            _remove_lock_file(self.lock_file)
        self.handle.close()
        self.handle = None


def _remove_lock_file(lock_file: Path) -> None:
    """Remove a lock file being released. A folder that refuses it (made read-only meanwhile) keeps it, named
    as this process's: the next launch takes it over, and the error that ended the run is the one reported."""
    try:
        lock_file.unlink(missing_ok=True)
    except OSError as err:
        log.warning("%s could not be removed (%s); the next launch takes it over.", lock_file, err.strerror or err)


def acquire_folder_lock(folder: Path, lock_name: str, instead: str) -> FolderLock:
    """Lock `folder` (its file `lock_name`) for this process, before any work there.

    A lock whose process died is taken over; a live holder gets a one-line `ConfigError` that names
    it and ends with `instead` (what would work, e.g. launching in another folder).
    """
    folder.mkdir(parents=True, exist_ok=True)
    lock_file = folder / lock_name
    for _ in range(20):
        handle = open(lock_file, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in _LOCKED_ERRNOS:
                handle.close()
                return _lock_by_content(folder, lock_file, instead, err)
            replaced = not _same_file(handle, lock_file) or _take_over_orphaned(lock_file)
            handle.close()
            if replaced:
                continue
            raise ConfigError(_in_use(folder, _holder_of(lock_file), instead)) from None
        if not _same_file(handle, lock_file):  # removed or replaced while this launch opened it
            handle.close()
            continue
        previous, holder = LockHolder.read(lock_file), LockHolder.this_process()
        _write_holder(handle, holder)
        if previous is not None and previous.pid != holder.pid:
            log.info("%s: took over the lock of %s, which no longer runs.", folder, previous.describe())
        return FolderLock(lock_file, handle, holder)
    raise ConfigError(f"{lock_file}: could not be locked (it kept being replaced); {instead}")


def _holder_of(lock_file: Path) -> LockHolder | None:
    """The holder named in a locked file (its holder may be writing it this instant: read again briefly)."""
    for _ in range(10):
        holder = LockHolder.read(lock_file)
        if holder is not None:
            return holder
        time.sleep(0.1)
    return None


def _take_over_orphaned(lock_file: Path) -> bool:
    """A lock still held after its process died (by a child that inherited it, such as a data loader
    worker): remove the file so that the next try locks a fresh one. True if it was removed."""
    holder = LockHolder.read(lock_file)
    if holder is None or not holder.is_gone():
        return False
    log.warning("%s is held by a child of %s, which no longer runs; replacing it.", lock_file, holder.describe())
    lock_file.unlink(missing_ok=True)
    return True


def _lock_by_content(folder: Path, lock_file: Path, instead: str, err: OSError) -> FolderLock:
    """Where the filesystem has no OS locks: the holder written in the file guards the folder."""
    holder, me = LockHolder.read(lock_file), LockHolder.this_process()
    if holder is not None and holder.pid != me.pid and not holder.is_gone():
        raise ConfigError(
            _in_use(
                folder, holder, f"{instead} (no OS file locks here: if that process runs no more, delete {lock_file})"
            )
        )
    log.warning(
        "%s: the filesystem offers no file locks (%s); the folder is guarded by %s alone.",
        folder,
        err.strerror or err,
        lock_file.name,
    )
    lock_file.write_text(json.dumps(asdict(me)) + "\n")
    return FolderLock(lock_file, None, me)


def _in_use(folder: Path, holder: LockHolder | None, instead: str) -> str:
    who = holder.describe() if holder is not None else "another process (its lock file names none)"
    return f"{folder} is in use by {who}; {instead}"


_held: dict[Path, FolderLock] = {}  # the folders this process holds, by lock file


def claim_folder(folder: Path, lock_name: str, instead: str) -> bool:
    """Hold `folder` for this process (a no-op in DDP ranks > 0, and for a folder it holds already).

    True when this call took the lock; a `ConfigError` names the live process that holds it.
    """
    if not is_global_zero():
        return False
    lock_file = (Path(folder) / lock_name).resolve()
    if lock_file in _held:
        return False
    _held[lock_file] = acquire_folder_lock(lock_file.parent, lock_name, instead)
    return True


def release_folder(folder: Path, lock_name: str = LOCK_FILE) -> None:
    """Let go of a folder this process holds (nothing if it holds none)."""
    lock = _held.pop((Path(folder) / lock_name).resolve(), None)
    if lock is not None:
        lock.release()


def folder_holder(folder: Path, lock_name: str = LOCK_FILE) -> LockHolder | None:
    """The process named in a folder's lock file (live or not); None if there is no lock file."""
    return LockHolder.read(Path(folder) / lock_name)
