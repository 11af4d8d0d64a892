"""Losses that keep full precision inside mixed-precision autocast.

Under ``bf16-mixed`` or ``16-mixed`` autocast runs matrix products in 16 bits. That is fine for
a model's layers and ruinous for some losses: an FSP loss near convergence is a small
difference of large Gram products (bf16 keeps 8 bits of mantissa, so the difference is lost in
cancellation), and a softmax or KL over a vocabulary sums tens of thousands of terms. A loss
decorated with :func:`full_precision` runs with autocast off and its floating-point tensor
arguments cast to float32, so it computes the same value as outside autocast on the same inputs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar, cast

import torch

LossFn = TypeVar("LossFn", bound=Callable[..., Any])


def _as_float32(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float64:
        return value.float()
    if isinstance(value, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in value):
        return type(value)(_as_float32(v) for v in value)
    return value


def full_precision(loss: LossFn) -> LossFn:
    """Run ``loss`` with autocast disabled and its floating-point tensors (also in lists) in float32."""

    @functools.wraps(loss)
    def in_float32(*args: Any, **kwargs: Any) -> Any:
        args = tuple(_as_float32(a) for a in args)
        kwargs = {k: _as_float32(v) for k, v in kwargs.items()}
        with torch.autocast("cpu", enabled=False):
            if torch.cuda.is_available():
                with torch.autocast("cuda", enabled=False):
                    return loss(*args, **kwargs)
            return loss(*args, **kwargs)

    return cast(LossFn, in_float32)
