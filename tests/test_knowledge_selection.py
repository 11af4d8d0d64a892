"""Knowledge selection: the four knowledge losses, the policy per phase, the reward rows, the agent stage."""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import BertForSequenceClassification

import kdexp.selection.stage as stage_mod
from kdexp.hardware import Hardware
from kdexp.losses import weighted_sum
from kdexp.methods.knowledge_selection import KnowledgeSelection
from kdexp.run import build_context, method_options, run
from kdexp.selection.knowledge import KnowledgeTerms, consecutive_layers
from kdexp.selection.stage import action_weights, mean_cross_entropy, reward_rows
from kdexp.tasks import get_task
from kdexp.teacher import TeacherSignals
from tests.conftest import tiny_bert_config, tiny_tokenizer
from tests.test_pipeline import tiny_cfg

TASK = get_task("sst2")
SMALL_AGENT = [
    "method.agent.episodes=2",
    "method.agent.episode_phases=2",
    "method.phase_steps=2",
    "method.reward.rows=4",
    "method.agent.batch_size=2",
    "student.num_layers=2",
    "logger=csv",
]


def a_batch() -> dict[str, torch.Tensor]:
    enc = tiny_tokenizer()(["the movie is good", "a bad film", "not fun !"], padding=True, return_tensors="pt")
    return {**enc, "labels": torch.tensor([1, 0, 0]), "idx": torch.tensor([0, 1, 2])}


def teacher_and_copy() -> tuple[BertForSequenceClassification, BertForSequenceClassification, TeacherSignals]:
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(tiny_bert_config(num_layers=2)).eval()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        logits = teacher(**{k: v for k, v in a_batch().items() if k not in ("labels", "idx")}).logits
    return teacher, student, TeacherSignals(logits=logits, model=copy.deepcopy(teacher))


def test_response_feature_and_relation_knowledge_vanish_for_a_copy_of_the_teacher() -> None:
    teacher, student, signals = teacher_and_copy()
    knowledge = KnowledgeTerms(student.config, teacher.config, temperature=2.0, regression=False)
    terms = knowledge(student, signals, a_batch(), ["fink", "resk", "feak", "relk"])
    assert set(terms) == {"fink", "resk", "feak", "relk"}
    assert abs(float(terms["resk"])) < 1e-6 and float(terms["feak"]) < 1e-10 and float(terms["relk"]) < 1e-8
    assert float(terms["fink"]) > 0.1  # the gold-label term does not vanish: it is not knowledge of the teacher
    assert not list(knowledge.projections.parameters())  # equal widths: identity projections


def test_relation_knowledge_runs_over_the_embeddings_and_every_matched_layer() -> None:
    from kdexp.internal.layer_map import LayerPair

    assert consecutive_layers([LayerPair(0, 1), LayerPair(1, 3)]) == [((0, 0), (1, 2)), ((1, 2), (2, 4))]


def test_the_step_loss_is_the_weighted_sum_and_its_gradient_scales_with_the_action() -> None:
    teacher, _, signals = teacher_and_copy()
    torch.manual_seed(1)
    student = BertForSequenceClassification(tiny_bert_config(num_layers=2)).eval()
    knowledge = KnowledgeTerms(student.config, teacher.config, temperature=2.0, regression=False)
    terms = knowledge(student, signals, a_batch(), ["fink", "resk", "feak", "relk"])
    gradients = []
    for scale in (1.0, 2.0):
        student.zero_grad()
        weighted_sum(terms, {k: scale * w for k, w in zip(terms, (0.3, 0.2, 0.4, 0.1))}).backward(retain_graph=True)
        gradients.append(student.classifier.weight.grad.clone())
    assert torch.allclose(gradients[1], 2 * gradients[0], atol=1e-7)
    expected = 0.3 * terms["fink"] + 0.2 * terms["resk"] + 0.4 * terms["feak"] + 0.1 * terms["relk"]
    assert torch.allclose(weighted_sum(terms, dict(zip(terms, (0.3, 0.2, 0.4, 0.1)))), expected)


def test_hard_actions_threshold_and_fall_back_to_fink() -> None:
    action = torch.tensor([0.2, 0.7, 0.5, 0.9])
    assert action_weights(action, "soft", 0.5) == pytest.approx(dict(fink=0.2, resk=0.7, feak=0.5, relk=0.9))
    assert action_weights(action, "hard", 0.5) == dict(fink=0.0, resk=1.0, feak=0.0, relk=1.0)
    assert action_weights(torch.full((4,), 0.1), "hard", 0.5) == dict(fink=1.0, resk=0.0, feak=0.0, relk=0.0)


# --------------------------------------------------------------------------- through a run


def context(tiny_model_dir: Path, glue_dir: Path, tmp_path: Path, *overrides: str):
    cfg = tiny_cfg(tiny_model_dir, glue_dir, tmp_path / "cache", "method=knowledge_selection", *SMALL_AGENT, *overrides)
    return build_context(cfg, tmp_path / "run")


def test_reward_rows_are_disjoint_from_the_rows_the_episodes_train_on(
    tiny_model_dir: Path, glue_dir: Path, tmp_path: Path
) -> None:
    run_context, _, _ = context(tiny_model_dir, glue_dir, tmp_path)
    data = run_context.data
    held_out, kept = reward_rows(data, "train", 4, seed=0)
    assert len(held_out) == 4 and len(kept) == len(data.train) - 4
    assert set(held_out["idx"]).isdisjoint(kept) and set(held_out["idx"]) | set(kept) == set(range(len(data.train)))
    dev_rows, every_row = reward_rows(data, "dev", 3, seed=0)
    assert list(dev_rows["idx"]) == [0, 1, 2] and every_row == list(range(len(data.train)))


def test_mean_cross_entropy_is_the_task_loss_over_the_rows(
    tiny_model_dir: Path, glue_dir: Path, tmp_path: Path
) -> None:
    run_context, _, _ = context(tiny_model_dir, glue_dir, tmp_path)
    rows = run_context.data.train.select(range(5))
    student = run_context.student.eval()
    by_hand = []
    for row in rows:
        logits = student(
            input_ids=torch.tensor([row["input_ids"]]),
            attention_mask=torch.tensor([row["attention_mask"]]),
            token_type_ids=torch.tensor([row["token_type_ids"]]),
        ).logits
        by_hand.append(float(torch.nn.functional.cross_entropy(logits, torch.tensor([row["labels"]]))))
    assert mean_cross_entropy(student, rows, run_context.data, Hardware(), batch_size=2) == pytest.approx(
        sum(by_hand) / 5, rel=1e-5
    )


class DevTouched(Exception):
    pass


def test_agent_stage_rewards_are_the_measured_ce_decrease_and_never_read_dev(
    tiny_model_dir: Path, glue_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_context, cls, options = context(tiny_model_dir, glue_dir, tmp_path, "method.reward.beta=0")
    dev_split = TASK.eval_splits[0]

    class Untouchable:
        def __getattr__(self, name):
            raise DevTouched(name)

        def __len__(self):
            raise DevTouched("len")

    run_context.data.tokenized[dev_split] = Untouchable()  # the agent stage must not read the dev rows
    measured: list[float] = []
    original = stage_mod.mean_cross_entropy

    def spy(*args, **kwargs):
        measured.append(original(*args, **kwargs))
        return measured[-1]

    monkeypatch.setattr(stage_mod, "mean_cross_entropy", spy)
    module = cls.from_run(run_context, options)
    history = run_context.method_info["agent_stage"]["history"]
    assert [len(episode) for episode in history] == [2, 2]
    rewards = [phase["reward"] for episode in history for phase in episode]
    # per episode: CE before phase 0, after phase 0, after phase 1
    expected = [measured[e * 3 + p] - measured[e * 3 + p + 1] for e in range(2) for p in range(2)]
    assert rewards == pytest.approx(expected, abs=1e-12)
    assert module.agent is not None

    with pytest.raises(DevTouched):
        cls.from_run(
            run_context,
            method_options(
                "knowledge_selection",
                **{
                    "reward.split": "dev",
                    "agent.episodes": 2,
                    "agent.episode_phases": 2,
                    "phase_steps": 2,
                    "reward.rows": 4,
                    "agent.batch_size": 2,
                },
            ),
        )


def test_the_policy_acts_once_per_phase_and_the_agent_stage_is_reused(
    tiny_model_dir: Path, glue_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    acts: list[int] = []
    original_decide = KnowledgeSelection.decide

    def counting_decide(self, batch):
        acts.append(int(self.global_step))
        return original_decide(self, batch)

    monkeypatch.setattr(KnowledgeSelection, "decide", counting_decide)
    cfg = tiny_cfg(
        tiny_model_dir,
        glue_dir,
        tmp_path / "cache",
        "method=knowledge_selection",
        *SMALL_AGENT,
        "trainer.max_epochs=2",
        "data.batch_size=4",
        "trainer.log_every_n_steps=1",
    )
    first = run(cfg, tmp_path / "a")
    steps = 2 * math.ceil(12 / 4)
    assert acts == list(range(0, steps, 2))  # one decision at the first step of every 2-step phase
    phases = first["method_info"]["phase_actions"]
    assert [p["step"] for p in phases] == acts and all(
        set(p["weights"]) == {"fink", "resk", "feak", "relk"} for p in phases
    )
    assert first["method_info"]["agent_stage"]["from_cache"] is False

    monkeypatch.setattr(stage_mod.AgentStage, "run_episode", lambda *a, **k: pytest.fail("the agent was trained again"))
    second = run(
        tiny_cfg(
            tiny_model_dir,
            glue_dir,
            tmp_path / "cache",
            "method=knowledge_selection",
            *SMALL_AGENT,
            "trainer.max_epochs=2",
            "data.batch_size=4",
            "seed=2",
        ),
        tmp_path / "b",
    )
    assert second["method_info"]["agent_stage"]["from_cache"] is True
    assert second["method_info"]["agent_stage"]["key"] == first["method_info"]["agent_stage"]["key"]
    log = (tmp_path / "a" / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert all(f"train/action/{kind}" in log for kind in ("fink", "resk", "feak", "relk"))
    assert "train/loss/fink" in log


def test_a_killed_agent_stage_resumes_to_the_same_agent(tiny_model_dir: Path, glue_dir: Path, tmp_path: Path) -> None:
    def launch(cache: Path, run_dir: Path, fault: str | None = None) -> subprocess.CompletedProcess:
        env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
        env.pop("KDEXP_FAULT_AT", None)
        if fault:
            env["KDEXP_FAULT_AT"] = fault
        args = [
            f"teacher.name_or_path={tiny_model_dir}",
            f"data.glue_dir={glue_dir}",
            f"cache_dir={cache}",
            f"hydra.run.dir={run_dir}",
            "teacher.epochs=1",
            "teacher.batch_size=4",
            "data.batch_size=4",
            "data.max_length=32",
            "trainer.max_epochs=1",
            "trainer.enable_progress_bar=false",
            "optim.learning_rate=1e-3",
            "method=knowledge_selection",
            *SMALL_AGENT,
            "method.agent.episodes=3",
        ]
        return subprocess.run(
            [sys.executable, "-m", "kdexp.train", *args],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=600,
        )

    straight = launch(tmp_path / "c1", tmp_path / "r1")
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = launch(tmp_path / "c2", tmp_path / "r2", fault="agent_episode:episode=2")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = launch(tmp_path / "c2", tmp_path / "r2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "after episode 2" in resumed.stdout + resumed.stderr

    [a] = (tmp_path / "c1" / "agents").glob("*/agent.pt")
    [b] = (tmp_path / "c2" / "agents").glob("*/agent.pt")
    saved_a, saved_b = (torch.load(p, weights_only=True) for p in (a, b))
    for name in ("actor", "critic", "target_actor", "target_critic"):
        for key, tensor in saved_a[name].items():
            assert torch.equal(tensor, saved_b[name][key]), (name, key)
    results = [json.loads((tmp_path / r / "results.json").read_text()) for r in ("r1", "r2")]
    assert results[0]["method_info"]["agent_stage"]["history"] == results[1]["method_info"]["agent_stage"]["history"]
    assert results[0]["metrics"] == results[1]["metrics"]


def test_the_actions_plot_draws_one_line_per_kind_through_the_weights(tmp_path: Path) -> None:
    import re

    from kdexp.tools import plot_actions

    weights = [
        {"fink": 1.0, "resk": 0.5, "feak": 0.0, "relk": 0.25},
        {"fink": 0.0, "resk": 1.0, "feak": 1.0, "relk": 0.0},
    ]
    results = {
        "task": "sst2",
        "method": "knowledge_selection",
        "seed": 1,
        "method_info": {"phase_actions": [{"phase": i, "step": 2 * i, "weights": w} for i, w in enumerate(weights)]},
    }
    (tmp_path / "results.json").write_text(json.dumps(results))
    plot_actions.main([str(tmp_path), "--out", str(tmp_path / "a.svg")])
    svg = (tmp_path / "a.svg").read_text()
    lines = dict(re.findall(r'data-kind="(\w+)" points="([^"]+)"', svg))
    assert set(lines) == {"fink", "resk", "feak", "relk"}
    bottom, top = plot_actions.HEIGHT - plot_actions.MARGIN, plot_actions.MARGIN
    for kind, points in lines.items():
        ys = [float(point.split(",")[1]) for point in points.split()]
        assert ys == pytest.approx([bottom - (bottom - top) * w[kind] for w in weights])


def test_phases_count_optimiser_steps_under_gradient_accumulation(
    tiny_model_dir: Path, glue_dir: Path, tmp_path: Path
) -> None:
    """12 rows, batches of 2 accumulated in pairs: 3 optimiser steps an epoch; 2-step phases start at steps 0, 2, 4."""
    cfg = tiny_cfg(
        tiny_model_dir,
        glue_dir,
        tmp_path / "cache",
        "method=knowledge_selection",
        "method.policy=random",
        "method.phase_steps=2",
        "student.num_layers=2",
        "data.batch_size=2",
        "+trainer.accumulate_grad_batches=2",
        "trainer.max_epochs=2",
    )
    results = run(cfg, tmp_path / "run")
    assert [p["step"] for p in results["method_info"]["phase_actions"]] == [0, 2, 4]


def test_the_agent_key_fingerprints_a_bf16_student_and_keeps_float32_fingerprints() -> None:
    import hashlib

    from kdexp.selection.stage import weights_fingerprint

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().numpy().tobytes())
    assert weights_fingerprint(model) == digest.hexdigest()[:20]  # the keys written before stay valid
    as_bf16 = weights_fingerprint(copy.deepcopy(model).to(torch.bfloat16))
    assert len(as_bf16) == 20 and as_bf16 != weights_fingerprint(model)


def _selection_inputs() -> tuple[BertForSequenceClassification, torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    student = BertForSequenceClassification(tiny_bert_config(num_layers=2))
    texts = ["the movie is good", "a bad film", "not fun !", "the plot is very dull"]
    batch = dict(tiny_tokenizer()(texts, padding=True, return_tensors="pt"))
    return student, torch.randn(4, 32, generator=torch.Generator().manual_seed(1)), batch


def _state_in_one_of_two_processes(rank: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    from kdexp.selection.stage import selection_state

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    student, teacher_cls, batch = _selection_inputs()
    rows = slice(2 * rank, 2 * rank + 2)  # each process holds half the batch, as DDP's sampler gives it

    def sum_over_processes(tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor)
        return tensor

    state = selection_state(student, teacher_cls[rows], {k: v[rows] for k, v in batch.items()}, sum_over_processes)
    torch.save(state, Path(out) / f"state{rank}.pt")
    dist.destroy_process_group()


def test_under_two_process_ddp_the_selection_state_is_the_whole_batchs_in_both_processes(tmp_path: Path) -> None:
    from kdexp.selection.stage import selection_state

    torch.multiprocessing.spawn(
        _state_in_one_of_two_processes, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True
    )
    first, second = (torch.load(tmp_path / f"state{rank}.pt") for rank in (0, 1))
    student, teacher_cls, batch = _selection_inputs()
    whole = selection_state(student, teacher_cls, batch)
    half = selection_state(student, teacher_cls[:2], {k: v[:2] for k, v in batch.items()})
    assert torch.equal(first, second) and torch.allclose(first, whole, atol=1e-5)
    assert not torch.allclose(half, whole, atol=1e-2)  # what rank 0 alone would have given the agent
