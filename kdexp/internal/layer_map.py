"""Student-to-teacher layer maps for internal-representation distillation.

Aguilar et al. (AAAI 2020) match student layer ``j`` with teacher layer ``m(j)``.
All layer indices here are 0-based transformer-layer indices: layer ``j`` is the
``j``-th encoder block, not the embedding output (see ``kdexp.internal.losses`` for
how a layer index selects hidden states and attentions).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral
from typing import Any


@dataclass(frozen=True, order=True)
class LayerPair:
    """Student layer ``j`` matched with teacher layer ``m(j)`` (both 0-based)."""

    student: int
    teacher: int

    def __str__(self) -> str:
        return f"s{self.student}_t{self.teacher}"


def uniform_layer_map(num_student_layers: int, num_teacher_layers: int) -> list[LayerPair]:
    """Uniform map ``m(j) = (j + 1) * L_T // L_S - 1`` for ``j = 0 .. L_S - 1``.

    ``L_S`` = ``num_student_layers``, ``L_T`` = ``num_teacher_layers``. The product is
    taken before the floor division, so the last student layer always maps to the last
    teacher layer, and when ``L_T`` is a multiple of ``L_S`` the map is exact (12 -> 6
    gives teacher layers 1, 3, 5, 7, 9, 11). When it is not, teacher layers are rounded
    down (12 -> 5 gives 1, 3, 6, 8, 11). Since ``L_T / L_S >= 1`` the teacher layers are
    distinct and strictly increasing.

    Raises:
        ValueError: if either count is below 1 or ``L_S > L_T`` (a uniform map would
            have to reuse teacher layers).
    """
    if num_student_layers < 1 or num_teacher_layers < 1:
        raise ValueError(
            "layer counts must be at least 1, got "
            f"num_student_layers={num_student_layers}, num_teacher_layers={num_teacher_layers}"
        )
    if num_student_layers > num_teacher_layers:
        raise ValueError(
            f"uniform layer map needs L_S <= L_T, got L_S={num_student_layers} student layers "
            f"and L_T={num_teacher_layers} teacher layers; give an explicit layer map instead"
        )
    return [
        LayerPair(student=j, teacher=(j + 1) * num_teacher_layers // num_student_layers - 1)
        for j in range(num_student_layers)
    ]


def _as_layer_index(value: Any) -> int | None:
    """``value`` as an int when it is an integer (bools excluded), else None."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        return None
    return int(value)


def _parse_one_pair(position: int, raw_pair: Any, num_student_layers: int, num_teacher_layers: int) -> LayerPair:
    if isinstance(raw_pair, LayerPair):
        raw_pair = (raw_pair.student, raw_pair.teacher)
    if isinstance(raw_pair, (str, bytes)) or not isinstance(raw_pair, Sequence) or len(raw_pair) != 2:
        raise ValueError(f"layer map entry {position} is {raw_pair!r}; expected a [student, teacher] pair of integers")
    student, teacher = (_as_layer_index(value) for value in raw_pair)
    if student is None or teacher is None:
        raise ValueError(f"layer map entry {position} is {list(raw_pair)!r}; both layer indices must be integers")
    if not 0 <= student < num_student_layers:
        raise ValueError(
            f"layer map entry {position} [{student}, {teacher}]: student layer {student} is out of range; "
            f"valid student layers are 0..{num_student_layers - 1}"
        )
    if not 0 <= teacher < num_teacher_layers:
        raise ValueError(
            f"layer map entry {position} [{student}, {teacher}]: teacher layer {teacher} is out of range; "
            f"valid teacher layers are 0..{num_teacher_layers - 1}"
        )
    return LayerPair(student=student, teacher=teacher)


def parse_layer_map(
    pairs: Sequence[Sequence[int]], num_student_layers: int, num_teacher_layers: int
) -> list[LayerPair]:
    """Validate an explicit ``[[student, teacher], ...]`` layer map from config.

    Pairs must be listed bottom-up (strictly increasing student layers), because the
    progressive and stacked algorithms distil them in the order given; a student layer
    may therefore appear only once. Teacher layers are not constrained beyond range.

    Raises:
        ValueError: naming the offending entry (position and value) and the valid range.
    """
    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence) or len(pairs) == 0:
        raise ValueError(f"layer map must be a non-empty list of [student, teacher] pairs, got {pairs!r}")
    parsed: list[LayerPair] = []
    for position, raw_pair in enumerate(pairs):
        pair = _parse_one_pair(position, raw_pair, num_student_layers, num_teacher_layers)
        if parsed and pair.student <= parsed[-1].student:
            previous = parsed[-1]
            raise ValueError(
                f"layer map entry {position} [{pair.student}, {pair.teacher}] follows "
                f"[{previous.student}, {previous.teacher}]: pairs must be listed bottom-up with strictly "
                "increasing student layers (each student layer at most once)"
            )
        parsed.append(pair)
    return parsed


def resolve_layer_map(
    spec: str | Sequence[Sequence[int]] | None, num_student_layers: int, num_teacher_layers: int
) -> list[LayerPair]:
    """Layer map from a config value: ``None`` or ``"uniform"`` -> uniform map, a list -> explicit map."""
    if spec is None or spec == "uniform":
        return uniform_layer_map(num_student_layers, num_teacher_layers)
    if isinstance(spec, str):
        raise ValueError(f"layer map must be 'uniform' or a list of [student, teacher] pairs, got {spec!r}")
    return parse_layer_map(spec, num_student_layers, num_teacher_layers)
