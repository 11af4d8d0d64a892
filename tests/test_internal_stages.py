"""Layer maps and the all / pid / sid stage schedules of Aguilar et al. (2020)."""

from __future__ import annotations

import pytest

from kdexp.internal.layer_map import LayerPair, parse_layer_map, resolve_layer_map, uniform_layer_map
from kdexp.internal.stages import StageSchedule, build_stages, total_epochs_needed

PAIRS = uniform_layer_map(3, 6)  # (0, 1), (1, 3), (2, 5)


def run_epochs(schedule: StageSchedule, first_epoch: int, count: int, loss: float = 1.0) -> list[tuple]:
    """Active pairs during each epoch, ending every epoch with ``loss``."""
    seen = []
    for epoch in range(first_epoch, first_epoch + count):
        seen.append(schedule.active_pairs())
        schedule.end_epoch(epoch, loss)
    return seen


# Layer maps


def test_uniform_layer_map_follows_m_of_j() -> None:
    assert [p.teacher for p in uniform_layer_map(6, 12)] == [1, 3, 5, 7, 9, 11]
    assert [p.teacher for p in uniform_layer_map(5, 12)] == [1, 3, 6, 8, 11]
    assert [p.teacher for p in uniform_layer_map(4, 4)] == [0, 1, 2, 3]
    assert [p.student for p in uniform_layer_map(6, 12)] == list(range(6))


def test_uniform_layer_map_rejects_more_student_than_teacher_layers() -> None:
    with pytest.raises(ValueError, match="L_S=6 student layers and L_T=4"):
        uniform_layer_map(6, 4)


def test_parse_layer_map_accepts_valid_pairs() -> None:
    assert parse_layer_map([[0, 2], (1, 5)], 2, 6) == [LayerPair(0, 2), LayerPair(1, 5)]
    assert resolve_layer_map("uniform", 2, 6) == uniform_layer_map(2, 6)
    assert resolve_layer_map(None, 2, 6) == uniform_layer_map(2, 6)
    assert resolve_layer_map([[1, 1]], 2, 6) == [LayerPair(1, 1)]


def test_parse_layer_map_accepts_an_omegaconf_list() -> None:
    omegaconf = pytest.importorskip("omegaconf")
    config = omegaconf.OmegaConf.create({"layer_map": [[0, 1], [1, 3]]})
    assert parse_layer_map(config.layer_map, 2, 4) == [LayerPair(0, 1), LayerPair(1, 3)]


@pytest.mark.parametrize(
    ("pairs", "message"),
    [
        ([[0, 1], [2, 3]], r"entry 1 \[2, 3\]: student layer 2 is out of range; valid student layers are 0\.\.1"),
        ([[0, 6]], r"entry 0 \[0, 6\]: teacher layer 6 is out of range; valid teacher layers are 0\.\.5"),
        ([[0, -1]], r"entry 0 \[0, -1\]: teacher layer -1 is out of range"),
        ([[0, 1, 2]], r"entry 0 is \[0, 1, 2\]; expected a \[student, teacher\] pair"),
        ([[0, 1.5]], r"entry 0 is \[0, 1.5\]; both layer indices must be integers"),
        ([[0, True]], r"both layer indices must be integers"),
        ([[1, 3], [0, 1]], r"entry 1 \[0, 1\] follows \[1, 3\]: pairs must be listed bottom-up"),
        ([[1, 3], [1, 4]], r"entry 1 \[1, 4\] follows \[1, 3\]"),
        ([], r"non-empty list"),
    ],
)
def test_parse_layer_map_names_the_offending_pair(pairs: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_layer_map(pairs, num_student_layers=2, num_teacher_layers=6)


# Stages


def test_stage_lists_of_the_three_algorithms() -> None:
    p0, p1, p2 = PAIRS
    assert [s.pairs for s in build_stages("all", PAIRS)] == [(p0, p1, p2), ()]
    assert [s.pairs for s in build_stages("pid", PAIRS)] == [(p0,), (p1,), (p2,), ()]
    assert [s.pairs for s in build_stages("sid", PAIRS)] == [(p0,), (p0, p1), (p0, p1, p2), ()]
    assert [s.is_final_kd for s in build_stages("sid", PAIRS)] == [False, False, False, True]
    with pytest.raises(ValueError, match="algorithm must be one of"):
        build_stages("random", PAIRS)  # type: ignore[arg-type]


def test_total_epochs_needed() -> None:
    assert total_epochs_needed("pid", num_pairs=3, epochs_per_stage=2, kd_epochs=4) == 10
    assert total_epochs_needed("sid", num_pairs=6, epochs_per_stage=1, kd_epochs=3) == 9
    assert total_epochs_needed("all", num_pairs=6, epochs_per_stage=5, kd_epochs=3) == 8


def test_pid_switches_at_exact_epochs_with_one_layer_per_stage() -> None:
    schedule = StageSchedule("pid", PAIRS, epochs_per_stage=2)
    p0, p1, p2 = PAIRS
    seen = run_epochs(schedule, first_epoch=0, count=9)
    assert seen == [(p0,), (p0,), (p1,), (p1,), (p2,), (p2,), (), (), ()]
    assert schedule.is_final_kd_stage


def test_sid_switches_at_exact_epochs_and_stacks_layers() -> None:
    schedule = StageSchedule("sid", PAIRS, epochs_per_stage=2)
    p0, p1, p2 = PAIRS
    advanced = []
    seen = []
    for epoch in range(8):
        seen.append(schedule.active_pairs())
        advanced.append(schedule.end_epoch(epoch, stage_loss=None))
    assert seen == [(p0,), (p0,), (p0, p1), (p0, p1), (p0, p1, p2), (p0, p1, p2), (), ()]
    assert advanced == [False, True, False, True, False, True, False, False]


def test_all_has_one_internal_stage_then_kd_for_the_rest_of_training() -> None:
    schedule = StageSchedule("all", PAIRS, epochs_per_stage=3)
    seen = run_epochs(schedule, first_epoch=0, count=10)
    assert seen[:3] == [tuple(PAIRS)] * 3
    assert seen[3:] == [()] * 7
    assert schedule.current_stage.index == 1


def test_without_a_final_kd_stage_the_last_internal_stage_lasts_to_the_end() -> None:
    schedule = StageSchedule("all", PAIRS, epochs_per_stage=1, final_kd=False)
    assert run_epochs(schedule, first_epoch=0, count=6) == [tuple(PAIRS)] * 6
    assert not schedule.is_final_kd_stage
    pid = StageSchedule("pid", PAIRS, epochs_per_stage=2, final_kd=False)
    seen = run_epochs(pid, first_epoch=0, count=9)
    assert seen[-3:] == [(PAIRS[-1],)] * 3  # the top pair's stage runs on
    assert len(pid.stages) == len(PAIRS)


def test_patience_ends_a_stage_early_when_loss_stops_improving() -> None:
    schedule = StageSchedule("pid", PAIRS, epochs_per_stage=10, patience=2, min_delta=0.05)
    # Stage 0: improves, then two epochs improving by less than min_delta -> switch after epoch 3.
    for epoch, loss in enumerate([1.0, 0.8, 0.78, 0.79]):
        assert schedule.current_stage.index == 0
        advanced = schedule.end_epoch(epoch, loss)
    assert advanced
    assert schedule.active_pairs() == (PAIRS[1],)
    # Stage 1 starts with a fresh best: a higher loss than stage 0's best is an improvement.
    assert not schedule.end_epoch(4, 5.0)
    assert not schedule.end_epoch(5, 4.0)
    assert not schedule.end_epoch(6, float("nan"))
    assert schedule.end_epoch(7, 3.99)
    assert schedule.active_pairs() == (PAIRS[2],)


def test_patience_never_extends_a_stage_past_epochs_per_stage() -> None:
    schedule = StageSchedule("pid", PAIRS, epochs_per_stage=2, patience=5)
    assert not schedule.end_epoch(0, 3.0)
    assert schedule.end_epoch(1, 2.0)


def test_patience_requires_a_stage_loss() -> None:
    schedule = StageSchedule("pid", PAIRS, epochs_per_stage=2, patience=1)
    with pytest.raises(ValueError, match="stage_loss is required"):
        schedule.end_epoch(0)


def test_epochs_must_increase() -> None:
    schedule = StageSchedule("pid", PAIRS, epochs_per_stage=2)
    schedule.end_epoch(0)
    with pytest.raises(ValueError, match="epoch 0 after epoch 0"):
        schedule.end_epoch(0)


def test_state_dict_round_trip_resumes_in_the_same_stage() -> None:
    original = StageSchedule("sid", PAIRS, epochs_per_stage=3, patience=3, min_delta=0.0)
    for epoch, loss in enumerate([1.0, 0.5, 0.4, 0.9, 0.95]):
        original.end_epoch(epoch, loss)
    # Stage 1, two epochs in, one epoch without improvement.
    assert original.current_stage.index == 1

    resumed = StageSchedule("sid", PAIRS, epochs_per_stage=3, patience=3, min_delta=0.0)
    resumed.load_state_dict(original.state_dict())
    assert resumed.current_stage == original.current_stage
    assert resumed.active_pairs() == (PAIRS[0], PAIRS[1])
    # Both continue identically: epoch 5 ends stage 1 on epochs_per_stage.
    assert resumed.end_epoch(5, 0.96) is original.end_epoch(5, 0.96) is True
    assert resumed.active_pairs() == original.active_pairs() == tuple(PAIRS)
    with pytest.raises(ValueError, match="epoch 5 after epoch 5"):
        resumed.end_epoch(5, 0.5)


def test_state_dict_rejects_a_different_setup() -> None:
    state = StageSchedule("pid", PAIRS, epochs_per_stage=2).state_dict()
    with pytest.raises(ValueError, match="does not match"):
        StageSchedule("sid", PAIRS, epochs_per_stage=2).load_state_dict(state)
    with pytest.raises(ValueError, match="does not match"):
        StageSchedule("pid", PAIRS[:2], epochs_per_stage=2).load_state_dict(state)
