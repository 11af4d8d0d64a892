"""MRC end to end with the real MiniLM-L6 on small slices of the real data: DREAM (multiple choice, DBKD and
its baselines) and the SQuAD 2.0 articles split by article (extractive QA, text smoothing), as a user runs
them with `python -m kdexp.train`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import kdexp_train

from tests.test_mrc import squad_scores_by_hand

pytestmark = pytest.mark.integration

MRC = Path(__file__).resolve().parents[2] / "shared" / "mrc_data"
SUBSET = MRC / "squad_v2_subset" / "dev-v2.0-subset.json"


@pytest.fixture(scope="module")
def mrc_env(real_env: dict[str, str]) -> dict[str, str]:
    assert MRC.is_dir(), f"the MRC integration tests need {MRC}"
    return dict(real_env, MRC_DIR=str(MRC))


def accuracy_by_hand(student: Path, dev_file: Path, questions: int, max_length: int) -> float:
    """A saved multiple-choice student scored without kdexp: the official file read with `json`, one
    (dialogue, question + option) pair per option (a cloze question's blank filled by the option), the
    dialogue truncated, the answer compared as text."""
    import re

    import torch
    from transformers import AutoModelForMultipleChoice, AutoTokenizer

    rows = [(turns, q) for turns, qs, _ in json.loads(dev_file.read_text()) for q in qs][:questions]
    tokenizer = AutoTokenizer.from_pretrained(student)
    model = AutoModelForMultipleChoice.from_pretrained(student).eval()
    right = 0
    for turns, q in rows:
        blank = re.search("_+", q["question"])
        seconds = [
            (q["question"][: blank.start()] + c + q["question"][blank.end() :]).strip()
            if blank
            else f"{q['question']} {c}"
            for c in q["choice"]
        ]
        pairs = ["\n".join(turns)] * len(q["choice"]), seconds
        encoded = tokenizer(*pairs, truncation="only_first", max_length=max_length, padding=True, return_tensors="pt")
        with torch.no_grad():
            logits = model(**{k: v.unsqueeze(0) for k, v in encoded.items()}).logits[0]
        right += q["choice"][int(logits.argmax())] == q["answer"]
    return right / len(rows)


def test_dream_multiple_choice_runs_finetune_vanilla_kd_and_dbkd_from_the_official_files(
    mrc_env, tmp_path: Path
) -> None:
    """One teacher for the sweep, N queries per question for DBKD, and each saved student scores on the
    official dev file, re-read and re-scored by hand, exactly what its results.json says. (That the
    students learn is not asserted here: MiniLM-L6 needs far more than a test's budget to rise above
    chance on DREAM.)"""
    common = [
        "task=dream",
        "teacher.max_train_samples=120",
        "teacher.epochs=1",
        "data.max_train_samples=120",
        "data.max_eval_samples=120",  # dev question 112 is a cloze question (its blank filled)
        "data.max_length=96",
        "data.batch_size=16",
        "trainer.max_epochs=1",
        "student.num_layers=2",
        "optim.learning_rate=5e-4",
        "trainer.enable_progress_bar=false",
        "logger=csv",
    ]
    sweep = tmp_path / "dream"
    log = kdexp_train(mrc_env, "-m", *common, "method=finetune,vanilla_kd", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    log += kdexp_train(
        mrc_env, *common, "method=dbkd", "method.queries.num_queries=3", f"hydra.run.dir={sweep / 'dbkd'}", cwd=tmp_path
    )
    assert log.count("Fine-tuning teacher") == 1 and log.count("Reusing teacher") == 2
    folders = {json.loads(p.read_text())["method"]: p.parent for p in sweep.rglob("results.json")}
    results = {method: json.loads((folder / "results.json").read_text()) for method, folder in folders.items()}
    assert set(results) == {"finetune", "vanilla_kd", "dbkd"}
    assert len({r["teacher_key"] for r in results.values()}) == 1
    assert results["dbkd"]["method_info"]["teacher_queries"] == 120 * 3  # N queries per question
    for method, folder in folders.items():
        assert results[method]["train_examples"] == 120
        by_hand = accuracy_by_hand(folder / "student", MRC / "dream" / "dev.json", 120, 96)
        assert results[method]["metrics"]["val/accuracy"] == pytest.approx(by_hand, abs=1e-6), method


def test_the_squad_subset_split_by_article_runs_text_smoothing_and_reports_em_and_f1(mrc_env, tmp_path: Path) -> None:
    """Text smoothing on the SQuAD 2.0 articles, Normans held out as dev: the saved student, re-read and
    re-scored by hand on the official file, has exactly the EM and F1 its results.json says."""
    run_dir = tmp_path / "squad"
    kdexp_train(
        mrc_env,
        "task=squad_v2",
        f"task.train_file={SUBSET}",
        "task.dev_articles=[Normans]",
        "method=text_smoothing_kd",
        "method.top_k=16",
        "method.mlm.adapt.steps=8",
        "teacher.epochs=1",
        "data.max_train_samples=96",
        "data.max_eval_samples=40",
        "data.max_length=128",
        "task.doc_stride=48",
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
    exact, overlap = squad_scores_by_hand(run_dir / "student", "Normans", 40, 128, 48)
    assert metrics["val/exact_match"] == pytest.approx(exact, abs=1e-6)
    assert metrics["val/f1"] == pytest.approx(overlap, abs=1e-6)
    assert {"val/exact_match", "val/f1"} <= set(results["teacher_metrics"])
    record = json.loads((run_dir / "mlm_teacher.json").read_text())
    assert record["adapted"] and record["distributions"] == "cached"  # the MLM adapted, its top-k store used
