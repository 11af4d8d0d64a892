"""Shared caches and results: a cache that cannot be written (a team's shared cache) is used for what it holds;
a run that needs an entry it lacks says, in one line before any work, where it writes instead; and every file
kdexp writes follows the umask, so that a group can read a shared results folder or cache.

A read-only cache is made two ways: an immutable copy (`chattr -R +i`, which refuses root too; skipped where
chattr is not allowed) and fault injection on the write probe (`KDEXP_FAULT_AT=write_probe:key=cache_dir`
with `KDEXP_FAULT_ACTION=oserror:EROFS`: kdexp.cache.write_refusal tries to write, since root passes every
permission check). Runs are `python -m kdexp.train` subprocesses on the tiny model and GLUE files, compared
with the uninterrupted run of tests/test_step_checkpoints.py.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

from kdexp.cache import cache_for_run, link_entries
from kdexp.errors import OSFailure
from tests.test_os_errors import error_line, files_under, immutable, launch
from tests.test_reproducibility import assert_same_run, finished, tiny_args
from tests.test_step_checkpoints import RUN, straight

__all__ = ["straight"]  # the uninterrupted run every run here is compared with (a session fixture)

PROBE_FAULT = {"fault": "write_probe:key=cache_dir", "action": "oserror:EROFS"}


def shared_copy(straight: dict[str, Path], tmp_path: Path, without: str | None = None) -> Path:
    """A copy of the uninterrupted run's cache (without the folder `without`), as a team would share it."""
    shared = tmp_path / "shared"
    shutil.copytree(straight["cache"], shared, symlinks=True)
    if without:
        shutil.rmtree(shared / without)
    return shared


def read_only(shared: Path, how: str):
    """Make `shared` read-only (`immutable`) for the block, or leave it and inject the probe's refusal (`probe`)."""
    return immutable(shared, recursive=True) if how == "immutable" else nullcontext()


def overlay_line(shared: Path, overlay: Path, linked: int, reason: str) -> str:
    return (
        f"cache_dir={shared} cannot be written ({reason}): this run reads the entries it holds ({linked} files) "
        f"and writes any it lacks to {overlay} instead (KDEXP_CACHE_FALLBACK=<folder> chooses another)."
    )


def entry_files(cache: Path) -> list[Path]:
    """The files of a cache's entries (not its locks)."""
    return sorted(p for p in cache.rglob("*") if (p.is_file() or p.is_symlink()) and not p.name.endswith(".lock"))


REASONS = {"immutable": os.strerror(errno.EPERM), "probe": os.strerror(errno.EROFS)}


@pytest.mark.parametrize("how", ["immutable", "probe"])
def test_a_read_only_cache_that_holds_every_entry_is_read_and_the_run_trains(
    straight: dict[str, Path], tmp_path: Path, how: str
) -> None:
    shared, run_dir = shared_copy(straight, tmp_path), tmp_path / "run"
    before = files_under(shared)
    args = tiny_args(straight["model"], straight["glue"], shared, run_dir, *RUN)
    with read_only(shared, how):
        proc = launch(args, tmp_path, **(PROBE_FAULT if how == "probe" else {}))
    finished(proc)

    overlay = run_dir / "cache"
    log = proc.stdout + proc.stderr
    line = overlay_line(shared, overlay, len(entry_files(shared)), REASONS[how])
    assert line in log and log.index(line) < log.index("Reusing teacher")  # said before any work
    assert files_under(shared) == before  # nothing written, removed or changed in the shared cache
    assert all(p.is_symlink() for p in overlay.rglob("*") if not p.is_dir() and not p.name.endswith(".lock"))
    assert "Fine-tuning teacher" not in log
    assert_same_run(straight["run"], run_dir)


@pytest.mark.parametrize("how", ["immutable", "probe"])
def test_a_read_only_cache_lacking_an_entry_writes_it_where_the_line_said(
    straight: dict[str, Path], tmp_path: Path, how: str
) -> None:
    shared, run_dir = shared_copy(straight, tmp_path, without="signals"), tmp_path / "run"
    fallback = tmp_path / "team-fallback"
    before = files_under(shared)
    args = tiny_args(straight["model"], straight["glue"], shared, run_dir, *RUN)
    with read_only(shared, how):
        proc = launch(args, tmp_path, **(PROBE_FAULT if how == "probe" else {}), KDEXP_CACHE_FALLBACK=str(fallback))
    finished(proc)

    log = proc.stdout + proc.stderr
    line = overlay_line(shared, fallback, len(entry_files(shared)), REASONS[how])
    assert line in log and log.index(line) < log.index("Reusing teacher")
    assert files_under(shared) == before
    assert not (run_dir / "cache").exists()
    written = sorted(p for p in (fallback / "signals" / "teacher_logits").iterdir() if p.suffix == ".pt")
    reference = sorted((straight["cache"] / "signals" / "teacher_logits").glob("*.pt"))
    assert [p.name for p in written] == [p.name for p in reference] and not any(p.is_symlink() for p in written)
    for mine, theirs in zip(written, reference):
        a, b = (torch.load(p, map_location="cpu", weights_only=True)["tensors"]["logits"] for p in (mine, theirs))
        assert torch.equal(a, b)
    assert_same_run(straight["run"], run_dir)


def test_a_read_only_cache_without_a_writable_fallback_is_refused_in_one_line_before_any_work(
    straight: dict[str, Path], tmp_path: Path
) -> None:
    shared, run_dir = shared_copy(straight, tmp_path), tmp_path / "run"
    not_a_folder = tmp_path / "a-file"
    not_a_folder.write_text("")
    args = tiny_args(straight["model"], straight["glue"], shared, run_dir, *RUN)
    proc = launch(args, tmp_path, **PROBE_FAULT, KDEXP_CACHE_FALLBACK=str(not_a_folder / "cache"))
    line = error_line(proc)
    assert line == (
        f"kdexp-train: error: cache_dir={shared} cannot be written (Read-only file system), nor can the "
        f"fallback cache {not_a_folder / 'cache'} (Not a directory); set KDEXP_CACHE_FALLBACK=<a writable "
        f"folder> to read {shared} and write what it lacks there, or choose a writable cache_dir=<folder>."
    )
    log = proc.stdout + proc.stderr
    assert "Reusing teacher" not in log and "Fine-tuning teacher" not in log
    assert not (run_dir / "config.yaml").exists() and not (run_dir / "cache").exists()


# --------------------------------------------------------------------------- the overlay, in this process


def test_the_overlay_links_every_entry_keeps_its_own_and_drops_links_whose_file_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared, run_dir = tmp_path / "shared", tmp_path / "run"
    (shared / "teachers" / "sst2-k" / "model").mkdir(parents=True)
    (shared / "teachers" / "sst2-k" / "model" / "model.safetensors").write_bytes(b"weights")
    (shared / "teachers" / "sst2-k.lock").write_text("")  # a lock: the overlay takes its own
    (shared / "tokenized" / ".abc.x1.tmp").mkdir(parents=True)  # a write in progress: never an entry
    (shared / "signals").mkdir()
    (shared / "signals" / "a.pt").write_bytes(b"a")
    monkeypatch.setenv("KDEXP_FAULT_AT", "write_probe:key=cache_dir")
    monkeypatch.setenv("KDEXP_FAULT_ACTION", "oserror:EACCES")

    overlay = cache_for_run(shared, run_dir)

    assert overlay == run_dir.absolute() / "cache"
    assert sorted(str(p.relative_to(overlay)) for p in overlay.rglob("*")) == [
        "signals",
        "signals/a.pt",
        "teachers",
        "teachers/sst2-k",
        "teachers/sst2-k/model",
        "teachers/sst2-k/model/model.safetensors",
        "tokenized",
    ]
    assert (overlay / "signals" / "a.pt").is_symlink() and (overlay / "signals" / "a.pt").read_bytes() == b"a"
    assert not (overlay / "teachers").is_symlink()  # a folder of the overlay: new entries are written there
    (overlay / "signals" / "a.pt").unlink()  # a damaged entry set aside, then written again by the run
    (overlay / "signals" / "a.pt").write_bytes(b"recomputed")
    (shared / "signals" / "b.pt").write_bytes(b"b")  # the team adds an entry, and removes one
    shutil.rmtree(shared / "teachers" / "sst2-k")
    assert link_entries(shared, overlay) == 1
    assert (overlay / "signals" / "a.pt").read_bytes() == b"recomputed" and (overlay / "signals" / "b.pt").is_symlink()
    assert not os.path.lexists(overlay / "teachers" / "sst2-k" / "model" / "model.safetensors")
    assert (shared / "signals" / "a.pt").read_bytes() == b"a"


def test_a_writable_cache_is_used_as_it_is_and_an_unwritable_fallback_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert cache_for_run(tmp_path / "cache", tmp_path / "run") == tmp_path / "cache"
    assert not (tmp_path / "run").exists()
    monkeypatch.setenv("KDEXP_FAULT_AT", "write_probe:key=cache_dir")
    monkeypatch.setenv("KDEXP_FAULT_ACTION", "oserror:EROFS")
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("KDEXP_CACHE_FALLBACK", str(tmp_path / "a-file"))
    with pytest.raises(
        OSFailure, match=r"nor can the fallback cache .*a-file \(File exists\); set KDEXP_CACHE_FALLBACK"
    ):
        cache_for_run(tmp_path / "cache", tmp_path / "run")


# --------------------------------------------------------------------------- files follow the umask


@pytest.mark.parametrize("umask", [0o002, 0o022], ids=["umask-002", "umask-022"])
def test_every_file_a_run_writes_follows_the_umask(straight: dict[str, Path], tmp_path: Path, umask: int) -> None:
    cache, run_dir = tmp_path / "cache", tmp_path / "run"  # a cold cache: its entries are written under this umask
    args = tiny_args(straight["model"], straight["glue"], cache, run_dir, "method=vanilla_kd", "trainer.max_epochs=1")
    finished(launch(args, tmp_path, umask=umask))

    file_mode, folder_mode = 0o666 & ~umask, 0o777 & ~umask
    [teacher] = [p for p in (cache / "teachers").iterdir() if p.is_dir()]
    named = [
        run_dir / "results.json",
        run_dir / "student" / "model.safetensors",
        run_dir / "config.yaml",
        run_dir / "metrics.csv",
        teacher / "model" / "model.safetensors",
        next((cache / "signals" / "teacher_logits").glob("*.pt")),
        next((cache / "tokenized").glob("*/*.arrow")),
    ]
    for path in named:
        assert stat.S_IMODE(path.stat().st_mode) == file_mode, f"{path}: {oct(stat.S_IMODE(path.stat().st_mode))}"
    for path in [run_dir, cache, *run_dir.rglob("*"), *cache.rglob("*")]:  # and every other file and folder
        mode = stat.S_IMODE(path.lstat().st_mode)
        assert mode == (folder_mode if path.is_dir() else file_mode), f"{path}: {oct(mode)}"
