"""Energy-aware distributed training: ``Trainer(strategy="ddp_green")``.

Names are registered by :meth:`EnergyAwareDDPStrategy.register_strategies`, which the package's
``__init__`` calls once (a second call does nothing).
"""

from lightning_green.strategies.comm import CommCompression, CommStats
from lightning_green.strategies.ddp_green import EnergyAwareDDPStrategy
from lightning_green.strategies.power_control import (
    NvmlPowerControl,
    PowerControl,
    PowerControlError,
    PowerControlUnavailable,
    SimulatedPowerControl,
)
from lightning_green.strategies.power_limit import LimitProfile, LimitSearch, PowerLimitCache, choose_limit, limit_grid

__all__ = [
    "CommCompression",
    "CommStats",
    "EnergyAwareDDPStrategy",
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
]
