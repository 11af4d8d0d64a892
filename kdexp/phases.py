"""Training in phases: what a method does changes at phase boundaries, at epoch ends or every k steps.

A `PhaseSchedule` holds the lengths of the phases in one unit (epochs or optimiser steps); the
last may have no length (it lasts the rest of training), or the schedule may repeat one
length forever (`PhaseSchedule.every(k)`). An epoch-based phase may end early when its loss
stops improving (`patience`). The schedule's state goes into checkpoints, so a resumed run is
in the same phase. The methods' base (`kdexp.methods.base`) drives it and can restart the
learning-rate schedule at each phase (warm-up and linear decay over the phase's own steps).

Used by the internal-representation methods (one stage per epoch budget) and by knowledge
selection (an action held for a phase of k steps).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

Unit = Literal["epoch", "step"]
UNITS: tuple[str, ...] = ("epoch", "step")


class PhaseSchedule:
    """The current phase of training and when to move to the next one.

    Args:
        unit: ``"epoch"`` (phases switch at epoch ends) or ``"step"`` (after optimiser steps).
        lengths: each phase's length in ``unit``; the last may be None (the rest of training).
        repeat: when true the schedule has endless phases of ``lengths[0]`` (``every``).
        patience, min_delta: an epoch phase also ends when its loss has not improved by
            ``min_delta`` for ``patience`` epochs (never past its length).
    """

    def __init__(
        self,
        unit: Unit,
        lengths: Sequence[int | None],
        repeat: bool = False,
        patience: int | None = None,
        min_delta: float = 0.0,
    ) -> None:
        if unit not in UNITS:
            raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
        if not lengths:
            raise ValueError("a phase schedule needs at least one phase")
        if any(length is not None and length < 1 for length in lengths):
            raise ValueError(f"phase lengths must be at least 1, got {list(lengths)}")
        if any(length is None for length in lengths[:-1]) or (repeat and (len(lengths) != 1 or lengths[0] is None)):
            raise ValueError("only the last phase may last the rest of training; repeat needs one finite length")
        if patience is not None and (patience < 1 or unit != "epoch"):
            raise ValueError(f"patience must be None or at least 1 (epoch phases only), got {patience}")
        if min_delta < 0:
            raise ValueError(f"min_delta must be non-negative, got {min_delta}")
        self.unit = unit
        self.lengths = tuple(lengths)
        self.repeat = repeat
        self.patience = patience
        self.min_delta = min_delta
        self.index = 0
        self.start_step = 0  # the global step at which the current phase began
        self._done_in_phase = 0  # epochs or steps finished in the current phase
        self._best_loss = math.inf
        self._without_improvement = 0
        self._last_epoch: int | None = None

    @classmethod
    def every(cls, steps: int) -> "PhaseSchedule":
        """Endless phases of `steps` optimiser steps each."""
        return cls("step", [steps], repeat=True)

    # ------------------------------------------------------------------ where we are

    @property
    def length(self) -> int | None:
        """The current phase's length in `unit` (None: the rest of training)."""
        return self.lengths[0] if self.repeat else self.lengths[self.index]

    @property
    def is_last(self) -> bool:
        return not self.repeat and self.index == len(self.lengths) - 1

    def length_in_steps(self, steps_per_epoch: int, total_steps: int) -> int:
        """The current phase's length in optimiser steps (for a per-phase learning-rate schedule)."""
        if self.length is None:
            return max(1, total_steps - self.start_step)
        return self.length * (steps_per_epoch if self.unit == "epoch" else 1)

    # ------------------------------------------------------------------ advancing

    def end_epoch(self, epoch: int, phase_loss: float | None = None, global_step: int = 0) -> bool:
        """Record the end of `epoch`; True when it ended the phase (an epoch schedule only).

        `epoch` must increase from call to call (an epoch recorded twice, around a resume,
        is an error). `phase_loss` is required when `patience` is set; NaN counts as no improvement.
        """
        if self._last_epoch is not None and epoch <= self._last_epoch:
            raise ValueError(f"end_epoch called for epoch {epoch} after epoch {self._last_epoch}")
        self._last_epoch = epoch
        if self.unit != "epoch" or self.length is None:
            return False
        self._done_in_phase += 1
        if self.patience is not None:
            if phase_loss is None:
                raise ValueError("phase_loss is required when patience is set")
            self._record_loss(float(phase_loss))
        if self._done_in_phase >= self.length or (
            self.patience is not None and self._without_improvement >= self.patience
        ):
            self._advance(global_step)
            return True
        return False

    def end_step(self, global_step: int) -> bool:
        """Record one finished optimiser step; True when it ended the phase (a step schedule only)."""
        if self.unit != "step" or self.length is None:
            return False
        self._done_in_phase += 1
        if self._done_in_phase >= self.length:
            self._advance(global_step)
            return True
        return False

    def _record_loss(self, loss: float) -> None:
        if loss < self._best_loss - self.min_delta:
            self._best_loss = loss
            self._without_improvement = 0
        else:
            self._without_improvement += 1

    def _advance(self, global_step: int) -> None:
        self.index += 1
        self.start_step = global_step
        self._done_in_phase = 0
        self._best_loss = math.inf
        self._without_improvement = 0

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume in the same phase (plain Python values)."""
        return {
            "unit": self.unit,
            "lengths": list(self.lengths),
            "repeat": self.repeat,
            "index": self.index,
            "start_step": self.start_step,
            "done_in_phase": self._done_in_phase,
            "best_loss": self._best_loss,
            "without_improvement": self._without_improvement,
            "last_epoch": self._last_epoch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore progress into a schedule built with the same unit and lengths (else ValueError)."""
        setup = (state["unit"], list(state["lengths"]), state["repeat"])
        if setup != (self.unit, list(self.lengths), self.repeat):
            raise ValueError(
                f"saved phases {setup} do not match this schedule {(self.unit, list(self.lengths), self.repeat)}"
            )
        if not self.repeat and not 0 <= state["index"] < len(self.lengths):
            raise ValueError(f"saved phase index {state['index']} out of range for {len(self.lengths)} phases")
        self.index = int(state["index"])
        self.start_step = int(state["start_step"])
        self._done_in_phase = int(state["done_in_phase"])
        self._best_loss = float(state["best_loss"])
        self._without_improvement = int(state["without_improvement"])
        self._last_epoch = None if state["last_epoch"] is None else int(state["last_epoch"])


def phase_lr_factor(
    step: int, schedule: PhaseSchedule, warmup_ratio: float, steps_per_epoch: int, total_steps: int
) -> float:
    """Linear warm-up then linear decay over the current phase's steps (the BERT recipe, per phase)."""
    length = schedule.length_in_steps(steps_per_epoch, total_steps)
    warmup = int(warmup_ratio * length)
    t = step - schedule.start_step
    if t < warmup:
        return t / max(1, warmup)
    return max(0.0, (length - t) / max(1, length - warmup))
