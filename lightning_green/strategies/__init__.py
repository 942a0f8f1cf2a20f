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
from lightning_green.strategies.power_limit import LimitProfile, PowerLimitCache, PowerLimitSearch, choose_limit, limit_grid

__all__ = [
    "CommCompression",
    "CommStats",
    "EnergyAwareDDPStrategy",
    "LimitProfile",
    "NvmlPowerControl",
    "PowerControl",
    "PowerControlError",
    "PowerControlUnavailable",
    "PowerLimitCache",
    "PowerLimitSearch",
    "SimulatedPowerControl",
    "choose_limit",
    "limit_grid",
]
