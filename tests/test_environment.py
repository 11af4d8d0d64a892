"""results.json's `environment`: the code's git commit (and whether files differed from it), the library
versions and the CPU threads, the things besides config and seed that decide a run's numbers."""

from __future__ import annotations

import subprocess
from pathlib import Path

import torch

from kdexp.environment import code_revision
from kdexp.run import run
from tests.test_pipeline import tiny_cfg


def git(folder: Path, *args: str) -> str:
    command = ["git", "-C", str(folder), "-c", "user.name=t", "-c", "user.email=t@t", *args]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()


def test_the_code_revision_is_the_commit_and_says_when_tracked_files_differ(tmp_path: Path) -> None:
    source = tmp_path / "repo" / "kdexp"
    source.mkdir(parents=True)
    (source / "module.py").write_text("x = 1\n")
    git(tmp_path / "repo", "init", "-q")
    git(tmp_path / "repo", "add", ".")
    git(tmp_path / "repo", "commit", "-qm", "first")
    commit = git(tmp_path / "repo", "rev-parse", "HEAD")
    assert code_revision(source) == commit
    (source / "notes.txt").write_text("untracked files change no code\n")
    assert code_revision(source) == commit
    (source / "module.py").write_text("x = 2\n")
    assert code_revision(source) == f"{commit}+dirty"
    outside = tmp_path / "installed"
    outside.mkdir()
    assert code_revision(outside) is None  # an installed wheel: no checkout to name


def test_results_record_the_code_libraries_threads_and_devices(
    tiny_model_dir: Path, glue_dir: Path, tmp_path: Path
) -> None:
    results = run(tiny_cfg(tiny_model_dir, glue_dir, tmp_path / "cache", "trainer.max_epochs=1"), tmp_path / "run")
    environment = results["environment"]
    assert environment["code_revision"] == code_revision()
    assert environment["libraries"]["torch"] == torch.__version__
    assert environment["cpu_threads"] == torch.get_num_threads()
    assert (environment["devices"], environment["precision"]) == ("1 x CPU", "32-true")
