"""Knowledge selection end to end on the real MiniLM-L6 teacher and a ../shared/glue_data slice.

Marked `integration` (CI runs it): the teacher stage, the agent stage (4 episodes × 3 phases),
then the final 2-layer student with the trained actor; the per-phase actions and the agent
stage's rewards reach results.json and the step log, and they show the agent at work: its
actions change over the episodes, and the reward moves with the knowledge weights.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from tests.conftest import kdexp_train

pytestmark = pytest.mark.integration

SLICE = [
    "data.max_train_samples=96",
    "data.max_eval_samples=32",
    "data.max_length=64",
    "teacher.epochs=1",
    "teacher.max_train_samples=96",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
    "logger=csv",
    "method.agent.episodes=4",
    "method.agent.episode_phases=3",
    "method.phase_steps=2",
    "method.reward.rows=16",
    "method.agent.batch_size=2",
]


def test_knowledge_selection_on_minilm_records_actions_and_rewards(real_env: dict[str, str], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    log = kdexp_train(
        real_env, "task=sst2", "method=knowledge_selection", *SLICE, f"hydra.run.dir={run_dir}", cwd=tmp_path
    )
    assert "Agent stage: episode 4/4" in log

    results = json.loads((run_dir / "results.json").read_text())
    info = results["method_info"]
    history = info["agent_stage"]["history"]
    assert [len(episode) for episode in history] == [3, 3, 3, 3]
    phases = [p for episode in history for p in episode]
    for phase in phases:
        assert (
            len(phase["action"]) == 4
            and all(0 <= a <= 1 for a in phase["action"])
            and isinstance(phase["reward"], float)
        )
    assert_the_agent_learns(history, beta=0.1)  # conf/method/knowledge_selection.yaml's reward.beta
    assert info["agent_stage"]["reward_rows"] == 16 and info["agent_stage"]["train_rows"] == 80
    steps = 96 // 32  # one epoch of batches of 32
    assert [p["step"] for p in info["phase_actions"]] == list(range(0, steps, 2))
    rows = list(csv.DictReader(open(run_dir / "csv" / "metrics.csv")))
    logged = [float(r["train/action/feak"]) for r in rows if r.get("train/action/feak")]
    assert len(logged) == steps and logged[0] == pytest.approx(info["phase_actions"][0]["weights"]["feak"], abs=1e-6)
    assert 0 <= results["metrics"]["val/accuracy"] <= 1


def pearson(x: list[float], y: list[float]) -> float:
    a, b = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def assert_the_agent_learns(history: list[list[dict]], beta: float) -> None:
    """The recorded agent stage is not a constant policy with a constant reward.

    - The actor changes between episodes: the mean action of the last episode differs from the first's
      (noise_std is 0: every change comes from the DDPG updates).
    - The rewards differ, and each phase's reward is what the weights and the student's held-out CE make
      it: the CE decrease since the previous phase plus beta·(1 − cos(a_t, a_{t−1})) (recomputed here).
    - The held-out CE that the reward measures moves with the knowledge weights: the more weight on
      FinK (the gold-label CE itself), the lower the reward rows' CE after the phase. For this seed the
      correlation over the 12 phases is −0.81 (measured; ResK, whose weight the agent raises as it lowers
      the others, +0.83); the check asks for < −0.5.
    """
    first, last = (torch.tensor([p["action"] for p in episode]).mean(dim=0) for episode in (history[0], history[-1]))
    assert float((first - last).abs().max()) > 0.05, (first, last)

    rewards = [p["reward"] for episode in history for p in episode]
    assert max(rewards) - min(rewards) > 1e-4, rewards
    for episode in history:
        for previous, phase in zip(episode, episode[1:]):
            a, b = (
                torch.tensor(phase["action"], dtype=torch.float64),
                torch.tensor(previous["action"], dtype=torch.float64),
            )
            exploration = 1.0 - float(torch.nn.functional.cosine_similarity(a, b, dim=0))
            expected = previous["reward_ce"] - phase["reward_ce"] + beta * exploration
            assert math.isclose(phase["reward"], expected, abs_tol=1e-6), (phase, previous)

    phases = [p for episode in history for p in episode]
    fink = [p["action"][0] for p in phases]
    assert pearson(fink, [p["reward_ce"] for p in phases]) < -0.5
