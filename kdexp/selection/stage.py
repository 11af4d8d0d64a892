"""The agent stage of knowledge selection: episodes of short student training that teach the agent.

Each episode trains a fresh student from the run's initialisation for ``episode_phases`` phases
of ``phase_steps`` optimiser steps. At a phase's first batch the agent sees the state (the
student's and the teacher's final-layer [CLS], averaged over the batch and standardised) and
chooses the knowledge weights held for the phase (`action_weights`); after the phase the reward
is the decrease of the student's CE on the reward rows plus ``beta`` times the exploration
reward (`kdexp.selection.agent.phase_reward`), and the agent makes one DDPG update.

The reward rows are, by default, a slice of the training split (drawn with the agent's seed)
that the episodes do not train on; ``reward.split=dev`` takes the first rows of the dev split
instead (the paper's wording), and the dev split is read only then.

The stage is stored under ``<cache_dir>/agents/<task>-<key>``; the key holds everything that
decides the agent (teacher, the student's initial weights, training and reward rows, optimiser,
settings, agent seed). The run's seed enters only through the student's initial weights: a
student whose task head is new (every student built from a pre-trained checkpoint) gets a
different head per seed, so each seed of a sweep trains its own agent, and a re-run of a seed
reuses its agent. It saves its
progress after every episode in ``<store>.partial`` and a killed stage resumes from there, to
the same agent (every episode is seeded by ``(agent seed, episode)``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel, get_linear_schedule_with_warmup

from kdexp.cache import (
    atomic_torch_save,
    atomic_write_json,
    cache_key,
    exclusive_lock,
    publish_folder,
    wait_for_rank_zero,
)
from kdexp.data import TaskData, pad_batch
from kdexp.families import output_logits
from kdexp.faults import maybe_fail
from kdexp.hardware import Hardware, is_global_zero
from kdexp.losses import task_loss, weighted_sum
from kdexp.model_internals import forward_with_internals, model_inputs
from kdexp.seeding import derive_seed, preserved_rng, seed_all
from kdexp.selection.agent import (
    KNOWLEDGE_KINDS,
    DDPGAgent,
    DDPGConfig,
    exploration_reward,
    hard_action,
    phase_reward,
)
from kdexp.selection.knowledge import KnowledgeTerms
from kdexp.teacher import TeacherSignals

log = logging.getLogger(__name__)

AGENT_FILE = "agent.pt"
INFO_FILE = "agent.json"
PROGRESS_FILE = "progress.pt"


@dataclass(frozen=True)
class StageSettings:
    """What decides the agent stage, besides the teacher, the student and the data."""

    action: str  # soft | hard
    threshold: float
    phase_steps: int
    episodes: int
    episode_phases: int
    beta: float
    reward_split: str  # train | dev
    reward_rows: int
    agent: DDPGConfig
    learning_rate: float
    weight_decay: float
    warmup_ratio: float
    adam_epsilon: float
    gradient_clip_val: float | None
    batch_size: int


# --------------------------------------------------------------------------- states, actions, rewards


def standardised(vector: Tensor) -> Tensor:
    return (vector - vector.mean()) / (vector.std() + 1e-6)


@torch.no_grad()
def selection_state(
    student: PreTrainedModel,
    teacher_cls: Tensor,
    batch: Mapping[str, Tensor],
    sum_over_processes: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """``[h_S(CLS) | h_T(CLS)]``: the final-layer [CLS] vectors averaged over the batch, each standardised.

    The student is read in eval mode (no dropout), so the state draws no random numbers. Under DDP each
    process holds a slice of the batch: `sum_over_processes` (an all-reduce) makes the averages the whole
    batch's, the state the agent was trained on, the same in every process whatever their number.
    """
    was_training = student.training
    student.eval()
    hidden = forward_with_internals(student, dict(batch), need_attentions=False).hidden_states
    student.train(was_training)
    assert hidden is not None
    student_cls, teacher_cls = hidden[-1][:, 0].float(), teacher_cls.float()
    if sum_over_processes is None:
        student_mean, teacher_mean = student_cls.mean(dim=0), teacher_cls.mean(dim=0)
    else:
        rows = torch.tensor([float(len(student_cls))], device=student_cls.device)
        local = [student_cls.sum(dim=0), teacher_cls.sum(dim=0).to(student_cls.device), rows]
        sums = sum_over_processes(torch.cat(local))
        width = student_cls.shape[-1]
        student_mean, teacher_mean = sums[:width] / sums[-1], sums[width:-1] / sums[-1]
    return torch.cat([standardised(student_mean), standardised(teacher_mean)]).cpu()


def action_weights(action: Tensor, mode: str, threshold: float) -> dict[str, float]:
    """The loss weights of a soft action (the action itself) or a hard one (`hard_action`)."""
    values = hard_action(action, threshold) if mode == "hard" else action
    return dict(zip(KNOWLEDGE_KINDS, (float(v) for v in values)))


def reward_rows(data: TaskData, split: str, rows: int, seed: int) -> tuple[Any, list[int]]:
    """The rows whose CE is the reward, and the training rows the episodes may use.

    `train`: `rows` training rows drawn with `seed`, kept out of the episodes' training rows.
    `dev`: the first `rows` rows of the dev split (the paper's choice); every training row trains.
    """
    train = data.train
    if split == "dev":
        dev = data.tokenized[data.task.eval_splits[0]]
        return dev.select(range(min(rows, len(dev)))), list(range(len(train)))
    if rows >= len(train):
        raise ValueError(f"method.reward.rows={rows} leaves no training rows of the {len(train)}; use fewer")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(derive_seed(seed, "reward rows")))
    held_out = sorted(order[:rows].tolist())
    kept = sorted(order[rows:].tolist())
    return train.select(held_out), kept


@torch.no_grad()
def mean_cross_entropy(
    student: nn.Module, rows: Any, data: TaskData, hardware: Hardware, batch_size: int = 64
) -> float:
    """The student's task loss (CE; MSE for regression) over `rows`, in eval mode, in `hardware`'s precision."""
    was_training = student.training
    student.eval()
    collate = partial(pad_batch, pad_token_id=data.pad_token_id, regression=data.task.is_regression)
    loader = torch.utils.data.DataLoader(rows, batch_size=batch_size, shuffle=False, collate_fn=collate)
    total, count = 0.0, 0
    for batch in loader:
        batch = hardware.to_device(batch)
        with hardware.autocast():
            logits = output_logits(student(**model_inputs(batch, student)), batch)
        total += float(task_loss(logits, batch["labels"], data.task.is_regression)) * len(batch["labels"])
        count += len(batch["labels"])
    student.train(was_training)
    return total / max(count, 1)


# --------------------------------------------------------------------------- the stage


def weights_fingerprint(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        # The raw bytes (NumPy has no bfloat16); a float32 tensor's are what .numpy() gives, so old keys hold.
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:20]


def agent_key(
    settings: StageSettings,
    teacher_key: str,
    student: nn.Module,
    data_key: str,
    max_length: int,
    temperature: float,
    precision: str = "32-true",
) -> str:
    return cache_key(
        kind="selection_agent",
        teacher=teacher_key,
        student=weights_fingerprint(student),
        data=data_key,
        max_length=max_length,
        temperature=temperature,
        settings={**asdict(settings), "agent": asdict(settings.agent)},
        **({} if precision == "32-true" else {"precision": precision}),
    )


def _training_batches(rows: Any, data: TaskData, batch_size: int, seed: int) -> Iterator[dict[str, Tensor]]:
    """Endless batches over `rows`, a new order from `(seed, pass)` on every pass."""
    collate = partial(pad_batch, pad_token_id=data.pad_token_id, regression=data.task.is_regression)
    passes = 0
    while True:
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(derive_seed(seed, "pass", passes)))
        for start in range(0, len(rows), batch_size):
            yield collate([rows[int(i)] for i in order[start : start + batch_size]])
        passes += 1


class AgentStage:
    """Trains the agent over episodes; `run()` returns the agent and the record of every phase."""

    def __init__(
        self,
        settings: StageSettings,
        student: PreTrainedModel,
        teacher: TeacherSignals,
        teacher_cls_layer: int,
        data: TaskData,
        temperature: float,
        hardware: Hardware,
    ) -> None:
        self.settings = settings
        self.initial_student = student
        self.teacher = teacher
        self.teacher_cls_layer = teacher_cls_layer
        self.data = data
        self.temperature = temperature
        self.hardware = hardware
        self.reward_rows, self.train_rows = reward_rows(
            data, settings.reward_split, settings.reward_rows, settings.agent.seed
        )
        teacher_model = teacher.model
        assert teacher_model is not None
        self.agent = DDPGAgent(student.config.hidden_size, teacher_model.config.hidden_size, settings.agent)

    def run_episode(self, episode: int) -> list[dict[str, Any]]:
        settings = self.settings
        seed = derive_seed(settings.agent.seed, "episode", episode)
        seed_all(seed)
        hardware = self.hardware
        teacher = hardware.to_device(self.teacher)  # its live model follows (TeacherSignals._apply)
        teacher_model = teacher.model
        assert teacher_model is not None  # checked in __init__
        student = hardware.to_device(copy.deepcopy(self.initial_student)).train()
        knowledge = hardware.to_device(
            KnowledgeTerms(student.config, teacher_model.config, self.temperature, self.data.task.is_regression)
        )
        trained = nn.ModuleList([student, knowledge])
        parameters = [*student.named_parameters(), *knowledge.named_parameters()]
        optimizer = _adamw(parameters, settings)
        total_steps = settings.episode_phases * settings.phase_steps
        scheduler = get_linear_schedule_with_warmup(optimizer, int(settings.warmup_ratio * total_steps), total_steps)
        optimizer = hardware.optimizer(optimizer)
        batches = _training_batches(self.data.train.select(self.train_rows), self.data, settings.batch_size, seed)
        ce_before = mean_cross_entropy(student, self.reward_rows, self.data, hardware)
        record: list[dict[str, Any]] = []
        pending: tuple[Tensor, Tensor, float] | None = None
        previous: Tensor | None = None
        for phase in range(settings.episode_phases):
            batch = self._to_device(next(batches))
            state = self._state(student, batch)
            if pending is not None:
                self.agent.observe(*pending, next_state=state, done=False)
                self.agent.update()
            action = self.agent.act(state, explore=True)
            weights = action_weights(action, settings.action, settings.threshold)
            for step in range(settings.phase_steps):
                if step > 0:
                    batch = self._to_device(next(batches))
                active = {k: w for k, w in weights.items() if w != 0}
                with hardware.autocast():
                    loss = weighted_sum(knowledge(student, teacher, batch, list(active)), active)
                optimizer.zero_grad(set_to_none=True)
                hardware.backward(loss)
                if settings.gradient_clip_val:
                    hardware.clip_gradients(trained, optimizer, settings.gradient_clip_val)
                optimizer.step()
                scheduler.step()
            ce_after = mean_cross_entropy(student, self.reward_rows, self.data, hardware)
            exploration = exploration_reward(action, previous, settings.action, settings.threshold)
            reward = phase_reward(ce_before, ce_after, exploration, settings.beta)
            record.append(
                {
                    "phase": phase,
                    "action": [round(float(a), 6) for a in action],
                    "reward": reward,
                    "reward_ce": ce_after,
                }
            )
            pending, previous, ce_before = (state, action, reward), action, ce_after
        assert pending is not None
        self.agent.observe(*pending, next_state=self._state(student, self._to_device(next(batches))), done=True)
        self.agent.update()
        return record

    def _state(self, student: PreTrainedModel, batch: dict[str, Tensor]) -> Tensor:
        with self.hardware.autocast():
            return selection_state(student, self.teacher.cls(batch, self.teacher_cls_layer), batch)

    def _to_device(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The batch with its rows of the teacher's cached signals, on the stage's device."""
        return self.hardware.to_device({**batch, **self.teacher.rows(batch)})


def _adamw(named: Sequence[tuple[str, nn.Parameter]], settings: StageSettings) -> torch.optim.Optimizer:
    no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight")
    groups = [
        {"params": [p for n, p in named if not n.endswith(no_decay)], "weight_decay": settings.weight_decay},
        {"params": [p for n, p in named if n.endswith(no_decay)], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=settings.learning_rate, eps=settings.adam_epsilon)


def trained_agent(stage: AgentStage, store: Path, key: str) -> tuple[DDPGAgent, dict[str, Any]]:
    """The stored agent of `key`, or train it (once across processes; resumable) and store it."""
    info = _stored_info(store)
    if info is not None:
        return _load_agent(stage, store), dict(info, from_cache=True)
    if not is_global_zero():  # DDP: the first process trains the agent, the others read it
        info = wait_for_rank_zero(store, lambda: _stored_info(store))
        return _load_agent(stage, store), dict(info, from_cache=True)
    with exclusive_lock(store.with_name(store.name + ".lock")):
        info = _stored_info(store)
        if info is None:
            with preserved_rng():  # a cold and a warm cache leave the run's generators alike
                _train_and_store(stage, store, key)
            info = _stored_info(store)
            assert info is not None
            info = dict(info, from_cache=False)
        else:
            info = dict(info, from_cache=True)
    return _load_agent(stage, store), info


def _stored_info(store: Path) -> dict[str, Any] | None:
    try:
        return json.loads((store / INFO_FILE).read_text()) if (store / AGENT_FILE).exists() else None
    except (OSError, json.JSONDecodeError):
        return None


def _load_agent(stage: AgentStage, store: Path) -> DDPGAgent:
    stage.agent.load_state_dict(torch.load(store / AGENT_FILE, map_location="cpu", weights_only=True))
    return stage.agent


def _train_and_store(stage: AgentStage, store: Path, key: str) -> None:
    partial_dir = store.with_name(store.name + ".partial")
    partial_dir.mkdir(parents=True, exist_ok=True)
    progress_file = partial_dir / PROGRESS_FILE
    history: list[list[dict[str, Any]]] = []
    seconds = 0.0
    if progress_file.exists():
        progress = torch.load(progress_file, map_location="cpu", weights_only=True)
        stage.agent.load_state_dict(progress["agent"])
        history, seconds = json.loads(progress["history"]), float(progress["seconds"])
        log.info("Resuming the agent stage %s after episode %d", partial_dir, len(history))
    for episode in range(len(history), stage.settings.episodes):
        maybe_fail("agent_episode", episode=episode)
        started = time.perf_counter()
        history.append(stage.run_episode(episode))
        seconds += time.perf_counter() - started
        atomic_torch_save(
            progress_file, {"agent": stage.agent.state_dict(), "history": json.dumps(history), "seconds": seconds}
        )
        rewards = [phase["reward"] for phase in history[-1]]
        log.info(
            "Agent stage: episode %d/%d, mean reward %.4f, %.1fs",
            episode + 1,
            stage.settings.episodes,
            sum(rewards) / len(rewards),
            time.perf_counter() - started,
        )
    atomic_torch_save(partial_dir / AGENT_FILE, stage.agent.state_dict())
    atomic_write_json(
        partial_dir / INFO_FILE,
        {
            "key": key,
            "episodes": stage.settings.episodes,
            "seconds": seconds,
            "history": history,
            "reward_split": stage.settings.reward_split,
            "reward_rows": len(stage.reward_rows),
            "train_rows": len(stage.train_rows),
        },
    )
    progress_file.unlink()
    publish_folder(partial_dir, store, lambda folder: _stored_info(folder) is not None)


def episode_summary(history: list[list[dict[str, Any]]]) -> list[dict[str, float]]:
    """Mean reward and mean action per episode (for results.json and the log)."""
    summary = []
    for episode in history:
        actions = torch.tensor([phase["action"] for phase in episode])
        summary.append(
            {
                "mean_reward": sum(p["reward"] for p in episode) / len(episode),
                **{f"mean_{k}": float(v) for k, v in zip(KNOWLEDGE_KINDS, actions.mean(dim=0))},
                "final_reward_ce": episode[-1]["reward_ce"],
            }
        )
    return summary


__all__ = [
    "AgentStage",
    "StageSettings",
    "action_weights",
    "agent_key",
    "episode_summary",
    "mean_cross_entropy",
    "reward_rows",
    "selection_state",
    "trained_agent",
    "weights_fingerprint",
]
