"""lightning_green: energy as a first-class training metric for PyTorch Lightning.

``import lightning_green`` is cheap: pynvml, psutil and torchao load where they are used.
"""

from lightning_green.callbacks import EfficiencyLogger, Measurement, PowerSampler, find_power_sampler
from lightning_green.sensors import CpuEstimateSensor, NvmlSensor, RaplSensor, Sensor, SimulatedSensor

__version__ = "0.1.0"

__all__ = [
    "CpuEstimateSensor",
    "EfficiencyLogger",
    "Measurement",
    "NvmlSensor",
    "PowerSampler",
    "RaplSensor",
    "Sensor",
    "SimulatedSensor",
    "find_power_sampler",
    "__version__",
]
