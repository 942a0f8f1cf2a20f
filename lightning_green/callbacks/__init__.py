"""Lightning glue over :mod:`lightning_green.energy`."""

from lightning_green.callbacks.budget import EnergyBudget
from lightning_green.callbacks.efficiency import EfficiencyLogger
from lightning_green.callbacks.power import Measurement, PowerSampler, find_power_sampler
from lightning_green.callbacks.power_limit import PowerLimitSearch

__all__ = ["EfficiencyLogger", "EnergyBudget", "Measurement", "PowerLimitSearch", "PowerSampler", "find_power_sampler"]
