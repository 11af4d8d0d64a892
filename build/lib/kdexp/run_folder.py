"""A run's folder: what it holds, and whether a re-launch may use it.

A run folder holds `config.yaml` (the resolved config, written when training starts),
`checkpoints/` while training, and `results.json` once finished. A re-launch in the same
folder continues the run only if its result config (`kdexp.config.result_config`) is the one
that ran there; otherwise it is refused, naming the keys that differ, and Hydra's `.hydra/`
files are put back as they were, so the folder still describes the run it holds.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from kdexp.config import config_differences, config_hash
from kdexp.errors import ConfigError

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
CONFIG_FILE = "config.yaml"
HYDRA_FILES = ("config.yaml", "hydra.yaml", "overrides.yaml")
FIRST_LAUNCH = "first_launch"  # .hydra/first_launch/: Hydra's files as the run that holds the folder wrote them


def check_writable(folder: Path, key: str) -> None:
    """Refuse, before any work, a folder that cannot be created or written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"{key}={folder}: cannot write there ({err.strerror or err}); choose a writable folder.") from None


class RunFolder:
    def __init__(self, path: Path):
        self.path = Path(path)

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
            raise ConfigError(f"{self.results_file} is unreadable ({err}); move it away, or set resume=false to train "
                              "this run again.") from None
        stored = results.get("config") or {}
        if config_hash(stored) != config_hash(resolved):  # hashed anew: kdexp versions may hash differently
            self._refuse("holds a finished run", stored, resolved)
        return results

    def check_resumable(self, resolved: dict[str, Any]) -> None:
        """Refuse to continue checkpoints that were written under another config."""
        if not (self.checkpoints / "last.ckpt").exists() or not self.config_file.exists():
            return
        stored = OmegaConf.to_container(OmegaConf.load(self.config_file))
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

    def keep_hydra_files(self) -> None:
        """Remember Hydra's files of the launch that trains here (restored if a later launch is refused)."""
        hydra_dir = self.path / ".hydra"
        if not hydra_dir.is_dir():
            return
        first = hydra_dir / FIRST_LAUNCH
        first.mkdir(exist_ok=True)
        for name in HYDRA_FILES:
            if (hydra_dir / name).exists():
                shutil.copy2(hydra_dir / name, first / name)

    def _restore_hydra_files(self) -> None:
        first = self.path / ".hydra" / FIRST_LAUNCH
        for name in HYDRA_FILES:
            if (first / name).exists():
                shutil.copy2(first / name, self.path / ".hydra" / name)

    def _refuse(self, holds: str, stored: dict[str, Any], resolved: dict[str, Any]) -> None:
        self._restore_hydra_files()
        differences = "; ".join(config_differences(stored, resolved))
        raise ConfigError(
            f"{self.path} {holds} of another config ({differences}). Launch in a new folder "
            f"(hydra.run.dir=... / hydra.sweep.dir=...), or set resume=false to start over here."
        )
