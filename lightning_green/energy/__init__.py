"""Pure logic, no Trainer: the sampler thread, the meter and the efficiency arithmetic."""

from lightning_green.energy.meter import DownsampledTrace, EnergyMeter
from lightning_green.energy.metrics import (
    DEFAULT_CARBON_INTENSITY_G_PER_KWH,
    J_PER_KWH,
    carbon_g,
    eer_j_per_param,
    epi_j,
    per_joule,
)
from lightning_green.energy.sampler import Sampler

__all__ = [
    "DEFAULT_CARBON_INTENSITY_G_PER_KWH",
    "J_PER_KWH",
    "DownsampledTrace",
    "EnergyMeter",
    "Sampler",
    "carbon_g",
    "eer_j_per_param",
    "epi_j",
    "per_joule",
]
