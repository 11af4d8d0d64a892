"""Actor-critic knowledge-selection agent (Wang et al., Findings of EMNLP 2022, arXiv 2302.00444).

Framework-independent core in pure PyTorch: the agent picks, phase by phase, weights
``a in [0,1]^K`` over the kinds of teacher knowledge in :data:`KNOWLEDGE_KINDS`; the
student's step loss is ``sum_k a_k * L_k`` (computed elsewhere).

What the paper states:

* State: the student's and the teacher's final-layer [CLS] vectors, each through its
  own 2-layer MLP, combined.
* Actor and critic: 3-layer MLPs; deterministic policy gradient for the actor, critic
  trained by temporal difference.
* Reward: decrease of the student's dev CE between decisions plus an exploration
  reward (cosine similarity to the previous action for soft actions, repetition for
  hard ones).
* Hard actions threshold the weights (``a_k > lambda``).

Our choices where it is silent:

* The two encoded vectors are concatenated; the raw state is ``[student | teacher]``.
* DDPG: target ``y = r + gamma * (1 - done) * Q'(s', mu'(s'))`` with target networks
  soft-updated by ``tau``, a replay buffer, critic step before actor step. Gaussian
  action noise is available but off by default (the paper explores through the
  exploration reward). The paper reports no hyper-parameters; :class:`DDPGConfig`'s
  defaults are ours.
* The critic reads the action centred, ``2a - 1`` (see :class:`Critic`).
* Exploration reward ``1 - cos(a_t, a_{t-1})`` (soft) and ``-[hard(a_t) = hard(a_{t-1})]``
  (hard), scaled by ``beta`` in :func:`phase_reward`; ``lambda = 0.5``; an all-zero hard
  action falls back to FinK alone.
* The agent lives on the CPU (its networks are tiny) and draws all its randomness
  (network initialisation, replay sampling, action noise) from ``config.seed``, never
  touching the global RNG, so adding it to a run leaves the student's randomness as is.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

KNOWLEDGE_KINDS = ("fink", "resk", "feak", "relk")
HARD_ACTION_THRESHOLD = 0.5
EXPLORATION_MODES = ("soft", "hard")


# ----------------------------------------------------------------------------- networks


def _two_layer_mlp(in_features: int, hidden: int, out_features: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, out_features))


def _three_layer_mlp(in_features: int, hidden: int, out_features: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_features, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, out_features),
    )


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


class StateEncoder(nn.Module):
    """Splits a raw state ``[student CLS | teacher CLS]`` and encodes each part with its own
    2-layer MLP; returns the concatenation, width ``2 * hidden``."""

    def __init__(self, student_width: int, teacher_width: int, hidden: int) -> None:
        super().__init__()
        for name, value in (("student_width", student_width), ("teacher_width", teacher_width), ("hidden", hidden)):
            _check_positive_int(name, value)
        self.student_width = student_width
        self.teacher_width = teacher_width
        self.output_width = 2 * hidden
        self.student_mlp = _two_layer_mlp(student_width, hidden, hidden)
        self.teacher_mlp = _two_layer_mlp(teacher_width, hidden, hidden)

    def forward(self, state: Tensor) -> Tensor:
        expected = self.student_width + self.teacher_width
        if state.shape[-1] != expected:
            raise ValueError(f"state has width {state.shape[-1]}, expected student_width + teacher_width = {expected}")
        student, teacher = state.split([self.student_width, self.teacher_width], dim=-1)
        return torch.cat([self.student_mlp(student), self.teacher_mlp(teacher)], dim=-1)


class Actor(nn.Module):
    """Deterministic policy ``mu(s)``: encoded state -> 3-layer MLP -> sigmoid, in (0, 1)^K."""

    def __init__(self, student_width: int, teacher_width: int, num_kinds: int = 4, hidden: int = 64) -> None:
        super().__init__()
        _check_positive_int("num_kinds", num_kinds)
        self.encoder = StateEncoder(student_width, teacher_width, hidden)
        self.policy = _three_layer_mlp(self.encoder.output_width, hidden, num_kinds)

    def forward(self, state: Tensor) -> Tensor:
        return torch.sigmoid(self.policy(self.encoder(state)))


class Critic(nn.Module):
    """Action value ``Q(s, a)``: 3-layer MLP on ``[encoded state | 2a - 1]``; shape ``state.shape[:-1]``."""

    def __init__(self, student_width: int, teacher_width: int, num_kinds: int = 4, hidden: int = 64) -> None:
        super().__init__()
        _check_positive_int("num_kinds", num_kinds)
        self.encoder = StateEncoder(student_width, teacher_width, hidden)
        self.value = _three_layer_mlp(self.encoder.output_width + num_kinds, hidden, 1)

    def forward(self, state: Tensor, action: Tensor) -> Tensor:
        # The action enters centred on [-1, 1]: with raw [0, 1] inputs a small ReLU critic stays
        # nearly linear in the action for hundreds of updates and the actor runs into the bounds.
        centred_action = 2.0 * action - 1.0
        return self.value(torch.cat([self.encoder(state), centred_action], dim=-1)).squeeze(-1)


# ----------------------------------------------------------------------------- replay buffer


class ReplayBuffer:
    """Fixed-size ring buffer of transitions ``(state, action, reward, next_state, done)``.

    Once full, each push overwrites the oldest transition. Sampling is uniform with
    replacement over the filled rows, driven by the caller's generator.
    """

    def __init__(self, capacity: int, state_dim: int, num_kinds: int) -> None:
        for name, value in (("capacity", capacity), ("state_dim", state_dim), ("num_kinds", num_kinds)):
            _check_positive_int(name, value)
        self.capacity = capacity
        self.state_dim = state_dim
        self.num_kinds = num_kinds
        self.states = torch.zeros(capacity, state_dim)
        self.actions = torch.zeros(capacity, num_kinds)
        self.rewards = torch.zeros(capacity)
        self.next_states = torch.zeros(capacity, state_dim)
        self.dones = torch.zeros(capacity)
        self._position = 0  # the row the next push writes
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def push(self, state: Tensor, action: Tensor, reward: float, next_state: Tensor, done: bool) -> None:
        self._check_shape("state", state, (self.state_dim,))
        self._check_shape("action", action, (self.num_kinds,))
        self._check_shape("next_state", next_state, (self.state_dim,))
        row = self._position
        self.states[row] = state.detach().float().cpu()
        self.actions[row] = action.detach().float().cpu()
        self.rewards[row] = float(reward)
        self.next_states[row] = next_state.detach().float().cpu()
        self.dones[row] = float(bool(done))
        self._position = (row + 1) % self.capacity
        self._size = min(self._size + 1, self.capacity)

    def sample(self, batch_size: int, generator: torch.Generator) -> dict[str, Tensor]:
        _check_positive_int("batch_size", batch_size)
        if self._size == 0:
            raise ValueError("cannot sample from an empty replay buffer")
        rows = torch.randint(self._size, (batch_size,), generator=generator)
        return {
            "state": self.states[rows],
            "action": self.actions[rows],
            "reward": self.rewards[rows],
            "next_state": self.next_states[rows],
            "done": self.dones[rows],
        }

    def state_dict(self) -> dict:
        # Only the filled rows: while not full they are rows [0, size), once full all rows.
        size = self._size
        return {
            "capacity": self.capacity,
            "state_dim": self.state_dim,
            "num_kinds": self.num_kinds,
            "position": self._position,
            "size": size,
            "states": self.states[:size].clone(),
            "actions": self.actions[:size].clone(),
            "rewards": self.rewards[:size].clone(),
            "next_states": self.next_states[:size].clone(),
            "dones": self.dones[:size].clone(),
        }

    def load_state_dict(self, state: dict) -> None:
        for name in ("capacity", "state_dim", "num_kinds"):
            if int(state[name]) != getattr(self, name):
                raise ValueError(
                    f"replay buffer {name} mismatch: saved {state[name]}, this buffer {getattr(self, name)}"
                )
        size = int(state["size"])
        for name in ("states", "actions", "rewards", "next_states", "dones"):
            storage = getattr(self, name)
            storage.zero_()
            storage[:size] = state[name]
        self._size = size
        self._position = int(state["position"])

    @staticmethod
    def _check_shape(name: str, value: Tensor, shape: tuple[int, ...]) -> None:
        if tuple(value.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(value.shape)}, expected {shape}")


# ----------------------------------------------------------------------------- DDPG


@dataclass
class DDPGConfig:
    """Hyper-parameters of the DDPG agent (the paper does not report its values)."""

    gamma: float = 0.9
    tau: float = 0.05
    actor_lr: float = 1e-3
    critic_lr: float = 1e-3
    batch_size: int = 32
    buffer_capacity: int = 10000
    hidden: int = 64
    noise_std: float = 0.0
    updates_per_step: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        _check_range("gamma", self.gamma, 0.0, 1.0, "[0, 1]")
        _check_range("tau", self.tau, 0.0, 1.0, "(0, 1]", low_open=True)
        _check_range("actor_lr", self.actor_lr, 0.0, math.inf, "(0, inf)", low_open=True)
        _check_range("critic_lr", self.critic_lr, 0.0, math.inf, "(0, inf)", low_open=True)
        _check_range("noise_std", self.noise_std, 0.0, math.inf, "[0, inf)")
        for name in ("batch_size", "buffer_capacity", "hidden", "updates_per_step"):
            _check_positive_int(name, getattr(self, name))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")
        if self.buffer_capacity < self.batch_size:
            raise ValueError(f"buffer_capacity must be >= batch_size ({self.batch_size}), got {self.buffer_capacity}")


def _check_range(name: str, value: float, low: float, high: float, allowed: str, low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number in {allowed}, got {value!r}")
    above_low = value > low if low_open else value >= low
    if not math.isfinite(value) or not above_low or value > high:
        raise ValueError(f"{name} must be in {allowed}, got {value!r}")


def _frozen_copy(module: nn.Module) -> nn.Module:
    target = copy.deepcopy(module)
    target.requires_grad_(False)
    return target


def _full_precision() -> torch.autocast:
    """The agent computes in float32 even inside a step of a run in CPU mixed precision (Lightning's bf16-mixed
    on CPU autocasts every Linear): it was trained in float32, and a hard action near its threshold could flip."""
    return torch.autocast("cpu", enabled=False)


def _soft_update(target: nn.Module, online: nn.Module, tau: float) -> None:
    """``target <- tau * online + (1 - tau) * target``, parameter by parameter."""
    with torch.no_grad():
        for target_param, online_param in zip(target.parameters(), online.parameters()):
            target_param.mul_(1.0 - tau).add_(online_param, alpha=tau)


class DDPGAgent:
    """DDPG actor-critic over knowledge weights; see the module docstring for the choices."""

    def __init__(self, student_width: int, teacher_width: int, config: DDPGConfig, num_kinds: int = 4) -> None:
        self.student_width = student_width
        self.teacher_width = teacher_width
        self.num_kinds = num_kinds
        self.config = config
        with torch.random.fork_rng(devices=[]):
            # Initialise the networks from config.seed without consuming the global RNG (the CPU generator
            # only: torch.manual_seed would also reseed the CUDA generators, which fork_rng does not restore).
            torch.default_generator.manual_seed(config.seed)
            self.actor = Actor(student_width, teacher_width, num_kinds, config.hidden)
            self.critic = Critic(student_width, teacher_width, num_kinds, config.hidden)
        self.target_actor = _frozen_copy(self.actor)
        self.target_critic = _frozen_copy(self.critic)
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=config.actor_lr)
        self.critic_optimizer = torch.optim.Adam(self.critic.parameters(), lr=config.critic_lr)
        self.buffer = ReplayBuffer(config.buffer_capacity, self.state_dim, num_kinds)
        self.generator = torch.Generator().manual_seed(config.seed)

    @property
    def state_dim(self) -> int:
        return self.student_width + self.teacher_width

    @torch.no_grad()
    def act(self, state: Tensor, explore: bool) -> Tensor:
        """The action ``mu(s)`` for a raw state (shape ``[D_S + D_T]``), with Gaussian noise of
        ``noise_std`` when ``explore``, clamped to [0, 1]."""
        with _full_precision():
            action = self.actor(state.detach().float().cpu())
        if explore and self.config.noise_std > 0:
            noise = torch.randn(action.shape, generator=self.generator) * self.config.noise_std
            action = (action + noise).clamp(0.0, 1.0)
        return action

    def observe(self, state: Tensor, action: Tensor, reward: float, next_state: Tensor, done: bool) -> None:
        self.buffer.push(state, action, reward, next_state, done)

    def update(self) -> dict[str, float]:
        """``updates_per_step`` DDPG steps; returns the mean pre-step losses, or ``{}`` while the
        buffer holds fewer than ``batch_size`` transitions."""
        if len(self.buffer) < self.config.batch_size:
            return {}
        critic_losses, actor_losses = [], []
        with _full_precision():
            for _ in range(self.config.updates_per_step):
                batch = self.buffer.sample(self.config.batch_size, self.generator)
                critic_losses.append(self._critic_step(batch))
                actor_losses.append(self._actor_step(batch["state"]))
                _soft_update(self.target_actor, self.actor, self.config.tau)
                _soft_update(self.target_critic, self.critic, self.config.tau)
        return {
            "critic_loss": sum(critic_losses) / len(critic_losses),
            "actor_loss": sum(actor_losses) / len(actor_losses),
        }

    def td_target(self, reward: Tensor, next_state: Tensor, done: Tensor) -> Tensor:
        """``y = r + gamma * (1 - done) * Q'(s', mu'(s'))`` from the target networks."""
        with torch.no_grad():
            next_value = self.target_critic(next_state, self.target_actor(next_state))
            return reward + self.config.gamma * (1.0 - done) * next_value

    def _critic_step(self, batch: dict[str, Tensor]) -> float:
        target = self.td_target(batch["reward"], batch["next_state"], batch["done"])
        loss = F.mse_loss(self.critic(batch["state"], batch["action"]), target)
        self.critic_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.critic_optimizer.step()
        return loss.item()

    def _actor_step(self, state: Tensor) -> float:
        loss = -self.critic(state, self.actor(state)).mean()
        self.actor_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.actor_optimizer.step()
        # The backward pass also filled the critic's gradients; they must not leak into its next step.
        self.critic_optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def state_dict(self) -> dict:
        """Everything needed to resume bit-identically; tensors and primitive containers only."""
        return {
            "student_width": self.student_width,
            "teacher_width": self.teacher_width,
            "num_kinds": self.num_kinds,
            "config": asdict(self.config),
            "actor": self.actor.state_dict(),
            "critic": self.critic.state_dict(),
            "target_actor": self.target_actor.state_dict(),
            "target_critic": self.target_critic.state_dict(),
            "actor_optimizer": self.actor_optimizer.state_dict(),
            "critic_optimizer": self.critic_optimizer.state_dict(),
            "buffer": self.buffer.state_dict(),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restores a saved agent; this one must have the same widths, kinds and config."""
        for name in ("student_width", "teacher_width", "num_kinds"):
            if int(state[name]) != getattr(self, name):
                raise ValueError(f"agent {name} mismatch: saved {state[name]}, this agent {getattr(self, name)}")
        saved_config = DDPGConfig(**state["config"])
        if saved_config != self.config:
            changed = [
                f.name for f in fields(DDPGConfig) if getattr(saved_config, f.name) != getattr(self.config, f.name)
            ]
            raise ValueError(f"agent config mismatch in {changed}: saved {saved_config}, this agent {self.config}")
        self.actor.load_state_dict(state["actor"])
        self.critic.load_state_dict(state["critic"])
        self.target_actor.load_state_dict(state["target_actor"])
        self.target_critic.load_state_dict(state["target_critic"])
        self.actor_optimizer.load_state_dict(state["actor_optimizer"])
        self.critic_optimizer.load_state_dict(state["critic_optimizer"])
        self.buffer.load_state_dict(state["buffer"])
        self.generator.set_state(state["generator"])


# ----------------------------------------------------------------------------- actions and rewards


def hard_action(soft: Tensor, threshold: float = HARD_ACTION_THRESHOLD) -> Tensor:
    """``1[a_k > threshold]`` as float (last dimension = kinds); an all-zero action falls back
    to FinK alone (the student always has some training signal)."""
    hard = (soft > threshold).to(soft.dtype if soft.is_floating_point() else torch.float32)
    nothing_selected = hard.sum(dim=-1) == 0
    hard[..., 0] = torch.where(nothing_selected, torch.ones_like(hard[..., 0]), hard[..., 0])
    return hard


def exploration_reward(
    action: Tensor, previous: Tensor | None, mode: str, threshold: float = HARD_ACTION_THRESHOLD
) -> float:
    """Unscaled exploration reward for a 1-D action: ``soft``, ``1 - cos(a_t, a_{t-1})``;
    ``hard``, ``-1`` if the hard action repeats the previous one, else ``0``; ``0`` without a
    previous action."""
    if mode not in EXPLORATION_MODES:
        raise ValueError(f"exploration mode must be one of {EXPLORATION_MODES}, got {mode!r}")
    if previous is None:
        return 0.0
    if mode == "soft":
        return 1.0 - F.cosine_similarity(action.double(), previous.double(), dim=-1).item()
    repeated = torch.equal(hard_action(action, threshold), hard_action(previous, threshold))
    return -1.0 if repeated else 0.0


def phase_reward(ce_before: float, ce_after: float, exploration: float, beta: float) -> float:
    """The phase's reward: decrease of the student's held-out CE plus ``beta * exploration``."""
    return (float(ce_before) - float(ce_after)) + float(beta) * float(exploration)
