"""The knowledge-selection agent core (kdexp.selection.agent): DDPG, replay buffer, actions, rewards."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch

from kdexp.selection import (
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

STUDENT_WIDTH = 8
TEACHER_WIDTH = 8
STATE_DIM = STUDENT_WIDTH + TEACHER_WIDTH
BEST_ACTION = torch.tensor([0.9, 0.1, 0.8, 0.2])


def bandit_reward(action: torch.Tensor) -> float:
    return -((action - BEST_ACTION) ** 2).sum().item()


def fill_with_random_transitions(agent: DDPGAgent, count: int, generator: torch.Generator) -> None:
    for _ in range(count):
        state = torch.randn(STATE_DIM, generator=generator)
        action = torch.rand(agent.num_kinds, generator=generator)
        next_state = torch.randn(STATE_DIM, generator=generator)
        reward = torch.randn((), generator=generator).item()
        done = bool(torch.rand((), generator=generator) < 0.3)
        agent.observe(state, action, reward, next_state, done)


def clone_generator(generator: torch.Generator) -> torch.Generator:
    clone = torch.Generator()
    clone.set_state(generator.get_state())
    return clone


def saved_and_loaded(state: dict) -> dict:
    stream = io.BytesIO()
    torch.save(state, stream)
    stream.seek(0)
    return torch.load(stream, weights_only=True)


# ----------------------------------------------------------------------------- networks


def test_networks_have_the_specified_shapes_and_ranges():
    torch.manual_seed(0)
    states = torch.randn(5, STATE_DIM)
    encoder = StateEncoder(STUDENT_WIDTH, TEACHER_WIDTH, hidden=6)
    assert encoder(states).shape == (5, 12)
    actor = Actor(STUDENT_WIDTH, TEACHER_WIDTH, num_kinds=4, hidden=6)
    actions = actor(states)
    assert actions.shape == (5, 4)
    assert bool(((actions > 0) & (actions < 1)).all())
    critic = Critic(STUDENT_WIDTH, TEACHER_WIDTH, num_kinds=4, hidden=6)
    assert critic(states, actions).shape == (5,)
    assert critic(states[0], actions[0]).shape == ()
    assert KNOWLEDGE_KINDS == ("fink", "resk", "feak", "relk")


def test_state_encoder_encodes_student_and_teacher_parts_separately():
    torch.manual_seed(0)
    encoder = StateEncoder(3, 5, hidden=4)
    state = torch.randn(2, 8)
    expected = torch.cat([encoder.student_mlp(state[:, :3]), encoder.teacher_mlp(state[:, 3:])], dim=-1)
    torch.testing.assert_close(encoder(state), expected, rtol=0, atol=0)
    changed_teacher = state.clone()
    changed_teacher[:, 3:] += 1.0
    torch.testing.assert_close(encoder(changed_teacher)[:, :4], encoder(state)[:, :4], rtol=0, atol=0)
    with pytest.raises(ValueError, match="expected student_width \\+ teacher_width = 8"):
        encoder(torch.randn(2, 7))


# ----------------------------------------------------------------------------- DDPG


def test_ddpg_learns_the_best_action_of_a_bandit(single_thread):
    # A slow actor beside a fast critic: with equal rates the actor follows the critic's
    # early, nearly linear fit into the sigmoid's flat ends and stays there.
    config = DDPGConfig(
        gamma=0.0, actor_lr=1e-4, critic_lr=3e-3, batch_size=64, buffer_capacity=128, hidden=64, noise_std=0.1, seed=0
    )
    agent = DDPGAgent(STUDENT_WIDTH, TEACHER_WIDTH, config)
    data = torch.Generator().manual_seed(100)

    def random_state() -> torch.Tensor:
        # Small states: the reward does not depend on them, and the critic learns to ignore
        # them from a few hundred transitions.
        return 0.1 * torch.randn(STATE_DIM, generator=data)

    held_out = 0.1 * torch.randn(16, STATE_DIM, generator=data)
    initial_error = (agent.act(held_out, explore=False) - BEST_ACTION).abs().max().item()
    for _ in range(64):
        state, action = random_state(), torch.rand(4, generator=data)
        agent.observe(state, action, bandit_reward(action), state, True)
    for _ in range(400):
        state = random_state()
        action = agent.act(state, explore=True)
        agent.observe(state, action, bandit_reward(action), state, True)
        assert set(agent.update()) == {"critic_loss", "actor_loss"}
    final_error = (agent.act(held_out, explore=False) - BEST_ACTION).abs().max().item()
    assert initial_error > 0.3
    assert final_error < 0.15
    assert final_error < initial_error / 2


def test_critic_loss_uses_the_td_target_of_the_target_networks():
    config = DDPGConfig(gamma=0.7, batch_size=8, buffer_capacity=16, hidden=8, seed=3)
    agent = DDPGAgent(STUDENT_WIDTH, TEACHER_WIDTH, config)
    fill_with_random_transitions(agent, 12, torch.Generator().manual_seed(1))
    # A target critic that answers a known constant: Q'(s', a') = 0.25 everywhere.
    last_layer = agent.target_critic.value[-1]
    with torch.no_grad():
        last_layer.weight.zero_()
        last_layer.bias.fill_(0.25)
    batch = agent.buffer.sample(config.batch_size, clone_generator(agent.generator))
    assert 0 < batch["done"].sum() < config.batch_size  # both kinds of transitions are covered
    target = batch["reward"] + 0.7 * (1.0 - batch["done"]) * 0.25
    with torch.no_grad():
        expected_loss = ((agent.critic(batch["state"], batch["action"]) - target) ** 2).mean().item()

    losses = agent.update()
    assert losses["critic_loss"] == pytest.approx(expected_loss, rel=1e-6)


def test_td_target_matches_a_hand_computation_with_the_target_networks():
    agent = DDPGAgent(STUDENT_WIDTH, TEACHER_WIDTH, DDPGConfig(gamma=0.9, hidden=8, seed=1))
    next_states = torch.randn(4, STATE_DIM, generator=torch.Generator().manual_seed(2))
    rewards = torch.tensor([1.0, -0.5, 0.0, 2.0])
    dones = torch.tensor([0.0, 1.0, 0.0, 1.0])
    with torch.no_grad():
        next_values = agent.target_critic(next_states, agent.target_actor(next_states))
    expected = torch.stack([rewards[i] + (0.0 if dones[i] else 0.9 * next_values[i]) for i in range(4)])
    torch.testing.assert_close(agent.td_target(rewards, next_states, dones), expected)


def test_actor_step_maximises_the_updated_critic():
    config = DDPGConfig(batch_size=8, buffer_capacity=16, hidden=8, seed=4)
    agent = DDPGAgent(STUDENT_WIDTH, TEACHER_WIDTH, config)
    fill_with_random_transitions(agent, 10, torch.Generator().manual_seed(5))
    actor_before = copy.deepcopy(agent.actor)
    batch = agent.buffer.sample(config.batch_size, clone_generator(agent.generator))

    losses = agent.update()
    # The actor step comes after the critic step and leaves the critic as it is.
    with torch.no_grad():
        expected = -agent.critic(batch["state"], actor_before(batch["state"])).mean().item()
    assert losses["actor_loss"] == pytest.approx(expected, rel=1e-6)
    assert all(p.grad is None for p in agent.critic.parameters())


def test_soft_update_mixes_online_and_old_target_parameters():
    config = DDPGConfig(tau=0.3, batch_size=4, buffer_capacity=8, hidden=8, seed=2)
    agent = DDPGAgent(STUDENT_WIDTH, TEACHER_WIDTH, config)
    fill_with_random_transitions(agent, 6, torch.Generator().manual_seed(3))
    # Move the targets away from the online networks so the mixture is not trivial.
    with torch.no_grad():
        for param in list(agent.target_actor.parameters()) + list(agent.target_critic.parameters()):
            param.add_(0.1)
    old_actor = [p.clone() for p in agent.target_actor.parameters()]
    old_critic = [p.clone() for p in agent.target_critic.parameters()]

    agent.update()
    pairs = [
        (agent.target_actor, agent.actor, old_actor),
        (agent.target_critic, agent.critic, old_critic),
    ]
    for target, online, old in pairs:
        for new_param, online_param, old_param in zip(target.parameters(), online.parameters(), old):
            torch.testing.assert_close(new_param, 0.3 * online_param + 0.7 * old_param)
            assert not new_param.requires_grad


def test_update_waits_for_a_full_batch():
    config = DDPGConfig(batch_size=4, buffer_capacity=8, hidden=8)
    agent = DDPGAgent(STUDENT_WIDTH, TEACHER_WIDTH, config)
    fill_with_random_transitions(agent, 3, torch.Generator().manual_seed(0))
    actor_before = copy.deepcopy(agent.actor.state_dict())
    assert agent.update() == {}
    for name, value in agent.actor.state_dict().items():
        assert torch.equal(value, actor_before[name])
    fill_with_random_transitions(agent, 1, torch.Generator().manual_seed(1))
    assert set(agent.update()) == {"critic_loss", "actor_loss"}


def test_act_noise_and_clamping():
    state = torch.randn(STATE_DIM, generator=torch.Generator().manual_seed(0))
    quiet = DDPGAgent(STUDENT_WIDTH, TEACHER_WIDTH, DDPGConfig(hidden=8))
    assert torch.equal(quiet.act(state, explore=True), quiet.act(state, explore=False))

    noisy = DDPGAgent(STUDENT_WIDTH, TEACHER_WIDTH, DDPGConfig(hidden=8, noise_std=5.0, seed=7))
    clean = noisy.act(state, explore=False)
    expected_noise = torch.randn(4, generator=torch.Generator().manual_seed(7)) * 5.0
    explored = noisy.act(state, explore=True)
    torch.testing.assert_close(explored, (clean + expected_noise).clamp(0.0, 1.0))
    assert explored.shape == (4,)
    assert bool(((explored == 0) | (explored == 1)).any())  # std 5 drives some weights to the bounds
    assert not explored.requires_grad


def test_agent_leaves_the_global_rng_alone_and_is_seeded():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    agent = DDPGAgent(STUDENT_WIDTH, TEACHER_WIDTH, DDPGConfig(hidden=8, noise_std=0.2, batch_size=2))
    fill_with_random_transitions(agent, 4, torch.Generator().manual_seed(0))
    agent.act(torch.zeros(STATE_DIM), explore=True)
    agent.update()
    assert torch.equal(torch.rand(3), expected)

    twin = DDPGAgent(STUDENT_WIDTH, TEACHER_WIDTH, DDPGConfig(hidden=8, noise_std=0.2, batch_size=2))
    other = DDPGAgent(STUDENT_WIDTH, TEACHER_WIDTH, DDPGConfig(hidden=8, noise_std=0.2, batch_size=2, seed=1))
    fresh = DDPGAgent(STUDENT_WIDTH, TEACHER_WIDTH, DDPGConfig(hidden=8, noise_std=0.2, batch_size=2))
    for name, value in fresh.actor.state_dict().items():
        assert torch.equal(value, twin.actor.state_dict()[name])
    assert not torch.equal(fresh.actor.policy[0].weight, other.actor.policy[0].weight)


def test_the_agent_acts_and_learns_in_float32_inside_a_cpu_mixed_precision_step():
    def trained_agent() -> tuple[DDPGAgent, torch.Tensor]:
        agent = DDPGAgent(STUDENT_WIDTH, TEACHER_WIDTH, DDPGConfig(hidden=8, batch_size=2))
        fill_with_random_transitions(agent, 4, torch.Generator().manual_seed(0))
        return agent, torch.randn(STATE_DIM, generator=torch.Generator().manual_seed(1))

    plain, state = trained_agent()
    expected_losses, expected_action = plain.update(), plain.act(state, explore=False)
    mixed, _ = trained_agent()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what Lightning's bf16-mixed wraps a CPU step in
        losses, action = mixed.update(), mixed.act(state, explore=False)
    assert action.dtype == torch.float32 and torch.equal(action, expected_action)
    assert losses == expected_losses


def test_state_round_trip_continues_bit_identically(single_thread):
    config = DDPGConfig(batch_size=4, buffer_capacity=6, hidden=8, noise_std=0.3, updates_per_step=2, seed=5)
    data = torch.Generator().manual_seed(11)
    agent_a = DDPGAgent(STUDENT_WIDTH, TEACHER_WIDTH, config)
    fill_with_random_transitions(agent_a, 5, data)
    for _ in range(3):
        agent_a.update()

    agent_b = DDPGAgent(STUDENT_WIDTH, TEACHER_WIDTH, config)
    agent_b.load_state_dict(saved_and_loaded(agent_a.state_dict()))

    for _ in range(4):  # the buffer wraps around during these steps
        state = torch.randn(STATE_DIM, generator=data)
        next_state = torch.randn(STATE_DIM, generator=data)
        action_a = agent_a.act(state, explore=True)
        action_b = agent_b.act(state, explore=True)
        assert torch.equal(action_a, action_b)
        for agent in (agent_a, agent_b):
            agent.observe(state, action_a, 0.5, next_state, False)
        assert agent_a.update() == agent_b.update()
    for name in ("actor", "critic", "target_actor", "target_critic"):
        params_a = getattr(agent_a, name).state_dict()
        params_b = getattr(agent_b, name).state_dict()
        assert all(torch.equal(params_a[key], params_b[key]) for key in params_a), name
    probe = torch.randn(STATE_DIM, generator=data)
    assert torch.equal(agent_a.act(probe, explore=True), agent_b.act(probe, explore=True))


def test_load_state_dict_rejects_a_different_agent():
    saved = DDPGAgent(STUDENT_WIDTH, TEACHER_WIDTH, DDPGConfig(hidden=8)).state_dict()
    with pytest.raises(ValueError, match="teacher_width"):
        DDPGAgent(STUDENT_WIDTH, 4, DDPGConfig(hidden=8)).load_state_dict(saved)
    with pytest.raises(ValueError, match="gamma"):
        DDPGAgent(STUDENT_WIDTH, TEACHER_WIDTH, DDPGConfig(hidden=8, gamma=0.5)).load_state_dict(saved)


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("gamma", 1.5, r"\[0, 1\]"),
        ("gamma", -0.1, r"\[0, 1\]"),
        ("tau", 0.0, r"\(0, 1\]"),
        ("actor_lr", 0.0, r"\(0, inf\)"),
        ("critic_lr", float("nan"), r"\(0, inf\)"),
        ("noise_std", -1.0, r"\[0, inf\)"),
        ("batch_size", 0, ">= 1"),
        ("hidden", 2.5, ">= 1"),
        ("updates_per_step", True, ">= 1"),
        ("buffer_capacity", 0, ">= 1"),
        ("seed", -1, ">= 0"),
    ],
)
def test_config_rejects_out_of_range_values(field, value, allowed):
    with pytest.raises(ValueError, match=rf"{field} must be .*{allowed}"):
        DDPGConfig(**{field: value})


def test_config_defaults_and_capacity_below_batch_size():
    config = DDPGConfig()
    assert (config.gamma, config.tau, config.actor_lr, config.critic_lr) == (0.9, 0.05, 1e-3, 1e-3)
    assert (config.batch_size, config.buffer_capacity, config.hidden) == (32, 10000, 64)
    assert (config.noise_std, config.updates_per_step, config.seed) == (0.0, 1, 0)
    with pytest.raises(ValueError, match="buffer_capacity must be >= batch_size"):
        DDPGConfig(batch_size=8, buffer_capacity=4)


# ----------------------------------------------------------------------------- replay buffer


def push_numbered(buffer: ReplayBuffer, number: int) -> None:
    value = float(number)
    buffer.push(
        torch.full((buffer.state_dim,), value),
        torch.full((buffer.num_kinds,), value / 10),
        value,
        torch.full((buffer.state_dim,), -value),
        number % 2 == 1,
    )


def test_replay_buffer_overwrites_the_oldest_transition():
    buffer = ReplayBuffer(capacity=3, state_dim=2, num_kinds=4)
    for number in range(5):
        push_numbered(buffer, number)
    assert len(buffer) == 3
    # Transitions 0 and 1 were overwritten by 3 and 4, in that order.
    assert buffer.rewards.tolist() == [3.0, 4.0, 2.0]
    assert buffer.states[:, 0].tolist() == [3.0, 4.0, 2.0]
    assert buffer.next_states[:, 0].tolist() == [-3.0, -4.0, -2.0]
    assert buffer.dones.tolist() == [1.0, 0.0, 0.0]


def test_replay_buffer_samples_only_filled_rows():
    buffer = ReplayBuffer(capacity=10, state_dim=2, num_kinds=4)
    with pytest.raises(ValueError, match="empty"):
        buffer.sample(1, torch.Generator())
    for number in range(1, 4):
        push_numbered(buffer, number)
    batch = buffer.sample(200, torch.Generator().manual_seed(0))
    assert set(batch) == {"state", "action", "reward", "next_state", "done"}
    assert batch["state"].shape == (200, 2) and batch["action"].shape == (200, 4)
    assert set(batch["reward"].tolist()) == {1.0, 2.0, 3.0}
    # Each sampled row is one whole transition.
    torch.testing.assert_close(batch["state"][:, 0], batch["reward"])
    torch.testing.assert_close(batch["action"][:, 0], batch["reward"] / 10)
    torch.testing.assert_close(batch["done"], (batch["reward"] % 2 == 1).float())


def test_replay_buffer_state_round_trip_after_wrapping():
    buffer = ReplayBuffer(capacity=4, state_dim=3, num_kinds=4)
    for number in range(6):
        push_numbered(buffer, number)
    state = saved_and_loaded(buffer.state_dict())
    restored = ReplayBuffer(capacity=4, state_dim=3, num_kinds=4)
    restored.load_state_dict(state)
    assert len(restored) == 4
    for name in ("states", "actions", "rewards", "next_states", "dones"):
        assert torch.equal(getattr(restored, name), getattr(buffer, name))
    push_numbered(buffer, 6)
    push_numbered(restored, 6)
    assert torch.equal(restored.rewards, buffer.rewards)  # the next write goes to the same row

    partial = ReplayBuffer(capacity=4, state_dim=3, num_kinds=4)
    push_numbered(partial, 9)
    assert partial.state_dict()["states"].shape == (1, 3)  # only filled rows are saved
    with pytest.raises(ValueError, match="capacity"):
        ReplayBuffer(capacity=5, state_dim=3, num_kinds=4).load_state_dict(state)


def test_replay_buffer_rejects_wrong_shapes():
    buffer = ReplayBuffer(capacity=2, state_dim=3, num_kinds=4)
    with pytest.raises(ValueError, match="action has shape"):
        buffer.push(torch.zeros(3), torch.zeros(3), 0.0, torch.zeros(3), False)


# ----------------------------------------------------------------------------- actions and rewards


def test_hard_action_thresholds_and_falls_back_to_fink():
    assert hard_action(torch.tensor([0.9, 0.5, 0.51, 0.1])).tolist() == [1.0, 0.0, 1.0, 0.0]
    assert hard_action(torch.tensor([0.2, 0.3, 0.9, 0.4]), threshold=0.35).tolist() == [0.0, 0.0, 1.0, 1.0]
    assert hard_action(torch.tensor([0.1, 0.2, 0.3, 0.5])).tolist() == [1.0, 0.0, 0.0, 0.0]
    batch = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.1, 0.7, 0.0, 0.0]])
    assert hard_action(batch).tolist() == [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]]


def test_exploration_reward_values():
    a = torch.tensor([1.0, 0.0, 1.0, 0.0])
    b = torch.tensor([0.0, 1.0, 0.0, 1.0])
    assert exploration_reward(a, b, "soft") == pytest.approx(1.0)
    assert exploration_reward(a, a.clone(), "soft") == pytest.approx(0.0, abs=1e-12)
    c = torch.tensor([0.6, 0.2, 0.9, 0.3])
    cosine = float(c @ a) / (math.sqrt(float(c @ c)) * math.sqrt(2.0))
    assert exploration_reward(c, a, "soft") == pytest.approx(1.0 - cosine)
    # Hard: the soft weights are thresholded first; c and a give the same hard action.
    assert exploration_reward(c, a, "hard") == -1.0
    assert exploration_reward(a, b, "hard") == 0.0
    assert exploration_reward(a, None, "soft") == 0.0
    assert exploration_reward(a, None, "hard") == 0.0
    with pytest.raises(ValueError, match="mode"):
        exploration_reward(a, b, "cosine")


def test_phase_reward_arithmetic():
    assert phase_reward(0.8, 0.5, exploration=0.4, beta=0.25) == pytest.approx(0.3 + 0.1)
    assert phase_reward(0.5, 0.7, exploration=-1.0, beta=0.1) == pytest.approx(-0.2 - 0.1)
    assert phase_reward(0.5, 0.5, exploration=1.0, beta=0.0) == 0.0
