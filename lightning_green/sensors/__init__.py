"""Sensors: hardware only, no Lightning imports. ``pynvml`` and ``psutil`` load on first use."""

from lightning_green.sensors.base import (
    DOMAINS,
    KINDS,
    SOURCES,
    Reading,
    Sensor,
    SensorError,
    SensorLost,
    SensorPermissionError,
    SensorTransientError,
    SensorUnavailable,
    validate_sensor,
)
from lightning_green.sensors.estimate import CpuEstimateSensor
from lightning_green.sensors.nvml import NvmlSensor
from lightning_green.sensors.rapl import RaplSensor
from lightning_green.sensors.simulated import SimulatedSensor

__all__ = [
    "DOMAINS",
    "KINDS",
    "SOURCES",
    "CpuEstimateSensor",
    "NvmlSensor",
    "RaplSensor",
    "Reading",
    "Sensor",
    "SensorError",
    "SensorLost",
    "SensorPermissionError",
    "SensorTransientError",
    "SensorUnavailable",
    "SimulatedSensor",
    "validate_sensor",
]
