"""Efficiency and carbon arithmetic. Plain functions of joules and counts.

* EER, the Energy Efficiency Ratio: training energy / number of model parameters (J per parameter).
* EPI, Energy Per Inference: inference energy / number of inference samples (J per sample), and per
  token where tokens are counted.
* Rates: samples (or tokens) per joule.
* Carbon: ``kWh × PUE × carbon intensity (gCO2e/kWh)``. No network look-up: the intensity is a number
  the user passes; the default is the world average of electricity generation, 475 gCO2/kWh
  (IEA, Global Energy & CO2 Status Report 2019).
"""

from __future__ import annotations

import math

J_PER_KWH = 3.6e6
DEFAULT_CARBON_INTENSITY_G_PER_KWH = 475.0


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else math.nan


def eer_j_per_param(energy_j: float, n_params: int) -> float:
    """Energy Efficiency Ratio: joules per model parameter (NaN without parameters)."""
    return _ratio(energy_j, n_params)


def epi_j(energy_j: float, n_inferences: float) -> float:
    """Energy Per Inference: joules per sample (or per token, given tokens). NaN for zero samples."""
    return _ratio(energy_j, n_inferences)


def per_joule(count: float, energy_j: float) -> float:
    """Samples (or tokens) per joule. NaN when no energy was measured."""
    return _ratio(count, energy_j)


def kwh(energy_j: float) -> float:
    return energy_j / J_PER_KWH


def carbon_g(energy_j: float, carbon_intensity_g_per_kwh: float = DEFAULT_CARBON_INTENSITY_G_PER_KWH, pue: float = 1.0) -> float:
    """Grams of CO2-equivalent for ``energy_j`` of IT energy at a data-centre PUE."""
    return kwh(energy_j) * pue * carbon_intensity_g_per_kwh


def check_carbon_args(carbon_intensity_g_per_kwh: float, pue: float) -> None:
    """Raise ValueError naming the argument for a negative intensity or a PUE below 1."""
    if isinstance(carbon_intensity_g_per_kwh, bool) or not isinstance(carbon_intensity_g_per_kwh, (int, float)) or not math.isfinite(carbon_intensity_g_per_kwh) or carbon_intensity_g_per_kwh < 0:
        raise ValueError(f"`carbon_intensity_g_per_kwh` must be a finite number >= 0 (gCO2e per kWh), got {carbon_intensity_g_per_kwh!r}")
    if isinstance(pue, bool) or not isinstance(pue, (int, float)) or not math.isfinite(pue) or pue < 1:
        raise ValueError(f"`pue` (power usage effectiveness) must be a finite number >= 1.0, got {pue!r}")
