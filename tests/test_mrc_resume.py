"""Machine reading comprehension runs killed right after a step checkpoint resume exactly: extractive QA
(SQuAD 2.0 windows, a tiny BERT QA model) and multiple choice (DREAM, a tiny GPT-2 teacher and student
answering through label words) end with the same `metrics.csv`, results, step log and student weights,
bit for bit, as the run never interrupted. The GLUE runs' proof is tests/test_step_checkpoints.py and
tests/test_resume_every_method.py; the helpers (`train`, `killed`, `finished`, `assert_same_run`) are
tests/test_reproducibility.py's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import SHARED_MRC as MRC
from tests.test_reproducibility import TINY, assert_same_run, finished, killed, train

SQUAD_SUBSET = MRC / "squad_v2_subset" / "dev-v2.0-subset.json"

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not MRC.is_dir(), reason="needs ../shared/mrc_data")]

# 16 questions in batches of 4 for 3 epochs; the kill falls on epoch 1's third batch (global step
# batches-per-epoch + 2), so the resumed run skips part of an epoch and then trains a whole one.
SLICE = ["data.max_train_samples=16", "data.max_eval_samples=8", "trainer.max_epochs=3", "seed=3"]
FAULT = "train_batch:epoch=1:batch=2"


def mrc_args(model: Path, cache: Path, run_dir: Path, *extra: str) -> list[str]:
    """test_reproducibility's TINY settings (CSV step log every step) but its student.num_layers: each run
    names its student."""
    tiny = [arg for arg in TINY if not arg.startswith("student.")]
    return [
        f"teacher.name_or_path={model}",
        f"data.mrc_dir={MRC}",
        f"cache_dir={cache}",
        f"hydra.run.dir={run_dir}",
        *tiny,
        *SLICE,
        *extra,
    ]


def assert_killed_run_resumes_to_the_straight_one(model: Path, tmp_path: Path, *extra: str) -> None:
    """A run never interrupted, then the same run with a step checkpoint every step, killed by `FAULT` and
    launched again: it resumes inside epoch 1 and ends as the first, bit for bit. They share one cache (the
    teacher and its signals are made once)."""
    cache, straight, resumed = tmp_path / "cache", tmp_path / "straight", tmp_path / "resumed"
    finished(train(mrc_args(model, cache, straight, *extra), tmp_path))
    args = mrc_args(model, cache, resumed, *extra, "checkpoint.every_n_steps=1")
    killed(train(args, tmp_path, fault=FAULT))
    assert not (resumed / "results.json").exists()

    proc = train(args, tmp_path)
    finished(proc)
    checkpoint = resumed / "checkpoints" / "last.ckpt"
    assert f"Resuming from {checkpoint} in epoch 1 at batch 2 " in proc.stdout + proc.stderr  # not from the start
    assert json.loads((resumed / "results.json").read_text())["resumed_from_epoch"] == 1
    assert_same_run(straight, resumed)  # metrics.csv, results' metrics, step log, student weights


def test_squad_v2_run_killed_mid_epoch_resumes_to_the_uninterrupted_result(
    mrc_models: dict[str, Path], tmp_path: Path
) -> None:
    """Extractive QA with vanilla KD: the resumed run skips the windows a step checkpoint already trained on,
    and its dev scores (EM/F1 over windows joined per question) are the uninterrupted run's."""
    assert_killed_run_resumes_to_the_straight_one(
        mrc_models["qa"],
        tmp_path,
        "task=squad_v2",
        f"task.train_file={SQUAD_SUBSET}",
        "task.dev_articles=[Normans]",
        "data.max_length=128",
        "task.doc_stride=32",
        "student.num_layers=2",
        "method=vanilla_kd",
    )


def test_dream_run_of_a_decoder_teacher_and_student_killed_mid_epoch_resumes_to_the_uninterrupted_result(
    mrc_models: dict[str, Path], tmp_path: Path
) -> None:
    """Multiple choice with DBKD between a GPT-2 teacher and a GPT-2 student (label-word prompts): the
    teacher's decisions on the queries come from the cache, and the resumed run ends as the straight one."""
    assert_killed_run_resumes_to_the_straight_one(
        mrc_models["gpt2"],
        tmp_path,
        "task=dream",
        "data.max_length=128",
        "teacher=causal_lm",
        "student=causal_lm",
        f"student.name_or_path={mrc_models['gpt2']}",
        "method=dbkd",
        "method.queries.num_queries=3",
    )
