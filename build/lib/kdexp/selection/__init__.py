"""Knowledge selection (Wang et al., Findings of EMNLP 2022): the framework-independent agent core.

* :mod:`kdexp.selection.agent`: the state encoder, actor and critic networks, the replay
  buffer, the DDPG agent and the action/reward helpers.
"""

from kdexp.selection.agent import (
    EXPLORATION_MODES,
    HARD_ACTION_THRESHOLD,
    KNOWLEDGE_KINDS,
    Actor,
    Critic,
    DDPGAgent,
    DDPGConfig,
    ReplayBuffer,
    StateEncoder,
    exploration_reward,
    hard_action,
    phase_reward,
)

__all__ = [
    "EXPLORATION_MODES",
    "HARD_ACTION_THRESHOLD",
    "KNOWLEDGE_KINDS",
    "Actor",
    "Critic",
    "DDPGAgent",
    "DDPGConfig",
    "ReplayBuffer",
    "StateEncoder",
    "exploration_reward",
    "hard_action",
    "phase_reward",
]
