"""Knowledge selection (Wang et al., Findings of EMNLP 2022, arXiv 2302.00444) and its baselines.

The step loss is ``L = Σ_k a_k·L_k`` over four kinds of teacher knowledge (`kdexp.selection.knowledge`:
FinK, ResK, FeaK, RelK). Training is split into phases of ``phase_steps`` optimiser steps; at each
phase's first batch a policy chooses the weights ``a``, held for the phase (docs/methods/knowledge_selection.md):

- ``policy: agent`` (``knowledge_selection``, ``knowledge_selection_hard``): an actor-critic (DDPG)
  agent trained first in the agent stage (`kdexp.selection.stage`, cached by key: one agent per
  student initialisation, so per seed) acts on the state without exploration; ``action: soft`` uses ``a`` itself,
  ``hard`` thresholds it (``a_k > threshold``; all zero falls back to FinK).
- ``policy: random`` (``knowledge_random_soft``/``_hard``): a uniform random action per phase,
  drawn from ``(seed, phase)``.
- ``policy: fixed`` (``knowledge_equal``, or any ``weights=[...]``): the same weights throughout.

The final student trains on all training rows (the reward rows are only kept out of the agent
stage's episodes). The actions of every phase go to the logger (``train/action/<kind>``) and
to ``results.json`` (``method_info.phase_actions``), with the agent stage's episodes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import MISSING
from torch import Tensor

from kdexp.config import require
from kdexp.errors import ConfigError
from kdexp.methods.base import DistillationModule
from kdexp.phases import PhaseSchedule
from kdexp.seeding import derive_seed
from kdexp.selection.agent import KNOWLEDGE_KINDS, DDPGAgent, DDPGConfig
from kdexp.selection.knowledge import KnowledgeTerms
from kdexp.selection.stage import (
    AgentStage,
    StageSettings,
    action_weights,
    agent_key,
    episode_summary,
    selection_state,
    trained_agent,
)
from kdexp.tasks import CLASSIFICATION
from kdexp.teacher import TeacherSignals

if TYPE_CHECKING:
    from kdexp.context import RunContext

log = logging.getLogger(__name__)

POLICIES = ("agent", "random", "fixed")
ACTIONS = ("soft", "hard")
REWARD_SPLITS = ("train", "dev")
ACTIONS_CHECKPOINT_KEY = "knowledge_selection"


@dataclass
class AgentOptions:
    """`method.agent`: the DDPG agent and its training episodes."""

    episodes: int = MISSING
    episode_phases: int = MISSING
    gamma: float = MISSING
    tau: float = MISSING
    actor_lr: float = MISSING
    critic_lr: float = MISSING
    batch_size: int = MISSING
    buffer_capacity: int = MISSING
    hidden: int = MISSING
    noise_std: float = MISSING
    updates_per_phase: int = MISSING
    seed: int = MISSING

    def ddpg(self) -> DDPGConfig:
        return DDPGConfig(
            gamma=self.gamma,
            tau=self.tau,
            actor_lr=self.actor_lr,
            critic_lr=self.critic_lr,
            batch_size=self.batch_size,
            buffer_capacity=self.buffer_capacity,
            hidden=self.hidden,
            noise_std=self.noise_std,
            updates_per_step=self.updates_per_phase,
            seed=self.seed,
        )


@dataclass
class RewardOptions:
    split: str = MISSING
    rows: int = MISSING
    beta: float = MISSING


@dataclass
class KnowledgeSelectionOptions:
    policy: str = MISSING
    action: str = MISSING
    weights: list[float] = MISSING  # fink, resk, feak, relk (policy fixed)
    threshold: float = MISSING
    temperature: float = MISSING
    phase_steps: int = MISSING
    agent: AgentOptions = field(default_factory=AgentOptions)
    reward: RewardOptions = field(default_factory=RewardOptions)

    def check(self) -> None:
        require(self.policy in POLICIES, "method.policy", self.policy, " / ".join(POLICIES))
        require(self.action in ACTIONS, "method.action", self.action, "soft or hard")
        require(
            len(self.weights) == len(KNOWLEDGE_KINDS) and min(self.weights) >= 0 and max(self.weights) > 0,
            "method.weights",
            list(self.weights),
            "four non-negative weights (fink, resk, feak, relk), not all 0",
        )
        require(0 < self.threshold < 1, "method.threshold", self.threshold, "a threshold in (0, 1)")
        require(self.temperature > 0, "method.temperature", self.temperature, "a positive temperature")
        require(self.phase_steps >= 1, "method.phase_steps", self.phase_steps, "1 or more optimiser steps")
        require(self.reward.split in REWARD_SPLITS, "method.reward.split", self.reward.split, "train or dev")
        require(self.reward.rows >= 1, "method.reward.rows", self.reward.rows, "1 or more rows")
        require(self.reward.beta >= 0, "method.reward.beta", self.reward.beta, "0 or more")
        require(self.agent.episodes >= 1, "method.agent.episodes", self.agent.episodes, "1 or more")
        require(self.agent.episode_phases >= 2, "method.agent.episode_phases", self.agent.episode_phases, "2 or more")
        try:
            self.agent.ddpg()
        except ValueError as err:
            raise ConfigError(f"method.agent: {err}") from None


class KnowledgeSelection(DistillationModule):
    """The student's loss weighted phase by phase by a policy over the four kinds of knowledge."""

    families = (CLASSIFICATION,)

    Options = KnowledgeSelectionOptions
    phases: PhaseSchedule  # set in __init__: every run of the method is phased

    def __init__(
        self,
        student: Any,
        task: Any,
        optim: Any = None,
        *,
        options: KnowledgeSelectionOptions,
        teacher: TeacherSignals,
        seed: int = 0,
        agent: DDPGAgent | None = None,
        method_info: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(student, task, optim, teacher=teacher)
        if options.policy == "agent" and agent is None:
            raise ValueError("policy agent needs the trained agent (the agent stage)")
        model = teacher.model
        assert model is not None
        self.options = options
        self.seed = seed
        self.agent = agent
        self.knowledge = KnowledgeTerms(self.student.config, model.config, options.temperature, self.task.is_regression)
        self.teacher_cls_layer = model.config.num_hidden_layers - 1
        self.phases = PhaseSchedule.every(options.phase_steps)
        self._weights: dict[str, float] | None = None
        self.phase_actions: list[dict[str, Any]] = []
        if method_info is not None:
            method_info["phase_actions"] = self.phase_actions

    @classmethod
    def check_config(cls, cfg: Any, task: Any) -> None:
        super().check_config(cfg, task)
        rows = cfg.data.get("max_train_samples")
        method = cfg.method
        if (
            method.policy == "agent"
            and method.reward.split == "train"
            and rows is not None
            and method.reward.rows >= rows
        ):
            raise ConfigError(
                f"method.reward.rows={method.reward.rows} would hold out every one of the "
                f"data.max_train_samples={rows} training rows; use fewer reward rows."
            )

    @classmethod
    def from_run(cls, run: "RunContext", options: KnowledgeSelectionOptions) -> "KnowledgeSelection":
        if not run.teacher.shares_tokenizer_with(run.data):
            raise ConfigError(
                "knowledge selection compares the teacher's [CLS] and hidden states with the student's "
                "position by position: the student must use the teacher's tokenizer (student.init="
                "pretrained with another vocabulary cannot be used)"
            )
        model = run.teacher.load_model()
        last = model.config.num_hidden_layers - 1
        split = run.task.train_split
        teacher = TeacherSignals(
            logits=run.teacher.logits(run.data, split),
            model=model,
            cls=run.teacher.cls_vectors(run.data, split, [last]),
            cls_layers=[last],
        )
        info: dict[str, Any] = {
            "policy": options.policy,
            "action": options.action,
            "reward_split": options.reward.split,
        }
        agent = None
        if options.policy == "agent":
            agent, stage_info = cls._agent_stage(run, options, teacher)
            info["agent_stage"] = {k: v for k, v in stage_info.items() if k != "history"}
            info["agent_stage"]["episodes_summary"] = episode_summary(stage_info["history"])
            info["agent_stage"]["history"] = stage_info["history"]
        run.method_info.update(info)
        return cls(
            run.student,
            run.task,
            run.optim,
            options=options,
            teacher=teacher,
            seed=int(run.cfg.seed),
            agent=agent,
            method_info=run.method_info,
        )

    @staticmethod
    def _agent_stage(
        run: "RunContext", options: KnowledgeSelectionOptions, teacher: TeacherSignals
    ) -> tuple[DDPGAgent, dict[str, Any]]:
        optim, cfg = run.optim, run.cfg
        settings = StageSettings(
            action=options.action,
            threshold=options.threshold,
            phase_steps=options.phase_steps,
            episodes=options.agent.episodes,
            episode_phases=options.agent.episode_phases,
            beta=options.reward.beta,
            reward_split=options.reward.split,
            reward_rows=options.reward.rows,
            agent=options.agent.ddpg(),
            learning_rate=optim.learning_rate,
            weight_decay=optim.weight_decay,
            warmup_ratio=optim.warmup_ratio,
            adam_epsilon=optim.adam_epsilon,
            gradient_clip_val=cfg.trainer.get("gradient_clip_val"),
            batch_size=int(cfg.data.batch_size),
        )
        data_key = run.data.keys[run.task.train_split]
        if options.reward.split == "dev":
            data_key += "+" + run.data.keys[run.task.eval_splits[0]]
        key = agent_key(
            settings,
            run.teacher.key,
            run.student,
            data_key,
            run.data.max_length,
            options.temperature,
            run.hardware.precision,
        )
        stage = AgentStage(
            settings,
            run.student,
            teacher,
            teacher.cls_layers[0],
            run.data,
            options.temperature,
            run.hardware.single_device(),
        )
        store = run.data.cache_dir / "agents" / f"{run.task.name}-{key}"
        agent, info = trained_agent(stage, store, key)
        log.info(
            "Knowledge-selection agent %s (%s): %d episodes, %.1fs",
            store,
            "cached" if info["from_cache"] else "trained now",
            info["episodes"],
            info["seconds"],
        )
        return agent, dict(info, key=key)

    # ------------------------------------------------------------------ the policy

    def decide(self, batch: dict[str, Tensor]) -> dict[str, float]:
        """The weights of the current phase, chosen at its first batch."""
        options = self.options
        if options.policy == "fixed":
            return dict(zip(KNOWLEDGE_KINDS, (float(w) for w in options.weights)))
        if options.policy == "random":
            generator = torch.Generator().manual_seed(derive_seed(self.seed, "random action", self.phases.index))
            action = torch.rand(len(KNOWLEDGE_KINDS), generator=generator)
        else:
            assert self.agent is not None and self.teacher is not None
            teacher_cls = self.teacher.cls(batch, self.teacher_cls_layer)
            state = selection_state(self.student, teacher_cls, batch, self._sum_over_processes())
            action = self.agent.act(state, explore=False)
        return action_weights(action, options.action, options.threshold)

    def _sum_over_processes(self) -> Callable[[Tensor], Tensor] | None:
        """Under DDP, the all-reduce that gives every process the whole batch's state."""
        if self._trainer is None or self.trainer.world_size == 1:
            return None
        return partial(self.trainer.strategy.reduce, reduce_op="sum")

    def on_phase_start(self, index: int) -> None:
        self._weights = None

    def _current_weights(self, batch: dict[str, Tensor]) -> dict[str, float]:
        if self._weights is None:
            self._weights = self.decide(batch)
            if self._trainer is not None and self.trainer.world_size > 1:  # DDP: every process uses the first's
                self._weights = self.trainer.strategy.broadcast(self._weights, src=0)
            self.phase_actions.append(
                {
                    "phase": self.phases.index,
                    "step": int(self.global_step),
                    "weights": {k: round(v, 6) for k, v in self._weights.items()},
                }
            )
        return self._weights

    # ------------------------------------------------------------------ the loss

    def loss_terms(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        assert self.teacher is not None
        active = [kind for kind, weight in self._current_weights(batch).items() if weight != 0]
        return self.knowledge(self.student, self.teacher, batch, active)

    def loss_weights(self) -> dict[str, float | Tensor]:
        assert self._weights is not None, "loss_terms chooses the phase's weights first"
        return {kind: weight for kind, weight in self._weights.items() if weight != 0}

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        assert self._weights is not None
        for kind, weight in self._weights.items():
            self.log(f"train/action/{kind}", weight, batch_size=batch["input_ids"].shape[0])
        return loss

    # ------------------------------------------------------------------ checkpoints

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[ACTIONS_CHECKPOINT_KEY] = {"phase_actions": list(self.phase_actions), "weights": self._weights}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint[ACTIONS_CHECKPOINT_KEY]
        self.phase_actions[:] = saved["phase_actions"]  # in place: results.json's method_info holds this list
        self._weights = saved["weights"]
