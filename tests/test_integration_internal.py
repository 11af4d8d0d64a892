"""Internal-representation distillation end to end on the real MiniLM-L6 and ../shared/glue_data slices.

Marked `integration` (minutes on 2 CPU cores); CI runs them. One sweep through the console
entry point (`python -m kdexp.train -m`): the teacher stage once, then `internal_pid` and
`internal_all` from a 3-layer student, with the stages and their layers checked in the logs.
"""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import kdexp_train

pytestmark = pytest.mark.integration

SLICE = [
    "data.max_train_samples=64",
    "data.max_eval_samples=32",
    "data.max_length=64",
    "teacher.epochs=1",
    "teacher.max_train_samples=64",
    "student.num_layers=3",
    "trainer.max_epochs=4",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
    "logger=csv",
]


def test_pid_and_all_on_minilm_run_their_stages_and_report(real_env: dict[str, str], tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    log = kdexp_train(
        real_env,
        "-m",
        "task=rte",
        "method=internal_pid,internal_all",
        "seed=1",
        *SLICE,
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert log.count("Fine-tuning teacher") == 1 and log.count("Reusing teacher") == 1

    # MiniLM-L6 (6 layers) -> 3-layer student: uniform map m(j) = 2j + 1, one pair per pid stage.
    pid_stages = re.findall(r"Epoch (\d+): internal_pid stage (\d)/4: (.*)", log)
    assert [(int(e), int(s)) for e, s, _ in pid_stages] == [(0, 1), (1, 2), (2, 3), (3, 4)]
    for (_, _, text), (j, m) in zip(pid_stages, [(0, 1), (1, 3), (2, 5)]):
        assert text.startswith("attention KL + [CLS] cosine at ") and text.count("<-") == 1
        assert f"student layer {j} <- teacher layer {m}" in text
    assert pid_stages[3][2].startswith("soft-label KD")
    all_stages = re.findall(r"Epoch (\d+): internal_all stage (\d)/2: (.*)", log)
    assert [(int(e), int(s)) for e, s, _ in all_stages] == [(0, 1), (1, 2)]
    assert all_stages[0][2].count("<-") == 3 and all_stages[0][2].endswith("+ soft-label KD")

    results = {r["method"]: r for r in (json.loads(p.read_text()) for p in sweep.rglob("results.json"))}
    assert set(results) == {"internal_pid", "internal_all"}
    for method, result in results.items():
        assert result["epochs_trained"] == 4 and 0 <= result["metrics"]["val/accuracy"] <= 1
        run_dir = Path(result["student_dir"]).parent
        epochs = [int(r["epoch"]) for r in csv.DictReader(open(run_dir / "metrics.csv"))]
        assert epochs == [0, 1, 2, 3]
        # The stage index is logged once per epoch by the module (Lightning's CSV logger).
        rows = [r for r in csv.DictReader(open(run_dir / "csv" / "metrics.csv")) if r.get("train/stage")]
        stages = [int(float(r["train/stage"])) for r in rows]
        assert stages == ([0, 1, 2, 3] if method == "internal_pid" else [0, 1, 1, 1])
        assert any(
            r.get("train/loss/attention_kl/s0_t1") for r in csv.DictReader(open(run_dir / "csv" / "metrics.csv"))
        )

    report = subprocess.run(
        [sys.executable, "-m", "kdexp.report", str(sweep)], capture_output=True, text=True, env=real_env
    )
    assert report.returncode == 0, report.stderr
    assert "| internal_pid |" in report.stdout and "| internal_all |" in report.stdout
