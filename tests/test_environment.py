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


def test_the_code_revision_is_the_commit_and_tells_edits_apart(tmp_path: Path) -> None:
    source = tmp_path / "repo" / "kdexp"
    source.mkdir(parents=True)
    (source / "__init__.py").write_text("x = 1\n")
    (tmp_path / "repo" / "notes.txt").write_text("outside the package\n")
    git(tmp_path / "repo", "init", "-q")
    git(tmp_path / "repo", "add", ".")
    git(tmp_path / "repo", "commit", "-qm", "first")
    commit = git(tmp_path / "repo", "rev-parse", "HEAD")
    assert code_revision(source) == commit
    (tmp_path / "repo" / "notes.txt").write_text("edited, outside the package: the code is the same\n")
    assert code_revision(source) == commit

    (source / "__init__.py").write_text("x = 2\n")
    first_edit = code_revision(source)
    assert first_edit is not None and first_edit.startswith(f"{commit}+dirty.")
    assert code_revision(source) == first_edit  # the same edit, the same label
    (source / "__init__.py").write_text("x = 3\n")
    second_edit = code_revision(source)
    assert second_edit is not None and second_edit.startswith(f"{commit}+dirty.") and second_edit != first_edit
    (source / "new_module.py").write_text("y = 1\n")  # an untracked module is code too
    assert code_revision(source) not in (second_edit, None)


def test_no_revision_outside_a_checkout_or_inside_another_projects_repository(tmp_path: Path) -> None:
    outside = tmp_path / "wheel" / "kdexp"
    outside.mkdir(parents=True)
    (outside / "__init__.py").write_text("")
    assert code_revision(outside) is None  # an installed wheel: no checkout to name
    project = tmp_path / "project"
    installed = project / ".venv" / "lib" / "kdexp"
    installed.mkdir(parents=True)
    (installed / "__init__.py").write_text("")
    (project / ".gitignore").write_text(".venv/\n")
    git(project, "init", "-q")
    git(project, "add", ".")
    git(project, "commit", "-qm", "a project that installs kdexp")
    assert code_revision(installed) is None  # the project's commit is not kdexp's


def test_results_record_the_code_libraries_threads_and_devices(
    tiny_model_dir: Path, glue_dir: Path, tmp_path: Path
) -> None:
    results = run(tiny_cfg(tiny_model_dir, glue_dir, tmp_path / "cache", "trainer.max_epochs=1"), tmp_path / "run")
    environment = results["environment"]
    root = Path(__file__).resolve().parents[1]
    commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True)
    if commit.returncode == 0:  # a checkout (CI's clone): its commit, marked when kdexp/ differs from it
        changed = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "kdexp"], capture_output=True)
        expected = commit.stdout.strip() + ("+dirty." if changed.stdout.strip() else "")
        assert environment["code_revision"].startswith(expected)
        assert environment["code_revision"] == expected or expected.endswith("+dirty.")
    assert environment["libraries"]["torch"] == torch.__version__
    assert environment["cpu_threads"] == torch.get_num_threads()
    assert environment["cpu"].endswith(f"({torch.backends.cpu.get_cpu_capability()})")
    assert (environment["devices"], environment["precision"]) == ("1 x CPU", "32-true")
