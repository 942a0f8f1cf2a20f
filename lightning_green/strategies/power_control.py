"""Deprecated: moved to :mod:`lightning_green.power_limit.control` (this path goes in the next release)."""

import warnings

from lightning_green.power_limit.cache import write_json_atomic
from lightning_green.power_limit.control import (
    NvmlPowerControl,
    PowerControl,
    PowerControlError,
    PowerControlUnavailable,
    SimulatedPowerControl,
)

warnings.warn(
    "`lightning_green.strategies.power_control` moved to `lightning_green.power_limit` (control.py)",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = [
    "NvmlPowerControl",
    "PowerControl",
    "PowerControlError",
    "PowerControlUnavailable",
    "SimulatedPowerControl",
    "write_json_atomic",
]
