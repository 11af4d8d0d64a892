"""A sweep's wandb summary carries the report's figures: n, mean, std, 95% CI, and the paired differences."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from kdexp.sweep import log_sweep_summary, summary_baseline
from tests.test_report_stats import write_run
from tests.test_wandb_logging import wandb_records


def test_the_sweep_summary_holds_each_cells_statistics_and_the_paired_differences(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    sweep = tmp_path / "2026-12-04" / "10-00-00"
    scores = {"finetune": [0.800, 0.820, 0.810], "vanilla_kd": [0.830, 0.845, 0.825]}
    for method, values in scores.items():
        for seed, score in enumerate(values, start=1):
            write_run(sweep, "sst2", method, seed, score)
    config = OmegaConf.create({"logger": {"type": "wandb", "project": "kdexp-test", "mode": "offline"}})
    log_sweep_summary(sweep, config)

    [offline] = list((sweep / "wandb").glob("offline-run-*"))
    records = wandb_records(offline_file(offline))
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.job_type == "sweep-summary" and run.run_group == "2026-12-04/10-00-00"
    summary = {
        item.key or "/".join(item.nested_key): json.loads(item.value_json)
        for r in records
        if r.WhichOneof("record_type") == "summary"
        for item in r.summary.update
    }
    for method, values in scores.items():
        assert summary[f"{method}/sst2/mean"] == pytest.approx(100 * statistics.mean(values))  # x100, as the table
        assert summary[f"{method}/sst2/std"] == pytest.approx(100 * statistics.stdev(values))
        assert summary[f"{method}/sst2/n"] == 3
    differences = [b - a for a, b in zip(scores["vanilla_kd"], scores["finetune"])]
    assert summary["finetune/sst2/diff"] == pytest.approx(100 * statistics.mean(differences))  # against vanilla_kd
    assert summary["finetune/sst2/p_permutation"] == pytest.approx(0.25)  # 3 pairs, all one sign: 2/2^3


def offline_file(folder: Path, seconds: float = 20.0) -> Path:
    """The offline run's data file (wandb's service may finish writing it just after the run finished)."""
    deadline = time.monotonic() + seconds
    while not list(folder.glob("*.wandb")) and time.monotonic() < deadline:
        time.sleep(0.2)
    return next(folder.glob("*.wandb"))


def test_the_summary_compares_with_vanilla_kd_else_finetune_else_nothing() -> None:
    assert summary_baseline([{"row": "dbkd"}, {"row": "finetune"}, {"row": "vanilla_kd"}]) == "vanilla_kd"
    assert summary_baseline([{"row": "dbkd"}, {"row": "finetune"}]) == "finetune"
    assert summary_baseline([{"row": "dbkd"}]) is None
