"""lightning_green: energy as a first-class training metric for PyTorch Lightning.

``import lightning_green`` registers the strategy names ``"ddp_green"`` and ``"ddp_green_spawn"`` (a
second import does nothing) and nothing else: every name below loads its module on first use
(PEP 562), so the quantization package and torchao load only when QAT is used, and pynvml, psutil and
matplotlib where they are read. ``python -m lightning_green compare|show`` (:mod:`lightning_green.cli`)
reads JSON summaries only and imports neither torch nor Lightning.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: What users construct, and the module each comes from.
_EXPORTS = {
    "CpuEstimateSensor": "lightning_green.sensors",
    "EfficiencyLogger": "lightning_green.callbacks.efficiency",
    "EnergyAwareDDPStrategy": "lightning_green.strategies.ddp_green",
    "EnergyBudget": "lightning_green.callbacks.budget",
    "FabricEnergy": "lightning_green.fabric",
    "NvmlPowerControl": "lightning_green.power_limit",
    "PowerControl": "lightning_green.power_limit",
    "Measurement": "lightning_green.energy.session",
    "NvmlSensor": "lightning_green.sensors",
    "PowerLimitSearch": "lightning_green.callbacks.power_limit",
    "PowerSampler": "lightning_green.callbacks.power",
    "QuantizationAwareTraining": "lightning_green.quantization",
    "RaplSensor": "lightning_green.sensors",
    "Sensor": "lightning_green.sensors",
    "StructuredPruning": "lightning_green.callbacks.pruning",
    "find_power_sampler": "lightning_green.callbacks.power",
}

#: Test doubles that were top-level names before 0.2: still found here, with a DeprecationWarning,
#: for one release. Their homes are the submodules named.
_MOVED = {
    "SimulatedSensor": "lightning_green.sensors",
    "SimulatedPowerControl": "lightning_green.power_limit",
}

__all__ = [
    "CpuEstimateSensor",
    "EfficiencyLogger",
    "EnergyAwareDDPStrategy",
    "EnergyBudget",
    "FabricEnergy",
    "Measurement",
    "NvmlPowerControl",
    "NvmlSensor",
    "PowerControl",
    "PowerLimitSearch",
    "PowerSampler",
    "QuantizationAwareTraining",
    "RaplSensor",
    "Sensor",
    "StructuredPruning",
    "find_power_sampler",
    "__version__",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _MOVED:
        warnings.warn(
            f"`lightning_green.{name}` is a test double and moved: import it from `{_MOVED[name]}` "
            "(the top-level name goes in the next release)",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(_MOVED[name]), name)
    else:
        raise AttributeError(f"module 'lightning_green' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*__all__, *_MOVED])


def _locating_cli() -> bool:
    """True while ``python -m lightning_green[.cli]`` imports this package to find the module to run:
    the command line reads JSON only, so it skips the strategy's registration, which imports Lightning
    and torch (seconds). Python sets ``sys.argv[0]`` to ``"-m"`` during exactly that import, and
    ``sys.orig_argv`` names the module."""
    if sys.argv[:1] != ["-m"]:
        return False
    argv = sys.orig_argv
    for i, arg in enumerate(argv[:-1]):
        if arg == "-m":
            return argv[i + 1].split(".")[0] == __name__
    return False


if not _locating_cli():
    from lightning.pytorch.strategies import StrategyRegistry

    from lightning_green.strategy_names import register_strategy_names

    register_strategy_names(StrategyRegistry)

if TYPE_CHECKING:
    from lightning_green.callbacks.budget import EnergyBudget
    from lightning_green.callbacks.efficiency import EfficiencyLogger
    from lightning_green.callbacks.power import PowerSampler, find_power_sampler
    from lightning_green.callbacks.power_limit import PowerLimitSearch
    from lightning_green.callbacks.pruning import StructuredPruning
    from lightning_green.energy.session import Measurement
    from lightning_green.fabric import FabricEnergy
    from lightning_green.power_limit import NvmlPowerControl, PowerControl
    from lightning_green.quantization import QuantizationAwareTraining
    from lightning_green.sensors import CpuEstimateSensor, NvmlSensor, RaplSensor, Sensor
    from lightning_green.strategies.ddp_green import EnergyAwareDDPStrategy
