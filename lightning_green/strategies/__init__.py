"""Energy-aware distributed training: ``Trainer(strategy="ddp_green")``.

Names are registered by :meth:`EnergyAwareDDPStrategy.register_strategies`, which the package's
``__init__`` calls once (a second call does nothing). The power-limit parts that this package used to
export live in :mod:`lightning_green.power_limit`; importing them from here still works until the next
release, with a DeprecationWarning.
"""

import warnings
from typing import Any

import lightning_green.power_limit as _power_limit_parts
from lightning_green.strategies.comm import CommCompression, CommStats
from lightning_green.strategies.ddp_green import EnergyAwareDDPStrategy

#: Names that moved to :mod:`lightning_green.power_limit`.
MOVED_TO_POWER_LIMIT = (
    "LimitProfile",
    "LimitSearch",
    "NvmlPowerControl",
    "PowerControl",
    "PowerControlError",
    "PowerControlUnavailable",
    "PowerLimitCache",
    "SimulatedPowerControl",
    "choose_limit",
    "limit_grid",
)


def __getattr__(name: str) -> Any:
    """The names that moved to :mod:`lightning_green.power_limit`, with a DeprecationWarning (PEP 562)."""
    if name not in MOVED_TO_POWER_LIMIT:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(
        f"`lightning_green.strategies.{name}` moved to `lightning_green.power_limit.{name}`; the old path goes in"
        " the next release",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(_power_limit_parts, name)


__all__ = ["CommCompression", "CommStats", "EnergyAwareDDPStrategy"]
