"""Deprecated: moved to :mod:`lightning_green.power_limit.restore` (this path goes in the next release)."""

import warnings

from lightning_green.power_limit.restore import SigtermRestore

warnings.warn(
    "`lightning_green.strategies.sigterm` moved to `lightning_green.power_limit.restore`",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = ["SigtermRestore"]
