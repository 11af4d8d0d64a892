"""Every method, killed right after a step checkpoint inside an epoch and launched again, ends as the run
never interrupted: metrics, step log and student weights, bit for bit (vanilla_kd alone is in
tests/test_step_checkpoints.py). Methods that carry state across steps (knowledge selection's phase
actions, progressive stages, text smoothing's two steps, DBKD's estimated logits) are where a resume
could go wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_reproducibility import assert_same_run, finished, killed, tiny_args, train

TINY_SELECTION = [
    "method.agent.episodes=2",
    "method.agent.episode_phases=2",
    "method.phase_steps=2",  # 3 batches an epoch: the kill (global step 5) falls inside a phase
    "method.reward.rows=4",
    "method.agent.batch_size=2",
]
METHODS = {
    "finetune": [],
    "pkd": [],
    "distilbert_kd": [],
    "internal_all": [],
    "internal_pid": [],
    "internal_sid": [],
    "knowledge_selection": TINY_SELECTION,
    "knowledge_selection_hard": TINY_SELECTION,
    "dbkd": ["method.queries.num_queries=3"],
    "decision_surrogate": ["method.queries.num_queries=3", "method.surrogate_epochs=2"],
    "text_smoothing_kd": ["method.mlm.adapt.steps=4", "method.mlm.adapt.batch_size=4", "method.top_k=8"],
    "text_smoothing": ["method.mlm.adapt.steps=4", "method.mlm.adapt.batch_size=4", "method.top_k=8"],
}


@pytest.mark.parametrize("method", METHODS)
def test_a_run_killed_after_a_step_checkpoint_resumes_to_the_uninterrupted_result(
    method: str, tiny_model_dir: Path, glue_dir: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    run = [f"method={method}", "trainer.max_epochs=3", "seed=3", *METHODS[method]]
    straight = tmp_path / "straight"
    finished(train(tiny_args(tiny_model_dir, glue_dir, cache, straight, *run), tmp_path))
    resumed = tmp_path / "resumed"
    args = tiny_args(tiny_model_dir, glue_dir, cache, resumed, *run, "checkpoint.every_n_steps=1")
    killed(train(args, tmp_path, fault="train_batch:epoch=1:batch=2"))
    proc = train(args, tmp_path)
    finished(proc)
    checkpoint = resumed / "checkpoints" / "last.ckpt"
    assert f"Resuming from {checkpoint} in epoch 1 at batch 2 " in proc.stdout + proc.stderr  # not from the start
    assert_same_run(straight, resumed)
