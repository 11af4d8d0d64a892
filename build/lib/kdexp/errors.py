"""The errors a user can cause. Each message names the key, file or line and says what would work.

`kdexp-train` prints a `KdexpError` as one line and exits non-zero, before any expensive
work where the error can be known early (`HYDRA_FULL_ERROR=1` shows the traceback).
"""

from __future__ import annotations


class KdexpError(ValueError):
    """Base of every error caused by the user's config, data or models."""


class ConfigError(KdexpError):
    """A config value that cannot work: names the key and what would."""


class DataError(KdexpError):
    """Bad input data: names the file (and line) and what would work."""


class ModelError(KdexpError):
    """A model that cannot be found or built: names the key and what would work."""
