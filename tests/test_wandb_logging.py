"""wandb: offline without an API key, one finished run per job, config and group recorded."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdexp.loggers import wandb_mode
from kdexp.run import run
from tests.test_pipeline import tiny_cfg


def test_mode_is_offline_without_a_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    assert wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode("auto") == "online"
    assert wandb_mode("disabled") == "disabled"


def test_each_job_gets_its_own_finished_offline_run(
    tiny_model_dir: Path, glue_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wandb

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    for seed in (1, 2):
        cfg = tiny_cfg(tiny_model_dir, glue_dir, tmp_path / "cache", "method=finetune", f"seed={seed}",
                       "trainer.max_epochs=1", "logger=wandb")
        run(cfg, tmp_path / f"run{seed}", sweep_group="2026-11-22/10-00-00")
        assert wandb.run is None  # finished at the end of the job
        runs = list((tmp_path / f"run{seed}" / "wandb").glob("offline-run-*"))
        assert len(runs) == 1, runs
        assert list(runs[0].glob("*.wandb")), "the offline run has no data file for `wandb sync`"
