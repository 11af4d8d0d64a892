"""The errors a user can cause. Each message names the key, file or line and says what would work.

`kdexp-train` prints a `KdexpError` as one line and exits non-zero, before any expensive
work where the error can be known early (`HYDRA_FULL_ERROR=1` shows the traceback).

A refusal of the operating system to write (no space left, permission denied, a read-only file
system) is an `OSFailure`, one mechanism for every write: kdexp's own write helpers (kdexp.cache)
raise it naming the file they were writing, and `kdexp-train` turns the same errors raised
elsewhere (Lightning's checkpoints, datasets' `save_to_disk`, Hydra's own files) into it, naming
the exception's path (`os_failures_reported`).
"""

from __future__ import annotations

import errno as errnos
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kdexp.faults import maybe_fail


class KdexpError(ValueError):
    """Base of every error caused by the user's config, data or models."""


class ConfigError(KdexpError):
    """A config value that cannot work: names the key and what would."""


class DataError(KdexpError):
    """Bad input data: names the file (and line) and what would work."""


class ModelError(KdexpError):
    """A model that cannot be found or built: names the key and what would work."""


# --------------------------------------------------------------------------- refusals of the operating system

NO_SPACE = (errnos.ENOSPC, errnos.EDQUOT)
NO_PERMISSION = (errnos.EACCES, errnos.EPERM)
READ_ONLY = (errnos.EROFS,)
OS_FAILURE_ERRNOS = NO_SPACE + NO_PERMISSION + READ_ONLY

_folder_keys: dict[Path, str] = {}  # a folder this process writes under -> the setting that chose it


class OSFailure(KdexpError):
    """A write the operating system refused (no space left, permission denied, a read-only file system).

    The message names the path and what would work: free space, make it writable, or choose another
    folder with the setting that chose it (`hydra.run.dir=`, `cache_dir=`, ...). `errno` and `path`
    hold the error's number and the path named (None where the error named none).
    """

    def __init__(self, message: str, errno: int, path: str | None):
        super().__init__(message)
        self.errno = errno
        self.path = path


def name_folder(folder: str | Path, key: str) -> None:
    """Remember that this process writes under `folder`, chosen by `key` (`hydra.run.dir`, `cache_dir`, an
    environment variable): an OS failure under it says to choose another folder with `key=`."""
    _folder_keys[Path(folder).absolute()] = key


def _key_of(path: str) -> str | None:
    """The setting that chose the folder holding `path` (the innermost named folder), if any."""
    target = Path(path).absolute()
    holders = [folder for folder in _folder_keys if folder == target or folder in target.parents]
    if holders:
        return _folder_keys[max(holders, key=lambda folder: len(folder.parts))]
    if target.parent == Path(tempfile.gettempdir()).absolute():  # a library's temporary file (Lightning's checkpoints)
        return "TMPDIR"
    return None


def _elsewhere(path: str | None) -> str:
    key = _key_of(path) if path else None
    if key is not None:
        return f"choose another folder with {key}=<folder>"
    temporary = "" if path else ", TMPDIR=<folder> (temporary files)"
    return (
        f"choose another folder with hydra.run.dir=<folder> (the run's files) or cache_dir=<folder> (the cache)"
        f"{temporary}"
    )


def _remedy(code: int, path: str | None) -> str:
    elsewhere = _elsewhere(path)
    if code in NO_SPACE:
        return f"free space on its file system (or raise the quota), or {elsewhere}"
    if code in READ_ONLY:
        return f"its file system is mounted read-only: {elsewhere}"
    return f"make it writable (its owner and mode, or an immutable flag: lsattr, chattr -i), or {elsewhere}"


def os_failure(code: int, path: str | Path | None, reason: str | None = None) -> OSFailure:
    """The one-line `OSFailure` for error number `code` at `path` (None: the error named no path)."""
    name = errnos.errorcode.get(code, str(code))
    path = str(path) if path is not None else None
    if path is None:
        folders = ", ".join(f"{folder} ({key})" for folder, key in _folder_keys.items()) or "the run's folders"
        where = f"a write failed (the error names no path; this run writes under {folders} and {tempfile.gettempdir()})"
    else:
        where = path
    return OSFailure(f"{where}: {reason or os.strerror(code)} ({name}); {_remedy(code, path)}.", code, path)


# Libraries that wrap an OS error in their own exception: safetensors (Rust) says "... (os error 28) at
# path "/x/y"", torch's file writer "... open file failed with strerror: Operation not permitted".
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")
_TORCH_STRERROR = re.compile(r"strerror: ([^\n]+)")
_QUOTED_PATH = re.compile(r'at path "([^"]+)"')


def _errno_in_text(text: str) -> int | None:
    """The OS error number a library's message reports, if it is one of `OS_FAILURE_ERRNOS`."""
    match = _RUST_OS_ERROR.search(text)
    if match:
        code = int(match.group(1))
        return code if code in OS_FAILURE_ERRNOS else None
    match = _TORCH_STRERROR.search(text)
    if match:
        return next((code for code in OS_FAILURE_ERRNOS if os.strerror(code) in match.group(1)), None)
    return None


def os_failure_of(err: BaseException, writing: str | Path | None = None) -> OSFailure | None:
    """`err` as an `OSFailure` if it is, or was caused by, an OS refusal to write; None otherwise.

    `writing` is the file or folder the caller was writing: it is named, unless the error names a path
    that is neither it nor its temporary sibling (a file read elsewhere, say). Looks through the
    exception's causes and contexts, and into the messages of libraries that wrap an OS error.
    """
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSFailure):
            return current
        if isinstance(current, OSError) and current.errno is not None:
            if current.errno not in OS_FAILURE_ERRNOS:
                return None
            named = current.filename if current.filename is not None else current.filename2
            return os_failure(current.errno, _path_to_name(writing, named), current.strerror)
        code = None if isinstance(current, OSError) else _errno_in_text(str(current))
        if code is not None:
            quoted = _QUOTED_PATH.search(str(current))
            return os_failure(code, _path_to_name(writing, quoted.group(1) if quoted else None))
        current = current.__cause__ or current.__context__
    return None


def _path_to_name(writing: str | Path | None, named: object) -> str | None:
    """The path the one line names: `writing` when the error named no path, or named `writing`, a path
    inside it, or its temporary sibling (`.<name>.*`) or a path inside that; else the path the error named."""
    named_path = os.fsdecode(named) if isinstance(named, (str, bytes, os.PathLike)) else None
    if writing is None:
        return named_path
    writing = Path(writing).absolute()
    if named_path is None:
        return str(writing)
    try:
        first = Path(named_path).absolute().relative_to(writing.parent).parts[0]
    except (ValueError, IndexError):
        return named_path
    return str(writing) if first == writing.name or first.startswith(f".{writing.name}.") else named_path


@contextmanager
def os_failures_reported(writing: str | Path | None = None) -> Iterator[None]:
    """Re-raise an OS refusal to write in the block as an `OSFailure` (naming `writing`, the file or folder
    being written, where given: see `os_failure_of`); any other exception passes unchanged."""
    try:
        yield
    except KdexpError:
        raise
    except Exception as err:
        failure = os_failure_of(err, writing)
        if failure is None:
            raise
        raise failure from err


WRITE_PROBE = ".kdexp-write-probe-"


def write_refusal(folder: Path, key: str) -> OSError | None:
    """Why `folder` cannot be written, or None if it can: creates it if needed, then a probe file in it.

    Tried, not asked: root passes every permission check (`os.access`) yet cannot write an immutable folder
    or a read-only file system. `key` names the setting that chose the folder (fault point `write_probe`).
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        maybe_fail("write_probe", key=key, path=str(folder))
        fd, probe = tempfile.mkstemp(prefix=WRITE_PROBE, dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        return err
    return None
