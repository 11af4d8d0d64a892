"""Content-addressed artifacts on disk: keys from their inputs, atomic writes, validated reads.

Every artifact (a fine-tuned teacher, tokenised data, teacher logits, decision counts) is
stored under a key hashed from everything that determines it. Writes go to a temporary
path in the same folder and are renamed into place, so a killed run never leaves a file
or folder that a later run would take as complete.
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
    """Give a file or folder the mode a plain create would have (`mkstemp` and `mkdtemp` use 0600/0700),
    so that a cache shared by a group stays readable by the group."""
    mode = 0o777 if path.is_dir() else 0o666
    os.chmod(path, mode & ~_umask())
    if path.is_dir():
        for child in path.rglob("*"):
            os.chmod(child, (0o777 if child.is_dir() else 0o666) & ~_umask())


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
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=path.parent)
    os.close(fd)
    return Path(name)


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = _tmp_sibling(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        shareable(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Atomically save named tensors together with the metadata that validates them."""
    path = Path(path)
    tmp = _tmp_sibling(path)
    try:
        torch.save({"meta": meta, "tensors": tensors}, tmp)
        shareable(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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


@contextmanager
def atomic_directory(final: str | Path) -> Iterator[Path]:
    """Yield a temporary folder that becomes `final` only if the block finishes.

    If another process completed `final` meanwhile, its copy is kept and ours dropped.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        shareable(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.exists():
                raise
            log.info("%s was completed by another process; keeping that copy.", final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def publish_folder(partial: Path, final: Path, is_complete: Callable[[Path], bool]) -> None:
    """Rename a finished `partial` folder to `final` (group-readable); if another process published
    a complete `final` meanwhile, keep that one and drop ours."""
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
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
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


def load_or_compute_together(path: str | Path, load: Callable[[], T | None], compute: Callable[[], T],
                             store: Callable[[T], None], hardware: "Hardware") -> T:
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
