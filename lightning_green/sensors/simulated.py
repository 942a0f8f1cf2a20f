"""A sensor whose power is scripted: for tests, demos and benchmarks. Its figures are labelled
``simulated`` everywhere and never pose as a measurement."""

from __future__ import annotations

import math
import time
from typing import Callable, Union

from lightning_green.sensors.base import Reading, Sensor

PowerSpec = Union[float, Callable[[float], float]]


class SimulatedSensor(Sensor):
    """Scripted power, as a constant or a function of the seconds since the sensor's first reading.

    Args:
        power_w: watts, or a callable ``f(t_s) -> watts`` where ``t_s`` is seconds since the first
            :meth:`read`.
        name: the sensor's name in metric keys (``power/<name>_w``).
        host_level: treat the sensor as a machine-wide one (read by one process per node).
        domain: what it stands for in the summary (``"gpu"``, ``"cpu"``, ``"dram"``, ``"other"``).
        clock: the clock to read; ``time.monotonic`` unless a test drives time itself.

    Raises:
        ValueError: ``power_w`` is negative or not a number/callable, or ``name`` is empty.

    Example::

        sensor = SimulatedSensor(power_w=lambda t: 100.0 + 50.0 * math.sin(t))
    """

    source = "simulated"
    kind = "power"

    def __init__(
        self,
        power_w: PowerSpec = 100.0,
        name: str = "sim",
        host_level: bool = False,
        domain: str = "gpu",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if callable(power_w):
            self.power_w = power_w
        elif isinstance(power_w, (int, float)) and not isinstance(power_w, bool):
            if not math.isfinite(power_w) or power_w < 0:
                raise ValueError(f"`power_w` must be a finite number >= 0 or a callable, got {power_w!r}")
            self.power_w = float(power_w)
        else:
            raise ValueError(f"`power_w` must be a number (watts) or a callable f(seconds) -> watts, got {power_w!r}")
        if not name or not isinstance(name, str):
            raise ValueError(f"`name` must be a non-empty string, got {name!r}")
        self.name = name
        self.host_level = host_level
        self.domain = domain
        self._clock = clock
        self._t0: float | None = None

    def read(self) -> Reading:
        now = self._clock()
        if self._t0 is None:
            self._t0 = now
        power = self.power_w(now - self._t0) if callable(self.power_w) else self.power_w
        return Reading(t_s=now, value=float(power), kind="power")
