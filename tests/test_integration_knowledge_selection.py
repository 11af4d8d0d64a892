"""Knowledge selection end to end on the real MiniLM-L6 teacher and a ../shared/glue_data slice.

Marked `integration` (CI runs it): the teacher stage, the agent stage (2 episodes × 2 phases),
then the final 2-layer student with the trained actor; the per-phase actions and the agent
stage's rewards reach results.json and the step log.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tests.conftest import kdexp_train

pytestmark = pytest.mark.integration

SLICE = ["data.max_train_samples=96", "data.max_eval_samples=32", "data.max_length=64", "teacher.epochs=1",
         "teacher.max_train_samples=96", "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
         "trainer.log_every_n_steps=1", "logger=csv", "method.agent.episodes=2", "method.agent.episode_phases=2",
         "method.phase_steps=2", "method.reward.rows=16", "method.agent.batch_size=2"]


def test_knowledge_selection_on_minilm_records_actions_and_rewards(real_env: dict[str, str], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    log = kdexp_train(real_env, "task=sst2", "method=knowledge_selection", *SLICE, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert "Agent stage: episode 2/2" in log

    results = json.loads((run_dir / "results.json").read_text())
    info = results["method_info"]
    history = info["agent_stage"]["history"]
    assert [len(episode) for episode in history] == [2, 2]
    for phase in (p for episode in history for p in episode):
        assert len(phase["action"]) == 4 and all(0 <= a <= 1 for a in phase["action"]) and isinstance(phase["reward"], float)
    assert info["agent_stage"]["reward_rows"] == 16 and info["agent_stage"]["train_rows"] == 80
    steps = 96 // 32  # one epoch of batches of 32
    assert [p["step"] for p in info["phase_actions"]] == list(range(0, steps, 2))
    rows = list(csv.DictReader(open(run_dir / "csv" / "metrics.csv")))
    logged = [float(r["train/action/feak"]) for r in rows if r.get("train/action/feak")]
    assert len(logged) == steps and logged[0] == pytest.approx(info["phase_actions"][0]["weights"]["feak"], abs=1e-6)
    assert 0 <= results["metrics"]["val/accuracy"] <= 1
