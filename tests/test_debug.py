"""debug=fast and debug=overfit run for real on the tiny BERT; fast_dev_run is refused in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.test_scaling import TINY, train


def test_debug_fast_runs_a_small_slice_in_its_own_cache_and_folders(
    tiny_model_dir: Path, glue_dir: Path, tmp_path: Path
) -> None:
    args = [f"teacher.name_or_path={tiny_model_dir}", f"data.glue_dir={glue_dir}", *TINY[:-1]]  # not max_epochs
    train(tmp_path, "debug=fast", "method=vanilla_kd", *args)
    [results] = [json.loads(p.read_text()) for p in (tmp_path / "outputs" / "debug" / "runs").rglob("results.json")]
    assert results["config"]["data"]["max_train_samples"] == 64 and results["config"]["trainer"]["max_epochs"] == 1
    assert list((tmp_path / "outputs" / "debug" / "cache" / "teachers").glob("sst2-*"))  # its own teacher cache
    assert not (tmp_path / "outputs" / "cache").exists() and not (tmp_path / "outputs" / "runs").exists()


def test_debug_configs_fit_every_task_family_into_their_short_inputs() -> None:
    """64-token inputs: a QA window holds the question and passage tokens beyond the stride (run_qa's 128
    would be refused with data.max_length=64), so debug=fast runs SQuAD as it runs GLUE."""
    from kdexp.run import check_run, compose_config

    for debug in ("fast", "overfit"):
        for task in ("sst2", "mnli", "dream", "race", "squad", "squad_v2"):
            cfg = compose_config([f"debug={debug}", f"task={task}"])
            check_run(cfg)
            assert (cfg.data.max_length, cfg.task.doc_stride) == (64, 16)


def test_debug_overfit_fits_its_two_batches(tiny_model_dir: Path, glue_dir: Path, tmp_path: Path) -> None:
    args = [f"teacher.name_or_path={tiny_model_dir}", f"data.glue_dir={glue_dir}", *TINY[:-1]]
    train(tmp_path, "debug=overfit", "method=finetune", *args)
    [results] = [json.loads(p.read_text()) for p in (tmp_path / "outputs" / "debug" / "runs").rglob("results.json")]
    assert results["metrics"]["val/accuracy"] == 1.0  # scored on the same two batches it trained on


def test_fast_dev_run_is_refused_in_one_line(tmp_path: Path) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "kdexp.train", "+trainer.fast_dev_run=true"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "trainer.fast_dev_run" in lines[0] and "debug=fast" in lines[0]
