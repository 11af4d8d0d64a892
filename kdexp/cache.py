"""Content-addressed artifacts on disk: keys from their inputs, atomic writes, validated reads.

Every artifact (a fine-tuned teacher, tokenised data, teacher logits, decision counts) is
stored under a key hashed from everything that determines it. Writes go to a temporary
path in the same folder and are renamed into place, so a killed run never leaves a file
or folder that a later run would take as complete.

The write helpers (`atomic_write_text`/`_json`, `save_tensors`, `atomic_torch_save`,
`atomic_directory`, `replaced_directory`, `publish_folder`) serve the run folder too. If the
operating system refuses a write (no space left, permission denied, a read-only file system),
the temporary file or folder is removed, nothing appears under the final name (a file already
there stays as it was), and the error is a one-line `kdexp.errors.OSFailure` naming the final
path and what would work. Every file and folder they write gets the mode a plain create would
have under the process umask (`shareable`).

A cache that cannot be written (a team's shared cache) is used for what it holds:
`cache_for_run` gives the run an overlay folder that links to its files and takes every entry
it lacks ($KDEXP_CACHE_FALLBACK, else `<run folder>/cache`), and says so in one line before any
work.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, TypeVar

import torch

from kdexp.errors import (
    WRITE_PROBE,
    OSFailure,
    name_folder,
    os_failures_reported,
    write_refusal,
)
from kdexp.faults import file_point, maybe_fail
from kdexp.hardware import is_global_zero
from kdexp.seeding import preserved_rng

if TYPE_CHECKING:
    from kdexp.hardware import Hardware

log = logging.getLogger(__name__)

T = TypeVar("T")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def shareable(path: Path) -> None:
    """Give a file or folder, and everything in the folder, the mode a plain create would have under the
    process umask (`mkstemp` and `mkdtemp` use 0600/0700, safetensors writes 0600), so that a cache or a
    results folder shared by a group stays readable by the group. Links are left alone: their mode is their
    target's (the overlay of a read-only cache links to files it must not touch)."""
    _give_plain_mode(path)
    if path.is_dir() and not path.is_symlink():
        for child in path.rglob("*"):
            _give_plain_mode(child)


def _give_plain_mode(path: Path) -> None:
    if not path.is_symlink():
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~_umask())


def _canonical(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    # OmegaConf containers and other mappings
    if hasattr(value, "items"):
        return _canonical(dict(value.items()))
    raise TypeError(f"cannot build a cache key from a value of type {type(value).__name__}")


def cache_key(**parts: Any) -> str:
    """A short stable hash of the given inputs (order of keyword arguments does not matter)."""
    payload = json.dumps(_canonical(parts), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:20]


def _tmp_sibling(path: Path, suffix: str = "") -> Path:
    """A new empty temporary file next to `path` (`.<name>.<random>.tmp`: never taken for an entry)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=path.parent)
    os.close(fd)
    return Path(name)


def _discard(tmp: Path) -> None:
    """Remove a temporary file or folder if it is still there; a failure to remove it is only logged, so
    that it never hides the error that stopped the write."""
    try:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp)
        else:
            tmp.unlink(missing_ok=True)
    except OSError as err:
        log.warning("Could not remove the temporary %s (%s); it can be deleted.", tmp, err.strerror or err)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` whole or not at all (see the module docstring: an `OSFailure` names `path`)."""
    path = Path(path)
    with os_failures_reported(path):
        tmp = _tmp_sibling(path)
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                maybe_fail("write", **file_point(path))
                os.fsync(f.fileno())
            shareable(tmp)
            os.replace(tmp, path)
        finally:
            _discard(tmp)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_torch_save(path: str | Path, obj: Any) -> None:
    """`torch.save(obj)` to `path` whole or not at all (see the module docstring: an `OSFailure` names `path`).

    Written through a Python file, so that a full disk is an `OSError` (torch's own writer, given a path,
    reports it as a RuntimeError without the error's number)."""
    path = Path(path)
    with os_failures_reported(path):
        tmp = _tmp_sibling(path)
        try:
            with open(tmp, "wb") as f:
                torch.save(obj, f)
                f.flush()
                maybe_fail("write", **file_point(path))
            shareable(tmp)
            os.replace(tmp, path)
        finally:
            _discard(tmp)


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Atomically save named tensors together with the metadata that validates them."""
    atomic_torch_save(path, {"meta": meta, "tensors": tensors})


def load_tensors(path: str | Path, expected_meta: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """Load tensors saved by `save_tensors`, or None when missing, unreadable or mismatched.

    The tensors are memory-mapped from the file: a [CLS] cache or an MLM store of a full-size task is
    read from disk as rows are used, not copied into memory. A corrupt or mismatched entry is reported
    and removed, so that the caller recomputes it.
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        meta, tensors = payload["meta"], payload["tensors"]
    except Exception as err:  # a truncated or foreign file
        log.warning("Cache entry %s is unreadable (%s); recomputing it.", path, err)
        path.unlink(missing_ok=True)
        return None
    mismatched = {k: (meta.get(k), v) for k, v in expected_meta.items() if meta.get(k) != v}
    if mismatched:
        log.warning("Cache entry %s does not match its key %s; recomputing it.", path, mismatched)
        path.unlink(missing_ok=True)
        return None
    return tensors


def _tmp_folder_beside(final: Path) -> Path:
    """A new empty temporary folder next to `final` (`.<name>.<random>.tmp`)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))


@contextmanager
def atomic_directory(final: str | Path) -> Iterator[Path]:
    """Yield a temporary folder that becomes `final` only if the block finishes.

    If another process completed `final` meanwhile, its copy is kept and ours dropped. An OS error in
    the block or in the rename is an `OSFailure` naming `final`; the temporary folder is removed.
    """
    final = Path(final)
    with os_failures_reported(final):
        tmp = _tmp_folder_beside(final)
    try:
        with os_failures_reported(final):
            yield tmp
            maybe_fail("write", **file_point(final))
            shareable(tmp)
            try:
                os.rename(tmp, final)
            except OSError:
                if not final.exists():
                    raise
                log.info("%s was completed by another process; keeping that copy.", final)
    finally:
        _discard(tmp)


@contextmanager
def replaced_directory(final: str | Path) -> Iterator[Path]:
    """Yield a temporary folder that replaces `final` (a run's own output folder, written again by a rerun:
    the student) only if the block finishes; until then `final` stays as it was, or absent.

    An OS error in the block or in the swap is an `OSFailure` naming `final`; the temporary folder is removed.
    """
    final = Path(final)
    with os_failures_reported(final):
        tmp = _tmp_folder_beside(final)
    try:
        with os_failures_reported(final):
            yield tmp
            maybe_fail("write", **file_point(final))
            shareable(tmp)
            _swap_in(tmp, final)
    finally:
        _discard(tmp)


def _swap_in(new: Path, final: Path) -> None:
    """Rename the folder `new` to `final`; a `final` already there is moved aside first (under a temporary
    name), put back if the rename fails, and removed once `new` is in place."""
    if not final.exists():
        os.rename(new, final)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old.tmp", dir=final.parent))
    try:
        os.rename(final, old / final.name)
    except OSError:
        _discard(old)
        raise
    try:
        os.rename(new, final)
    except OSError:
        os.rename(old / final.name, final)  # if even this fails, the old folder stays in `old`
        _discard(old)
        raise
    _discard(old)


def publish_folder(partial: Path, final: Path, is_complete: Callable[[Path], bool]) -> None:
    """Rename a finished `partial` folder to `final` (group-readable); if another process published
    a complete `final` meanwhile, keep that one and drop ours. An OS error is an `OSFailure`; `partial`
    stays (a stage resumes from it)."""
    with os_failures_reported(final):
        maybe_fail("write", **file_point(final))
        shareable(partial)
        try:
            os.rename(partial, final)
        except OSError:
            if not is_complete(final):
                raise
            shutil.rmtree(partial, ignore_errors=True)


@contextmanager
def exclusive_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on `path` (created if needed) for the block.

    Lets parallel sweep jobs share a cache: the first builds an artifact, the others wait.
    """
    path = Path(path)
    with os_failures_reported(path):
        path.parent.mkdir(parents=True, exist_ok=True)
    with os_failures_reported(path), open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def load_or_compute(path: str | Path, load: Callable[[], T | None], compute: Callable[[], T]) -> T:
    """`load()` if it finds a valid entry, else `compute()` (which stores it) once across processes.

    The miss path holds an exclusive lock on `<path>.lock` and looks again inside it, so parallel
    sweep jobs that need the same artifact compute it once and the others wait and read it.
    `compute()` runs with the global RNG states preserved: whether it ran (cold cache) or not
    (warm cache) does not change the random numbers drawn after it. Under DDP only global rank 0
    computes; the other processes wait for its entry (`wait_for_rank_zero`).
    """
    value = load()
    if value is not None:
        return value
    if not is_global_zero():
        return wait_for_rank_zero(path, load)
    with exclusive_lock(str(path) + ".lock"):
        value = load()
        if value is not None:
            log.info("%s was computed by another process meanwhile; reusing it.", path)
            return value
        with preserved_rng():
            return compute()


def load_or_compute_together(
    path: str | Path,
    load: Callable[[], T | None],
    compute: Callable[[], T],
    store: Callable[[T], None],
    hardware: "Hardware",
) -> T:
    """`load_or_compute` for a pass that every DDP process takes part in.

    `compute()` runs in every process (each does its share of the batches and returns the whole
    result, `Hardware.combine_rows`), unless every process finds the entry; global rank 0 then
    `store`s it. With one process this is `load_or_compute` with `store` after `compute`.
    """

    def compute_and_store() -> T:
        value = compute()
        store(value)
        return value

    if hardware.world_size == 1:
        return load_or_compute(path, load, compute_and_store)
    value = load()
    if hardware.all_true(value is not None):
        assert value is not None
        return value
    with preserved_rng():
        value = compute()
    if hardware.is_global_zero:
        with exclusive_lock(str(path) + ".lock"):
            store(value)
    hardware.barrier()  # the entry exists before any process goes on to read it
    return value


WAIT_LOG_SECONDS = 300.0


def wait_for_rank_zero(what: str | Path, load: Callable[[], T | None], poll_seconds: float = 2.0) -> T:
    """Poll `load()` until global rank 0 has stored `what` (a DDP process other than the first).

    Polling, not a collective: a stage may take hours (a teacher's fine-tuning), longer than a
    process group's timeout. Stops if the process that started this one is gone.
    """
    parent = os.getppid()
    started = last_log = time.monotonic()
    log.info("Waiting for global rank 0 to compute %s", what)
    while True:
        value = load()
        if value is not None:
            return value
        if os.getppid() != parent:
            raise RuntimeError(f"the process that launched this one exited before it computed {what}")
        now = time.monotonic()
        if now - last_log > WAIT_LOG_SECONDS:
            log.info("Still waiting for global rank 0 to compute %s (%.0f s)", what, now - started)
            last_log = now
        time.sleep(poll_seconds)


# --------------------------------------------------------------------------- a cache that cannot be written

CACHE_FALLBACK_ENV = "KDEXP_CACHE_FALLBACK"
FALLBACK_CACHE = "cache"  # the default fallback: <run folder>/cache


def fallback_cache(run_dir: Path) -> tuple[Path, str]:
    """Where a run writes the cache entries a read-only `cache_dir` lacks, and the setting that chose it:
    $KDEXP_CACHE_FALLBACK if set, else `<run folder>/cache`."""
    chosen = os.environ.get(CACHE_FALLBACK_ENV)
    if chosen:
        return Path(chosen).absolute(), CACHE_FALLBACK_ENV
    return Path(run_dir).absolute() / FALLBACK_CACHE, "hydra.run.dir"


def cache_for_run(cache_dir: Path, run_dir: Path, announce: bool = True) -> Path:
    """The folder this run's cache stages use: `cache_dir` itself where it can be written.

    A `cache_dir` that cannot be written (a team's shared cache: no permission, immutable, a read-only file
    system) is used for what it holds through an overlay (`fallback_cache`) that links to each of its files
    (`link_entries`) and takes every entry it lacks; with `announce`, one line says so before any work. An
    `OSFailure` in one line if the overlay cannot be written either.
    """
    refusal = write_refusal(cache_dir, "cache_dir")
    if refusal is None:
        name_folder(cache_dir, "cache_dir")
        return cache_dir
    overlay, key = fallback_cache(run_dir)
    overlay_refusal = write_refusal(overlay, key)
    if overlay_refusal is not None:
        raise _no_writable_cache(cache_dir, refusal, overlay, overlay_refusal)
    name_folder(overlay, key)
    with os_failures_reported(overlay):
        linked = link_entries(cache_dir, overlay) if cache_dir.is_dir() else None
    if announce:
        log.warning(_overlay_line(cache_dir, refusal, overlay, linked))
    return overlay


def _overlay_line(cache_dir: Path, refusal: OSError, overlay: Path, linked: int | None) -> str:
    """The one line that says where a run with a read-only cache writes (`linked`: files read from it; None
    where `cache_dir` does not exist)."""
    instead = f"{overlay} instead ({CACHE_FALLBACK_ENV}=<folder> chooses another)"
    if linked is None:
        return f"cache_dir={cache_dir} cannot be created ({_reason(refusal)}): this run writes its cache to {instead}."
    return (
        f"cache_dir={cache_dir} cannot be written ({_reason(refusal)}): this run reads the entries it holds "
        f"({linked} files) and writes any it lacks to {instead}."
    )


def _reason(err: OSError) -> str:
    return err.strerror or str(err)


def _no_writable_cache(cache_dir: Path, refusal: OSError, overlay: Path, overlay_refusal: OSError) -> OSFailure:
    code = overlay_refusal.errno or refusal.errno or 0
    return OSFailure(
        f"cache_dir={cache_dir} cannot be written ({_reason(refusal)}), nor can the fallback cache "
        f"{overlay} ({_reason(overlay_refusal)}); set {CACHE_FALLBACK_ENV}=<a writable folder> to read "
        f"{cache_dir} and write what it lacks there, or choose a writable cache_dir=<folder>.",
        code,
        str(overlay),
    )


def _is_temporary(name: str) -> bool:
    """A file or folder of a write in progress (or cut short), a lock or a write probe: never an entry."""
    return (name.startswith(".") and name.endswith(".tmp")) or name.endswith(".lock") or name.startswith(WRITE_PROBE)


def link_entries(shared: Path, overlay: Path) -> int:
    """Make `overlay` show every entry of the read-only cache `shared`: its folders as folders of the overlay
    (so that whatever a run writes goes there: a new entry, a damaged entry set aside), its files as links to
    them (read in place, never copied or changed). Locks and temporary files are left out; what the overlay
    holds of its own is kept; a link whose file left `shared` is removed. Returns the number of files of
    `shared` the overlay links to."""
    linked = 0
    for folder, subfolders, files in os.walk(shared):
        into = overlay / Path(folder).relative_to(shared)
        if os.path.lexists(into) and (into.is_symlink() or not into.is_dir()):
            subfolders[:] = []  # the overlay holds its own entry here
            continue
        into.mkdir(exist_ok=True)
        subfolders[:] = [name for name in subfolders if not _is_temporary(name)]
        linked += sum(_link(Path(folder) / name, into / name) for name in files if not _is_temporary(name))
    _remove_broken_links(overlay)
    return linked


def _link(target: Path, link: Path) -> bool:
    """Link `link` to `target` unless the overlay has it already; True if `link` is (now) that link."""
    if not os.path.lexists(link):
        try:
            link.symlink_to(target)
        except FileExistsError:  # another process of this run linked it meanwhile
            pass
    return link.is_symlink() and os.readlink(link) == str(target)


def _remove_broken_links(overlay: Path) -> None:
    for path in overlay.rglob("*"):
        if path.is_symlink() and not path.exists():
            path.unlink(missing_ok=True)
