"""Random streams that depend on the seed alone: derived seeds, seeding, and RNG isolation.

A run's randomness (student initialisation, each epoch's data order and dropout) is seeded
from `(seed, what, epoch)`, never from whatever state earlier stages left behind, so a cold
and a warm cache, or a fresh and a resumed run, draw the same numbers.
"""

from __future__ import annotations

import hashlib
import random
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch


def derive_seed(seed: int, *labels: object) -> int:
    """A 31-bit seed from `seed` and labels (`derive_seed(1, "epoch", 3)`), stable across processes."""
    text = ":".join(str(part) for part in (seed, *labels))
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


def seed_all(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (every CUDA device too)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Run the block without changing the global RNG states (Python, NumPy, torch, this process's CUDA device).

    Stages that may or may not run (a cache miss computes, a hit does not) run inside it, so
    the random numbers drawn after them are the same either way.
    """
    python_state = random.getstate()
    numpy_state = np.random.get_state()
    # Only this process's own device: forking every visible GPU's generator would open a context on each.
    devices = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)
