"""What produced a run, beside its config: the code (kdexp's version and git commit), the libraries whose
numerics decide the result, and the CPU threads and devices it ran on.

Same config and seed give the same result only on the same software, CPU model and thread count: on CPU
a weight gradient sums its batch in an order that follows the number of threads (1 and 2 threads differ
in the last bits), and another CPU model may take other vector kernels. `results.json` keeps this record
so that two runs that disagree can be told apart by it.
"""

from __future__ import annotations

import functools
import hashlib
import os
import subprocess
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kdexp.hardware import Hardware

LIBRARIES = ("torch", "transformers", "pytorch-lightning", "lightning-fabric", "datasets", "tokenizers", "numpy")
PACKAGE_DIR = Path(__file__).resolve().parent


def _git(folder: Path, *args: str) -> subprocess.CompletedProcess:
    # a git hook's GIT_DIR / GIT_WORK_TREE would point the commands at another repository
    env = {k: v for k, v in os.environ.items() if k not in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE")}
    return subprocess.run(
        ["git", "--no-optional-locks", "-C", str(folder), *args], capture_output=True, text=True, timeout=10, env=env
    )


def code_revision(source: Path = PACKAGE_DIR) -> str | None:
    """The git commit of kdexp's source folder; `<commit>+dirty.<hash>` when its files differ from the commit
    (the hash tells two different edits apart), `<commit>+unknown` when git could not say. None where the
    folder is no tracked part of a git checkout (an installed wheel, or a package inside another project's
    repository) or git is missing."""
    try:
        tracked = _git(source, "ls-files", "--error-unmatch", "__init__.py")
        commit = _git(source, "rev-parse", "HEAD", "--show-toplevel")
        if tracked.returncode != 0 or commit.returncode != 0:
            return None
        status = _git(source, "status", "--porcelain", "--", ".")
        diff = _git(source, "diff", "HEAD", "--", ".")
    except (OSError, subprocess.SubprocessError):
        return None
    revision, top = commit.stdout.splitlines()[:2]
    if status.returncode != 0 or diff.returncode != 0:
        return f"{revision}+unknown"
    if not status.stdout.strip():
        return revision
    digest = hashlib.sha1(diff.stdout.encode())
    untracked = sorted(line[3:] for line in status.stdout.splitlines() if line.startswith("??"))  # root-relative
    for name in untracked:
        path = Path(top) / name
        digest.update(name.encode() + (path.read_bytes() if path.is_file() else b""))
    return f"{revision}+dirty.{digest.hexdigest()[:10]}"


@functools.lru_cache(maxsize=1)
def imported_code_revision() -> str | None:
    """`code_revision()` as first asked in this process: call it as a run starts, so that a checkout changed
    while the run trains does not stand for the code the run imported."""
    return code_revision()


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def cpu_name() -> str:
    """The CPU's model and the vector instructions torch's kernels use on it (`AVX512`, `AVX2`): two CPUs
    that differ in these can round the same run differently."""
    import platform

    import torch

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model} ({torch.backends.cpu.get_cpu_capability()})"


def devices_of(hardware: Hardware) -> str:
    """`2 x NVIDIA H100 80GB HBM3`, `1 x CPU`: the processes of the run and what each ran on."""
    import torch

    device = hardware.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type.upper()
    return f"{hardware.world_size} x {name}"


def run_environment(hardware: Hardware) -> dict[str, Any]:
    """The record kept in results.json under `environment`."""
    import torch

    from kdexp import __version__

    gpu = hardware.device.type == "cuda"
    return {
        "kdexp": __version__,
        "code_revision": imported_code_revision(),
        "libraries": library_versions(),
        "cuda": torch.version.cuda if gpu else None,
        "cudnn": torch.backends.cudnn.version() if gpu else None,
        "cpu": cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "devices": devices_of(hardware),
        "precision": hardware.precision,
    }
