"""Stage schedules for the three internal-distillation algorithms of Aguilar et al. (2020).

- ``all``: one stage distilling every matched pair ``(j, m(j))`` at once.
- ``pid`` (progressive): stage ``s`` distils only pair ``s``, bottom-up.
- ``sid`` (stacked): stage ``s`` distils pairs ``0 .. s``.

Every algorithm ends with a soft-label KD stage (no internal pairs) that lasts for the
rest of training. An internal stage ends after ``epochs_per_stage`` epochs, or earlier
when ``patience`` is set and its loss has not improved by ``min_delta`` for
``patience`` consecutive epochs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from kdexp.internal.layer_map import LayerPair

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


def build_stages(algorithm: Algorithm, layer_pairs: Sequence[LayerPair]) -> tuple[Stage, ...]:
    """Stages of ``algorithm`` over ``layer_pairs`` (in the given, bottom-up order), KD stage last."""
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
    pair_sets = [*internal_pair_sets, ()]
    return tuple(Stage(index=s, pairs=stage_pairs) for s, stage_pairs in enumerate(pair_sets))


def num_internal_stages(algorithm: Algorithm, num_pairs: int) -> int:
    """Internal stages before the KD stage: 1 for ``all``, one per pair for ``pid``/``sid``."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    return 1 if algorithm == "all" else num_pairs


def total_epochs_needed(algorithm: Algorithm, num_pairs: int, epochs_per_stage: int, kd_epochs: int) -> int:
    """Epochs for a full run without early switching: ``stages * epochs_per_stage + kd_epochs``."""
    return num_internal_stages(algorithm, num_pairs) * epochs_per_stage + kd_epochs


class StageSchedule:
    """Tracks the current stage of an ``all``/``pid``/``sid`` run and when to advance.

    Call :meth:`end_epoch` once at the end of every epoch with the epoch's stage loss
    (the internal loss being minimised in that stage; only needed when ``patience`` is
    set). It returns True when that epoch ended the stage, so the caller can rebuild
    optimisers or log the switch.
    """

    def __init__(
        self,
        algorithm: Algorithm,
        layer_pairs: Sequence[LayerPair],
        epochs_per_stage: int,
        patience: int | None = None,
        min_delta: float = 0.0,
    ) -> None:
        if epochs_per_stage < 1:
            raise ValueError(f"epochs_per_stage must be at least 1, got {epochs_per_stage}")
        if patience is not None and patience < 1:
            raise ValueError(f"patience must be None (fixed epochs) or at least 1, got {patience}")
        if min_delta < 0:
            raise ValueError(f"min_delta must be non-negative, got {min_delta}")
        self.algorithm = algorithm
        self.layer_pairs = tuple(layer_pairs)
        self.stages = build_stages(algorithm, self.layer_pairs)
        self.epochs_per_stage = epochs_per_stage
        self.patience = patience
        self.min_delta = min_delta
        self._stage_index = 0
        self._epochs_in_stage = 0
        self._best_stage_loss = math.inf
        self._epochs_without_improvement = 0
        self._last_epoch: int | None = None

    @property
    def current_stage(self) -> Stage:
        return self.stages[self._stage_index]

    @property
    def is_final_kd_stage(self) -> bool:
        return self.current_stage.is_final_kd

    def active_pairs(self) -> tuple[LayerPair, ...]:
        """Layer pairs distilled in the current stage; empty in the final KD stage."""
        return self.current_stage.pairs

    def end_epoch(self, epoch: int, stage_loss: float | None = None) -> bool:
        """Record the end of ``epoch``; return True if the schedule advanced to the next stage.

        Args:
            epoch: index of the epoch that just ended; must increase from call to call,
                which catches an epoch recorded twice (for example around a resume).
            stage_loss: the epoch's loss for the current stage. Required when
                ``patience`` is set; a NaN loss counts as no improvement.
        """
        if self._last_epoch is not None and epoch <= self._last_epoch:
            raise ValueError(f"end_epoch called for epoch {epoch} after epoch {self._last_epoch}")
        self._last_epoch = epoch
        if self.is_final_kd_stage:
            return False
        self._epochs_in_stage += 1
        if self.patience is not None:
            if stage_loss is None:
                raise ValueError("stage_loss is required when patience is set")
            self._record_stage_loss(float(stage_loss))
        if self._stage_is_over():
            self._advance()
            return True
        return False

    def _record_stage_loss(self, stage_loss: float) -> None:
        if stage_loss < self._best_stage_loss - self.min_delta:
            self._best_stage_loss = stage_loss
            self._epochs_without_improvement = 0
        else:
            self._epochs_without_improvement += 1

    def _stage_is_over(self) -> bool:
        if self._epochs_in_stage >= self.epochs_per_stage:
            return True
        return self.patience is not None and self._epochs_without_improvement >= self.patience

    def _advance(self) -> None:
        self._stage_index += 1
        self._epochs_in_stage = 0
        self._best_stage_loss = math.inf
        self._epochs_without_improvement = 0

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume in the same stage (plain Python values)."""
        return {
            "algorithm": self.algorithm,
            "layer_pairs": [[pair.student, pair.teacher] for pair in self.layer_pairs],
            "stage_index": self._stage_index,
            "epochs_in_stage": self._epochs_in_stage,
            "best_stage_loss": self._best_stage_loss,
            "epochs_without_improvement": self._epochs_without_improvement,
            "last_epoch": self._last_epoch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore progress saved by :meth:`state_dict` into a schedule with the same setup.

        Raises:
            ValueError: if the saved algorithm or layer pairs differ from this schedule's,
                since the saved stage index would then mean a different stage.
        """
        saved_pairs = [tuple(pair) for pair in state["layer_pairs"]]
        own_pairs = [(pair.student, pair.teacher) for pair in self.layer_pairs]
        if state["algorithm"] != self.algorithm or saved_pairs != own_pairs:
            raise ValueError(
                f"saved schedule ({state['algorithm']}, pairs {saved_pairs}) does not match this schedule "
                f"({self.algorithm}, pairs {own_pairs})"
            )
        if not 0 <= state["stage_index"] < len(self.stages):
            raise ValueError(f"saved stage_index {state['stage_index']} out of range for {len(self.stages)} stages")
        self._stage_index = int(state["stage_index"])
        self._epochs_in_stage = int(state["epochs_in_stage"])
        self._best_stage_loss = float(state["best_stage_loss"])
        self._epochs_without_improvement = int(state["epochs_without_improvement"])
        self._last_epoch = None if state["last_epoch"] is None else int(state["last_epoch"])

    def __repr__(self) -> str:
        stage = self.current_stage
        pairs = "KD" if stage.is_final_kd else ", ".join(str(pair) for pair in stage.pairs)
        return (
            f"StageSchedule({self.algorithm}, stage {stage.index + 1}/{len(self.stages)} [{pairs}], "
            f"epoch {self._epochs_in_stage}/{self.epochs_per_stage} in stage)"
        )
