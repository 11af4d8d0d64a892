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
        cfg = tiny_cfg(
            tiny_model_dir,
            glue_dir,
            tmp_path / "cache",
            "method=finetune",
            f"seed={seed}",
            "trainer.max_epochs=1",
            "logger=wandb",
        )
        run(cfg, tmp_path / f"run{seed}", sweep_group="2026-11-22/10-00-00")
        assert wandb.run is None  # finished at the end of the job
        runs = list((tmp_path / f"run{seed}" / "wandb").glob("offline-run-*"))
        assert len(runs) == 1, runs
        assert list(runs[0].glob("*.wandb")), "the offline run has no data file for `wandb sync`"


def wandb_records(path: Path) -> list:
    """The protobuf records of an offline `.wandb` file (LevelDB log format: 32 KiB blocks of
    7-byte-headed chunks after a 7-byte file header), decoded independently of the wandb SDK."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    block, records, pending = 32768, [], b""
    position = 7  # ":W&B" + magic + version
    while position + 7 <= len(data):
        left_in_block = block - position % block
        if left_in_block < 7:
            position += left_in_block
            continue
        length = int.from_bytes(data[position + 4 : position + 6], "little")
        kind = data[position + 6]
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def test_a_wandb_run_holds_the_results_lr_throughput_and_resumes_as_the_same_run(
    tiny_model_dir: Path, glue_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = tiny_cfg(
        tiny_model_dir,
        glue_dir,
        tmp_path / "cache",
        "method=vanilla_kd",
        "trainer.max_epochs=1",
        "logger=wandb",
        "logger.log_model=true",
        "trainer.log_every_n_steps=1",
    )
    results = run(cfg, tmp_path / "run", sweep_group="sweeps/a", experiment="quickstart")
    [offline] = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    records = wandb_records(next(offline.glob("*.wandb")))
    kinds = [r.WhichOneof("record_type") for r in records]
    run_record = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run_record.run_id == (tmp_path / "run" / "wandb_id").read_text().strip()
    assert run_record.run_group == "quickstart" and run_record.job_type == "vanilla_kd"
    assert {"task:sst2", "method:vanilla_kd", "experiment:quickstart"} <= set(run_record.tags)
    summary = {
        item.key or "/".join(item.nested_key): json.loads(item.value_json)
        for r in records
        if r.WhichOneof("record_type") == "summary"
        for item in r.summary.update
    }
    assert summary["best/val/accuracy"] == results["metrics"]["val/accuracy"]
    assert summary["teacher/val/accuracy"] == results["teacher_metrics"]["val/accuracy"]
    assert summary["majority/val/accuracy"] == results["majority_metrics"]["val/accuracy"]
    assert summary["teacher_key"] == results["teacher_key"] and summary["student_params"] == results["student_params"]
    history = {
        item.key or "/".join(item.nested_key)
        for r in records
        if r.WhichOneof("record_type") == "history"
        for item in r.history.item
    }
    assert any(key.startswith("lr-AdamW") for key in history) and "train/examples_per_second" in history
    assert {"train/loss", "train/loss/ce", "train/loss/kd"} <= history
    assert "artifact" in kinds  # the student, logger.log_model=true

    # The same folder re-launched (a resumed run) logs into the same wandb run id.
    import shutil

    (tmp_path / "run" / "results.json").unlink()
    shutil.rmtree(tmp_path / "run" / "student")
    run(cfg, tmp_path / "run", sweep_group="sweeps/a", experiment="quickstart")
    # Read the id from each run's own records: two runs started within one second share a folder
    # name stem, and wandb then suffixes the second folder's name.
    ids = {
        next(r.run.run_id for r in wandb_records(next(folder.glob("*.wandb"))) if r.WhichOneof("record_type") == "run")
        for folder in (tmp_path / "run" / "wandb").glob("offline-run-*")
    }
    assert ids == {run_record.run_id}
