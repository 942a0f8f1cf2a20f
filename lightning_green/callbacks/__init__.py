"""Lightning glue over :mod:`lightning_green.energy` and the levers. Each callback's module loads on
first use (PEP 562): constructing a PowerSampler does not load the power-limit search or the budget."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "EfficiencyLogger": "lightning_green.callbacks.efficiency",
    "EnergyBudget": "lightning_green.callbacks.budget",
    "Measurement": "lightning_green.callbacks.power",
    "PowerLimitSearch": "lightning_green.callbacks.power_limit",
    "PowerSampler": "lightning_green.callbacks.power",
    "find_power_sampler": "lightning_green.callbacks.power",
}

__all__ = ["EfficiencyLogger", "EnergyBudget", "Measurement", "PowerLimitSearch", "PowerSampler", "find_power_sampler"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from lightning_green.callbacks.budget import EnergyBudget
    from lightning_green.callbacks.efficiency import EfficiencyLogger
    from lightning_green.callbacks.power import Measurement, PowerSampler, find_power_sampler
    from lightning_green.callbacks.power_limit import PowerLimitSearch
