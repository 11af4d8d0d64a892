"""What produced a run, beside its config: the code (kdexp's version and git commit), the libraries whose
numerics decide the result, and the CPU threads and devices it ran on.

Same config and seed give the same result only on the same software and the same thread count: on CPU a
weight gradient sums its batch in an order that follows the number of threads (1 and 2 threads differ in
the last bits). `results.json` keeps this record so that two runs that disagree can be told apart by it.
"""

from __future__ import annotations

import subprocess
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kdexp.hardware import Hardware

LIBRARIES = ("torch", "transformers", "pytorch-lightning", "datasets", "tokenizers")


def code_revision(source: Path | None = None) -> str | None:
    """The git commit of kdexp's source folder, with `+dirty` when files differ from it; None outside a git
    checkout (an installed wheel) or without git."""
    folder = source or Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return None
        status = subprocess.run(
            ["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no", "--", "."],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return commit.stdout.strip() + ("+dirty" if status.returncode == 0 and status.stdout.strip() else "")


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


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

    return {
        "kdexp": __version__,
        "code_revision": code_revision(),
        "libraries": library_versions(),
        "cpu_threads": torch.get_num_threads(),
        "devices": devices_of(hardware),
        "precision": hardware.precision,
    }
