"""Every method config, killed right after a step checkpoint inside an epoch and launched again, ends as the
run never interrupted, made with its own cache: metrics, step log and student weights, bit for bit.
Methods that carry state across steps (knowledge selection's phase actions, random policies, progressive
stages, text smoothing's two steps, noise drawn per step) are where a resume could go wrong. The stages
before training resume by their own tests (teacher, MLM adaptation, agent stage, query chunks)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from kdexp.config import CONFIG_DIR
from tests.test_reproducibility import assert_same_run, finished, killed, tiny_args, train

TINY_SELECTION = [
    "method.agent.episodes=2",
    "method.agent.episode_phases=2",
    "method.phase_steps=2",  # 3 batches an epoch: the kill (global step 5) falls inside a phase
    "method.reward.rows=4",
    "method.agent.batch_size=2",
]
QUERIES = ["method.queries.num_queries=3"]
SMOOTHING = ["method.mlm.adapt.steps=4", "method.mlm.adapt.batch_size=4", "method.top_k=8"]
METHODS = {  # every config in conf/method (test_every_method_config_is_tested checks)
    "finetune": [],
    "vanilla_kd": [],
    "vanilla_kd_additive": [],
    "pkd": [],
    "distilbert_kd": [],
    "internal_all": [],
    "internal_pid": [],
    "internal_sid": [],
    "knowledge_selection": TINY_SELECTION,
    "knowledge_selection_hard": TINY_SELECTION,
    "knowledge_equal": TINY_SELECTION,
    "knowledge_random_soft": TINY_SELECTION,  # a random policy: its draws must follow the resumed step
    "knowledge_random_hard": TINY_SELECTION,
    "dbkd": QUERIES,
    "dbkd_authors": QUERIES,
    "decision_hard": QUERIES,
    "decision_hard_aug": QUERIES,
    "decision_hard_teacher": QUERIES,
    "decision_label_smooth": QUERIES,
    "decision_label_smooth_uniform": QUERIES,
    "decision_noise_smooth": QUERIES,  # noise drawn per step
    "decision_surrogate": [*QUERIES, "method.surrogate_epochs=2"],
    "text_smoothing_kd": SMOOTHING,
    "text_smoothing": SMOOTHING,
}


def test_every_method_config_is_tested() -> None:
    assert set(METHODS) == {path.stem for path in (Path(CONFIG_DIR) / "method").glob("*.yaml")}


@pytest.mark.parametrize("method", METHODS)
def test_a_run_killed_after_a_step_checkpoint_resumes_to_the_uninterrupted_result(
    method: str, tiny_model_dir: Path, glue_dir: Path, tmp_path: Path
) -> None:
    run = [f"method={method}", "trainer.max_epochs=3", "seed=3", *METHODS[method]]
    straight = tmp_path / "straight"
    finished(train(tiny_args(tiny_model_dir, glue_dir, tmp_path / "cache-a", straight, *run), tmp_path))
    # Its own cache: the stages before training (teacher, queries, surrogate, MLM, agent) made again.
    resumed = tmp_path / "resumed"
    args = tiny_args(tiny_model_dir, glue_dir, tmp_path / "cache-b", resumed, *run, "checkpoint.every_n_steps=1")
    killed(train(args, tmp_path, fault="train_batch:epoch=1:batch=2"))
    proc = train(args, tmp_path)
    finished(proc)
    checkpoint = resumed / "checkpoints" / "last.ckpt"
    assert f"Resuming from {checkpoint} in epoch 1 at batch 2 " in proc.stdout + proc.stderr  # not from the start
    assert_same_run(straight, resumed)
    if method.startswith("knowledge_"):
        assert_logged_terms_follow_the_actions(straight / "csv" / "metrics.csv")


def assert_logged_terms_follow_the_actions(step_log: Path) -> None:
    """A knowledge kind's loss is in a step's row exactly when its action is not 0: the loss of a kind left
    out is not computed, and no value from an earlier step stands in for it."""
    rows = [row for row in csv.DictReader(step_log.open()) if row.get("train/action/fink")]
    assert rows
    for row in rows:
        for kind in ("fink", "resk", "feak", "relk"):
            # (a kind never chosen in the run has no column at all)
            assert (float(row[f"train/action/{kind}"]) != 0) == bool(row.get(f"train/loss/{kind}")), row
