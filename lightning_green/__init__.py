"""lightning_green: energy as a first-class training metric for PyTorch Lightning.

``import lightning_green`` is cheap: pynvml, psutil and torchao load where they are used. Importing
it registers the strategy names ``"ddp_green"`` and ``"ddp_green_spawn"`` (a second import does
nothing).
"""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_green.callbacks import EfficiencyLogger, Measurement, PowerLimitSearch, PowerSampler, find_power_sampler
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
    "find_power_sampler",
    "__version__",
]
