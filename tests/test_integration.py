"""End to end on the real MiniLM-L6 and ../shared/glue_data slices, through the console scripts.

Marked `integration` (minutes on 2 CPU cores); CI runs them. They share one cache folder per
test session so the teacher stage runs once, as in a real sweep.
"""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import SHARED_GLUE, kdexp_train

pytestmark = pytest.mark.integration

SLICE = [
    "data.max_train_samples=96",
    "data.max_eval_samples=64",
    "data.max_length=64",
    "teacher.epochs=1",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
    "logger=csv",
]


def test_teacher_stage_and_vanilla_kd_run(real_env: dict[str, str], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    log = kdexp_train(real_env, "task=sst2", "method=vanilla_kd", *SLICE, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert "Fine-tuning teacher" in log
    results = json.loads((run_dir / "results.json").read_text())
    teacher_dir = Path(results["teacher_path"]).parent
    assert json.loads((teacher_dir / "teacher.json").read_text())["key"] == results["teacher_key"]
    assert results["teacher_params"] == 22_713_216 + 2 * 384 + 2  # MiniLM-L6 encoder with pooler + 2-label head
    assert 0 < results["student_params"] < results["teacher_params"]

    # The cached dev logits are what the stored teacher computes: check the first rows directly.
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from kdexp.data import DataSource, load_split
    from kdexp.tasks import get_task

    teacher = AutoModelForSequenceClassification.from_pretrained(results["teacher_path"]).eval()
    tok = AutoTokenizer.from_pretrained(results["teacher_path"])
    dev = load_split(get_task("sst2"), "validation", DataSource(SHARED_GLUE), 64)
    with torch.no_grad():
        logits = teacher(
            **tok(list(dev["sentence"]), truncation=True, max_length=64, padding=True, return_tensors="pt")
        ).logits
    accuracy = float((logits.argmax(-1) == torch.tensor(list(dev["label"]))).float().mean())
    assert results["teacher_metrics"]["val/accuracy"] == pytest.approx(accuracy, abs=1e-6)


def test_multirun_reuses_one_teacher_and_reports(real_env: dict[str, str], tmp_path: Path) -> None:
    env = dict(real_env, KDEXP_CACHE_DIR=str(tmp_path / "fresh-cache"))
    sweep = tmp_path / "sweep"
    log = kdexp_train(
        env, "-m", "task=rte", "method=finetune,vanilla_kd", "seed=1", *SLICE, f"hydra.sweep.dir={sweep}", cwd=tmp_path
    )
    assert log.count("Fine-tuning teacher") == 1 and log.count("Reusing teacher") == 1
    results = [json.loads(p.read_text()) for p in sorted(sweep.rglob("results.json"))]
    assert sorted(r["method"] for r in results) == ["finetune", "vanilla_kd"]
    assert len({r["teacher_key"] for r in results}) == 1
    assert len([p for p in (tmp_path / "fresh-cache" / "teachers").iterdir() if p.is_dir()]) == 1

    report = subprocess.run([sys.executable, "-m", "kdexp.report", str(sweep)], capture_output=True, text=True, env=env)
    assert report.returncode == 0, report.stderr
    rows = {
        line.split("|")[1].strip(): line.split("|")[2].strip()
        for line in report.stdout.splitlines()
        if line.startswith("| ") and "method" not in line
    }
    for r in results:
        assert rows[r["method"]] == f"{100 * r['metrics']['val/accuracy']:.1f} n=1"
    assert rows["teacher"] == f"{100 * results[0]['teacher_metrics']['val/accuracy']:.1f}"
    assert (sweep / "report.md").exists() and (sweep / "report.csv").exists()


def test_killed_run_resumes_without_redoing_finished_epochs(real_env: dict[str, str], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = [
        "task=sst2",
        "method=finetune",
        "data.max_train_samples=512",
        "data.max_eval_samples=32",
        "data.max_length=64",
        "teacher.max_train_samples=96",
        "teacher.epochs=1",
        "trainer.max_epochs=3",
        "trainer.enable_progress_bar=false",
        "logger=none",
        f"hydra.run.dir={run_dir}",
    ]
    cmd = [sys.executable, "-m", "kdexp.train", *args]
    proc = subprocess.Popen(cmd, env=real_env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + 900
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)  # let the checkpoint write finish; a torn file is set aside anyway
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "results.json").exists(), "the run finished before it could be killed"
    epochs_before = [int(r["epoch"]) for r in csv.DictReader(open(run_dir / "metrics.csv"))]
    assert epochs_before and epochs_before[-1] < 2

    assert "Resuming from" in kdexp_train(real_env, *args, cwd=tmp_path)
    epochs = [int(r["epoch"]) for r in csv.DictReader(open(run_dir / "metrics.csv"))]
    assert epochs == [0, 1, 2]  # every epoch once: none redone, none skipped
    assert json.loads((run_dir / "results.json").read_text())["epochs_trained"] == 3
