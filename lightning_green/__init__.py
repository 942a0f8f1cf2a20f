"""lightning_green: energy as a first-class training metric for PyTorch Lightning.

``import lightning_green`` is cheap: pynvml, psutil and torchao load where they are used. Importing
it registers the strategy names ``"ddp_green"`` and ``"ddp_green_spawn"`` (a second import does
nothing). ``python -m lightning_green compare|show`` imports none of it (no torch, no Lightning).
"""

import sys


def _located_by_cli() -> bool:
    """True while ``python -m lightning_green`` imports this package to find its ``__main__``: the
    command line reads JSON summaries only, so it skips torch and Lightning (seconds of start-up).
    Python sets ``sys.argv[0]`` to ``"-m"`` during exactly that import."""
    if sys.argv[:1] != ["-m"]:
        return False
    argv = list(getattr(sys, "orig_argv", [])) + [""]
    module = next((argv[i + 1] if a == "-m" else a[2:] for i, a in enumerate(argv) if a.startswith("-m")), None)
    return module == __name__


if not _located_by_cli():
    from lightning.pytorch.strategies import StrategyRegistry

    from lightning_green.callbacks import (
        EfficiencyLogger,
        Measurement,
        PowerLimitSearch,
        PowerSampler,
        find_power_sampler,
    )
    from lightning_green.callbacks.pruning import StructuredPruning
    from lightning_green.quantization import QuantizationAwareTraining
    from lightning_green.sensors import CpuEstimateSensor, NvmlSensor, RaplSensor, Sensor, SimulatedSensor
    from lightning_green.strategies import EnergyAwareDDPStrategy, SimulatedPowerControl

    EnergyAwareDDPStrategy.register_strategies(StrategyRegistry)

__version__ = "0.1.0"

__all__ = [
    "CpuEstimateSensor",
    "EfficiencyLogger",
    "EnergyAwareDDPStrategy",
    "Measurement",
    "NvmlSensor",
    "PowerLimitSearch",
    "PowerSampler",
    "QuantizationAwareTraining",
    "RaplSensor",
    "Sensor",
    "SimulatedPowerControl",
    "SimulatedSensor",
    "StructuredPruning",
    "find_power_sampler",
    "__version__",
]
