"""OS errors (no space left, permission denied, a read-only file system) wherever a run writes: one line that
names the path and what to do, exit status 2, and no partial file under a final name; the rerun, once the
fault is gone, ends as an uninterrupted run (metrics, step log, student weights).

Fault injection (kdexp.faults): `KDEXP_FAULT_ACTION=oserror:<ERRNO>` raises the OSError the OS would, at
kdexp's own writes (`write:file=...`, `write:dir=...`: once the content is in the temporary file or folder,
before its rename) and at a library's (`open:file=...`: an audit hook on Python's open and rename, which
reaches Lightning's checkpoints and Hydra's own files). The tests run as root, which ignores permission
bits: permission denied (EACCES) is injected, never produced with chmod. An immutable folder (`chattr +i`)
refuses root too (EPERM): the tests that use one are skipped where chattr is not allowed.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from kdexp.cache import (
    atomic_directory,
    atomic_write_json,
    atomic_write_text,
    publish_folder,
    replaced_directory,
    save_tensors,
)
from kdexp.errors import OSFailure, name_folder, os_failure_of
from tests.test_reproducibility import assert_same_run, finished, killed, tiny_args
from tests.test_step_checkpoints import RUN, straight

__all__ = ["straight"]  # the uninterrupted run every rerun is compared with (a session fixture)

REMEDY = {
    errno.ENOSPC: "free space on its file system (or raise the quota), or choose another folder with",
    errno.EACCES: "make it writable (its owner and mode, or an immutable flag: lsattr, chattr -i), or choose "
    "another folder with",
    errno.EPERM: "make it writable (its owner and mode, or an immutable flag: lsattr, chattr -i), or choose "
    "another folder with",
    errno.EROFS: "its file system is mounted read-only: choose another folder with",
}


# --------------------------------------------------------------------------- helpers shared with test_shared_cache


def launch(
    args: list[str], cwd: Path, fault: str | None = None, action: str | None = None, umask: int = -1, **env_vars: str
) -> subprocess.CompletedProcess:
    """`python -m kdexp.train ARGS`, with a fault (`KDEXP_FAULT_AT`, `KDEXP_FAULT_ACTION`) and a umask if given."""
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        WANDB_MODE="offline",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        **env_vars,
    )
    for name in ("KDEXP_FAULT_AT", "KDEXP_FAULT_ACTION"):
        env.pop(name, None)
    if fault:
        env["KDEXP_FAULT_AT"] = fault
    if action:
        env["KDEXP_FAULT_ACTION"] = action
    return subprocess.run(
        [sys.executable, "-m", "kdexp.train", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        umask=umask,
        check=False,
    )


def error_line(proc: subprocess.CompletedProcess, status: int = 2) -> str:
    """The one line a refused run prints; the exit status checked, and no traceback."""
    log = proc.stdout + proc.stderr
    assert proc.returncode == status, log[-5000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("kdexp-train:")]
    assert len(lines) == 1, log[-5000:]
    assert "Traceback" not in log, log[-5000:]
    return lines[0]


def expected_line(path: Path, code: int, key: str) -> str:
    return f"kdexp-train: error: {path}: {os.strerror(code)} ({errno.errorcode[code]}); {REMEDY[code]} {key}=<folder>."


def files_under(*folders: Path) -> dict[Path, str]:
    """Every file under the folders (links as links) and its sha256."""
    found: dict[Path, str] = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")) if folder.exists() else []:
            if path.is_symlink():
                found[path] = "link:" + os.readlink(path)
            elif path.is_file():
                found[path] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def temporary_leftovers(*folders: Path) -> list[Path]:
    """Files or folders of a write that did not finish (`.<name>.<random>.tmp`, `<name>.tmp`)."""
    return [path for folder in folders if folder.exists() for path in folder.rglob("*") if path.name.endswith(".tmp")]


def assert_whole(path: Path) -> None:
    """`path` reads as the whole file of its kind (a cut-off JSON, CSV, YAML, tensors or checkpoint does not)."""
    if path.suffix == ".json":
        json.loads(path.read_text())
    elif path.suffix == ".csv":
        rows = list(csv.reader(path.read_text().splitlines()))
        assert rows and all(len(row) == len(rows[0]) for row in rows), f"{path} is cut short"
    elif path.suffix == ".yaml":
        yaml.safe_load(path.read_text())
    elif path.suffix == ".safetensors":
        load_file(str(path))
    elif path.suffix in (".pt", ".ckpt"):
        torch.load(path, map_location="cpu", weights_only=False)


def assert_no_partial_file(*folders: Path) -> None:
    """No temporary file is left, and every file under a final name is whole."""
    assert not temporary_leftovers(*folders), temporary_leftovers(*folders)
    for path in files_under(*folders):
        if not path.is_symlink() and ".hydra" not in path.parts:
            assert_whole(path)


@contextmanager
def immutable(folder: Path, recursive: bool = False) -> Iterator[None]:
    """`folder` (and all it holds, with `recursive`) made immutable with chattr, which refuses root too;
    the test is skipped where chattr is not allowed."""
    flag = ["-R"] if recursive else []
    made = subprocess.run(["chattr", *flag, "+i", str(folder)], capture_output=True, text=True, check=False)
    if made.returncode != 0:
        subprocess.run(["chattr", "-R", "-i", str(folder)], capture_output=True, check=False)
        pytest.skip(f"chattr +i is not allowed here ({made.stderr.strip()})")
    try:
        yield
    finally:
        subprocess.run(["chattr", *flag, "-i", str(folder)], check=True)


# --------------------------------------------------------------------------- the write helpers, in this process

FINAL_TEXT = "the previous, whole content\n"


def write_with(helper: str, final: Path) -> None:
    """Write `final` with one of kdexp.cache's helpers."""
    if helper == "atomic_write_text":
        atomic_write_text(final, "x" * 100_000)
    elif helper == "atomic_write_json":
        atomic_write_json(final, {"rows": list(range(10_000))})
    elif helper == "save_tensors":
        save_tensors(final, {"t": torch.arange(10_000)}, {"key": "k"})
    elif helper in ("atomic_directory", "replaced_directory"):
        with (atomic_directory if helper == "atomic_directory" else replaced_directory)(final) as tmp:
            (tmp / "weights.bin").write_bytes(b"w" * 100_000)
    elif helper == "publish_folder":
        partial = final.with_name(final.name + ".partial")
        partial.mkdir()
        (partial / "weights.bin").write_bytes(b"w" * 100_000)
        publish_folder(partial, final, lambda folder: (folder / "weights.bin").exists())


HELPERS = [
    "atomic_write_text",
    "atomic_write_json",
    "save_tensors",
    "atomic_directory",
    "replaced_directory",
    "publish_folder",
]
CODES = [errno.ENOSPC, errno.EACCES, errno.EPERM, errno.EROFS]


@pytest.mark.parametrize("code", CODES, ids=[errno.errorcode[c] for c in CODES])
@pytest.mark.parametrize("helper", HELPERS)
def test_each_write_helper_fails_in_one_line_and_leaves_the_final_name_as_it_was(
    helper: str, code: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "cache"
    folder.mkdir()
    name_folder(folder, "cache_dir")
    final = folder / ("entry" if "directory" in helper or "folder" in helper else "entry.json")
    if helper == "replaced_directory":  # a rerun's student replaces the previous one: that one stays on failure
        final.mkdir()
        (final / "weights.bin").write_text(FINAL_TEXT)
    elif "directory" not in helper and "folder" not in helper:
        final.write_text(FINAL_TEXT)
    before = files_under(folder)
    monkeypatch.setenv("KDEXP_FAULT_AT", f"write:file={final.name}")
    monkeypatch.setenv("KDEXP_FAULT_ACTION", f"oserror:{errno.errorcode[code]}")

    with pytest.raises(OSFailure) as failure:
        write_with(helper, final)

    message = str(failure.value)
    assert "\n" not in message and failure.value.errno == code
    assert message == f"{final}: {os.strerror(code)} ({errno.errorcode[code]}); {REMEDY[code]} cache_dir=<folder>."
    after = files_under(folder)
    if helper == "publish_folder":  # the finished partial folder stays, for the stage to publish on its rerun
        assert set(after) - set(before) == {final.with_name("entry.partial") / "weights.bin"}
        assert not final.exists()
    else:
        assert after == before  # no temporary file left; the final name absent or as it was
    monkeypatch.delenv("KDEXP_FAULT_AT")
    if helper == "publish_folder":
        shutil.rmtree(final.with_name("entry.partial"))
    write_with(helper, final)  # the fault gone: written whole
    assert not temporary_leftovers(folder) and final.exists()


def test_a_real_immutable_folder_refuses_each_helper_in_one_line(tmp_path: Path) -> None:
    folder = tmp_path / "shared"
    folder.mkdir()
    (folder / "entry.json").write_text(FINAL_TEXT)
    before = files_under(folder)
    with immutable(folder):
        for helper in ("atomic_write_text", "save_tensors", "atomic_directory", "replaced_directory"):
            final = folder / ("entry" if "directory" in helper else "entry.json")
            with pytest.raises(OSFailure) as failure:
                write_with(helper, final)
            assert str(failure.value).startswith(f"{final}: Operation not permitted (EPERM); make it writable")
        assert files_under(folder) == before


def test_errors_that_wrap_an_os_error_are_recognised_and_others_are_not(tmp_path: Path) -> None:
    no_space = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "a.ckpt"))
    assert os_failure_of(no_space).path == str(tmp_path / "a.ckpt")
    wrapped = ValueError("Unable to configure handler 'file'")  # Hydra's log file, through logging.config
    wrapped.__cause__ = PermissionError(errno.EACCES, "Permission denied", "/runs/x/train.log")
    assert os_failure_of(wrapped).path == "/runs/x/train.log"
    rust = Exception('Error while serializing: I/O error: No space left on device (os error 28) at path "/c/m.tmp"')
    assert (os_failure_of(rust).errno, os_failure_of(rust).path) == (errno.ENOSPC, "/c/m.tmp")
    torch_writer = RuntimeError(
        "[enforce fail at inline_container.cc:747] . open file failed with strerror: Read-only file system"
    )
    assert os_failure_of(torch_writer, tmp_path / "x.pt").errno == errno.EROFS
    # the temporary sibling of the file being written is named as that file; a path elsewhere as itself
    sibling = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / ".x.pt.abc.tmp"))
    assert os_failure_of(sibling, tmp_path / "x.pt").path == str(tmp_path / "x.pt")
    elsewhere = OSError(errno.EACCES, "Permission denied", "/data/train.tsv")
    assert os_failure_of(elsewhere, tmp_path / "x.pt").path == "/data/train.tsv"
    name_folder(tmp_path / "run", "hydra.run.dir")
    unnamed = str(os_failure_of(OSError(errno.ENOSPC, "No space left on device")))  # Lightning's write to TMPDIR
    assert unnamed.startswith("a write failed (the error names no path; this run writes under ")
    assert f"{tmp_path / 'run'} (hydra.run.dir)" in unnamed and unnamed.endswith("TMPDIR=<folder> (temporary files).")
    for other in (
        FileNotFoundError(errno.ENOENT, "No such file", "/x"),
        RuntimeError("Permission denied"),
        RuntimeError("CUDA error: out of memory"),
    ):
        assert os_failure_of(other) is None


# --------------------------------------------------------------------------- kdexp-train, end to end


# (fault point, errno, what the line names: a path in the run folder, or `cache:<folder>` for an entry of that
# cache folder, which the copy of the cache lacks so that the run writes it)
END_TO_END = [
    ("write:file=config.yaml", errno.ENOSPC, "config.yaml"),
    ("write:file=metrics.csv", errno.EACCES, "metrics.csv"),
    ("open:file=last.ckpt.tmp", errno.ENOSPC, "checkpoints/last.ckpt.tmp"),  # Lightning's checkpoint save
    ("write:file=student", errno.EROFS, "student"),
    ("write:file=results.json", errno.EPERM, "results.json"),
    ("write:dir=teacher_logits", errno.ENOSPC, "cache:signals/teacher_logits"),
    ("write:dir=tokenized", errno.EROFS, "cache:tokenized"),  # datasets' save_to_disk
    ("write:dir=teachers", errno.EACCES, "cache:teachers"),
]


def named_path(line: str) -> Path:
    return Path(line.removeprefix("kdexp-train: error: ").split(": ")[0])


def entries_of(cache: Path, folder: str) -> set[Path]:
    return {p for p in (cache / folder).iterdir() if not p.name.endswith((".lock", ".partial"))}


@pytest.mark.parametrize("fault,code,named", END_TO_END, ids=[f[0] for f in END_TO_END])
def test_an_os_error_at_each_write_is_one_line_and_the_rerun_is_the_uninterrupted_run(
    straight: dict[str, Path], tmp_path: Path, fault: str, code: int, named: str
) -> None:
    entry_folder = named.removeprefix("cache:") if named.startswith("cache:") else None
    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    shutil.copytree(straight["cache"], cache, symlinks=True)
    if entry_folder:
        shutil.rmtree(cache / entry_folder.split("/")[0])
    args = tiny_args(straight["model"], straight["glue"], cache, run_dir, *RUN)
    before = files_under(cache)

    line = error_line(launch(args, tmp_path, fault=fault, action=f"oserror:{errno.errorcode[code]}"))

    if entry_folder:  # one of the entries the uninterrupted run wrote there, and not under its name
        path = named_path(line)
        assert path.name in {p.name for p in entries_of(straight["cache"], entry_folder)}, line
        assert path.parent == cache / entry_folder and not path.exists()
        assert line == expected_line(path, code, "cache_dir")
    else:
        assert line == expected_line(run_dir / named, code, "hydra.run.dir")
        assert not (run_dir / named).exists()
    assert_no_partial_file(run_dir, cache)
    assert all(files_under(cache).get(path) == digest for path, digest in before.items())  # other entries untouched

    finished(launch(args, tmp_path))  # the fault gone: the rerun finishes
    assert_same_run(straight["run"], run_dir)
    assert_no_partial_file(run_dir, cache)
    if entry_folder:
        assert {p.name for p in entries_of(cache, entry_folder)} == {
            p.name for p in entries_of(straight["cache"], entry_folder)
        }


def test_an_os_error_in_hydras_own_files_is_the_same_one_line(straight: dict[str, Path], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = tiny_args(straight["model"], straight["glue"], straight["cache"], run_dir, *RUN)
    line = error_line(launch(args, tmp_path, fault="open:dir=.hydra:file=config.yaml", action="oserror:ENOSPC"))
    assert line.startswith(
        f"kdexp-train: error: {run_dir / '.hydra' / 'config.yaml'}: No space left on device "
        f"(ENOSPC); free space on its file system (or raise the quota), or choose another folder "
        f"with hydra.run.dir=<folder> (the run's files) or cache_dir=<folder> (the cache)."
    )


def test_a_new_run_folder_in_an_immutable_folder_is_one_line(straight: dict[str, Path], tmp_path: Path) -> None:
    parent = tmp_path / "immutable"
    parent.mkdir()
    args = tiny_args(straight["model"], straight["glue"], straight["cache"], parent / "run", *RUN)
    with immutable(parent):
        line = error_line(launch(args, tmp_path))
    assert line.startswith(f"kdexp-train: error: {parent / 'run'}: Operation not permitted (EPERM); make it writable")
    assert list(parent.iterdir()) == []


def test_an_immutable_run_folder_is_one_line_and_once_writable_the_run_resumes(
    straight: dict[str, Path], tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    args = tiny_args(straight["model"], straight["glue"], straight["cache"], run_dir, *RUN)
    killed(launch(args, tmp_path, fault="train_batch:epoch=1:batch=1"))  # a requeued job's folder: last.ckpt there
    kept = {
        path: digest
        for path, digest in files_under(run_dir).items()  # not Hydra's files, the log, the lock
        if ".hydra" not in path.parts and path.name not in ("train.log", ".kdexp.lock")
    }
    with immutable(run_dir):
        line = error_line(launch(args, tmp_path))
        assert line == expected_line(run_dir, errno.EPERM, "hydra.run.dir")  # the probe, before any work
    assert {path: files_under(run_dir).get(path) for path in kept} == kept  # nothing written, nothing cut short
    assert_no_partial_file(run_dir)

    proc = launch(args, tmp_path)
    finished(proc)
    assert f"Resuming from {run_dir / 'checkpoints' / 'last.ckpt'}" in proc.stdout + proc.stderr
    assert_same_run(straight["run"], run_dir)
