"""Stage schedules for the three internal-distillation algorithms of Aguilar et al. (2020).

- ``all``: one stage distilling every matched pair ``(j, m(j))`` at once.
- ``pid`` (progressive): stage ``s`` distils only pair ``s``, bottom-up.
- ``sid`` (stacked): stage ``s`` distils pairs ``0 .. s``.

Every algorithm ends with a soft-label KD stage (no internal pairs) that lasts for the
rest of training, unless ``final_kd=False``: then the last internal stage lasts to the end. An internal stage ends after ``epochs_per_stage`` epochs, or earlier
when ``patience`` is set and its loss has not improved by ``min_delta`` for
``patience`` consecutive epochs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from kdexp.internal.layer_map import LayerPair
from kdexp.phases import PhaseSchedule

Algorithm = Literal["all", "pid", "sid"]
ALGORITHMS: tuple[str, ...] = ("all", "pid", "sid")


@dataclass(frozen=True)
class Stage:
    """One training stage: its position and the layer pairs distilled in it."""

    index: int
    pairs: tuple[LayerPair, ...]

    @property
    def is_final_kd(self) -> bool:
        """The final soft-label KD stage has no internal pairs."""
        return not self.pairs


def build_stages(algorithm: Algorithm, layer_pairs: Sequence[LayerPair], final_kd: bool = True) -> tuple[Stage, ...]:
    """Stages of ``algorithm`` over ``layer_pairs`` (in the given, bottom-up order), KD stage last if ``final_kd``."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    pairs = tuple(layer_pairs)
    if not pairs:
        raise ValueError("internal distillation needs at least one layer pair")
    if algorithm == "all":
        internal_pair_sets = [pairs]
    elif algorithm == "pid":
        internal_pair_sets = [(pair,) for pair in pairs]
    else:
        internal_pair_sets = [pairs[: s + 1] for s in range(len(pairs))]
    pair_sets = [*internal_pair_sets, ()] if final_kd else internal_pair_sets
    return tuple(Stage(index=s, pairs=stage_pairs) for s, stage_pairs in enumerate(pair_sets))


def num_internal_stages(algorithm: Algorithm, num_pairs: int) -> int:
    """Internal stages before the KD stage: 1 for ``all``, one per pair for ``pid``/``sid``."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    return 1 if algorithm == "all" else num_pairs


def total_epochs_needed(algorithm: Algorithm, num_pairs: int, epochs_per_stage: int, kd_epochs: int) -> int:
    """Epochs for a full run without early switching: ``stages * epochs_per_stage + kd_epochs``."""
    return num_internal_stages(algorithm, num_pairs) * epochs_per_stage + kd_epochs


class StageSchedule(PhaseSchedule):
    """The stages of an ``all``/``pid``/``sid`` run as epoch phases: each internal stage lasts
    ``epochs_per_stage`` epochs (or fewer with ``patience``), the final KD stage the rest of training.

    Call :meth:`end_epoch` once at the end of every epoch with the epoch's stage loss (needed
    only when ``patience`` is set); it returns True when that epoch ended the stage.
    """

    def __init__(
        self,
        algorithm: Algorithm,
        layer_pairs: Sequence[LayerPair],
        epochs_per_stage: int,
        patience: int | None = None,
        min_delta: float = 0.0,
        final_kd: bool = True,
    ) -> None:
        if epochs_per_stage < 1:
            raise ValueError(f"epochs_per_stage must be at least 1, got {epochs_per_stage}")
        self.algorithm = algorithm
        self.layer_pairs = tuple(layer_pairs)
        self.stages = build_stages(algorithm, self.layer_pairs, final_kd)
        self.epochs_per_stage = epochs_per_stage
        super().__init__(
            "epoch", [epochs_per_stage] * (len(self.stages) - 1) + [None], patience=patience, min_delta=min_delta
        )

    @property
    def current_stage(self) -> Stage:
        return self.stages[self.index]

    @property
    def is_final_kd_stage(self) -> bool:
        return self.current_stage.is_final_kd

    def active_pairs(self) -> tuple[LayerPair, ...]:
        """Layer pairs distilled in the current stage; empty in the final KD stage."""
        return self.current_stage.pairs

    def end_epoch(self, epoch: int, stage_loss: float | None = None, global_step: int = 0) -> bool:
        try:
            return super().end_epoch(epoch, stage_loss, global_step)
        except ValueError as err:
            raise ValueError(str(err).replace("phase_loss", "stage_loss")) from None

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "algorithm": self.algorithm,
            "layer_pairs": [[pair.student, pair.teacher] for pair in self.layer_pairs],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore progress saved by :meth:`state_dict` into a schedule with the same setup (else ValueError)."""
        saved_pairs = [tuple(pair) for pair in state["layer_pairs"]]
        own_pairs = [(pair.student, pair.teacher) for pair in self.layer_pairs]
        if state["algorithm"] != self.algorithm or saved_pairs != own_pairs:
            raise ValueError(
                f"saved schedule ({state['algorithm']}, pairs {saved_pairs}) does not match this schedule "
                f"({self.algorithm}, pairs {own_pairs})"
            )
        super().load_state_dict(state)

    def __repr__(self) -> str:
        stage = self.current_stage
        pairs = "KD" if stage.is_final_kd else ", ".join(str(pair) for pair in stage.pairs)
        return f"StageSchedule({self.algorithm}, stage {stage.index + 1}/{len(self.stages)} [{pairs}])"
