"""MRC end to end with the real MiniLM-L6 on small slices of the real data: DREAM (multiple choice, DBKD and
its baselines) and the SQuAD 2.0 articles split by article (extractive QA, text smoothing), as a user runs
them with `python -m kdexp.train`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import kdexp_train

pytestmark = pytest.mark.integration

MRC = Path(__file__).resolve().parents[2] / "shared" / "mrc_data"
SUBSET = MRC / "squad_v2_subset" / "dev-v2.0-subset.json"


@pytest.fixture(scope="module")
def mrc_env(real_env: dict[str, str]) -> dict[str, str]:
    assert MRC.is_dir(), f"the MRC integration tests need {MRC}"
    return dict(real_env, MRC_DIR=str(MRC))


def test_dream_multiple_choice_runs_finetune_vanilla_kd_and_dbkd_from_the_official_files(
    mrc_env, tmp_path: Path
) -> None:
    sweep = tmp_path / "dream"
    kdexp_train(
        mrc_env,
        "-m",
        "task=dream",
        "method=finetune,vanilla_kd,dbkd",
        "teacher.max_train_samples=300",
        "teacher.epochs=1",
        "data.max_train_samples=120",
        "data.max_eval_samples=90",
        "data.max_length=96",
        "data.batch_size=16",
        "trainer.max_epochs=1",
        "student.num_layers=2",
        "optim.learning_rate=5e-4",
        "method.queries.num_queries=3",
        "trainer.enable_progress_bar=false",
        "logger=csv",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    results = {r["method"]: r for r in (json.loads(p.read_text()) for p in sweep.rglob("results.json"))}
    assert set(results) == {"finetune", "vanilla_kd", "dbkd"}
    for result in results.values():
        assert 0.0 <= result["metrics"]["val/accuracy"] <= 1.0 and result["train_examples"] == 120
    assert results["dbkd"]["method_info"]["teacher_queries"] == 120 * 3  # N queries per question
    assert results["dbkd"]["teacher_key"] == results["finetune"]["teacher_key"]  # one teacher for the sweep
    # the teacher, fine-tuned on 300 questions, is above chance (one option in three) on 90 dev questions
    assert results["finetune"]["teacher_metrics"]["val/accuracy"] > 1 / 3


def test_the_squad_subset_split_by_article_runs_text_smoothing_and_reports_em_and_f1(mrc_env, tmp_path: Path) -> None:
    run_dir = tmp_path / "squad"
    kdexp_train(
        mrc_env,
        "task=squad_v2",
        f"task.train_file={SUBSET}",
        "task.dev_articles=[Normans]",
        "method=text_smoothing_kd",
        "method.top_k=16",
        "method.mlm.adapt.steps=20",
        "teacher.epochs=1",
        "data.max_train_samples=160",
        "data.max_eval_samples=60",
        "data.max_length=192",
        "task.doc_stride=64",
        "data.batch_size=16",
        "trainer.max_epochs=1",
        "student.num_layers=2",
        "trainer.enable_progress_bar=false",
        "logger=csv",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    results = json.loads((run_dir / "results.json").read_text())
    metrics = results["metrics"]
    assert 0.0 <= metrics["val/exact_match"] <= metrics["val/f1"] <= 1.0
    assert {"val/exact_match", "val/f1"} <= set(results["teacher_metrics"])
    record = json.loads((run_dir / "mlm_teacher.json").read_text())
    assert record["adapted"] and record["distributions"] == "cached"  # the MLM adapted, its top-k store used
