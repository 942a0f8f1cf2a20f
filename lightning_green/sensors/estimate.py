"""A CPU power **estimate** from utilisation, for machines with no readable counter.

Nothing is measured: watts come from a stated linear model, and every figure is labelled
``estimate``. The model::

    power_w = idle_w + (max_w - idle_w) * utilisation

where ``utilisation`` is the machine-wide busy fraction of all logical CPUs since the previous
reading (from ``psutil.cpu_times()``). Defaults: ``max_w = 10 W`` per logical CPU and
``idle_w = 30 %`` of ``max_w``; set both to your CPU's figures (for example its TDP) for a better
estimate.
"""

from __future__ import annotations

import math
import os
import time

from lightning_green.checks import check_name
from lightning_green.sensors.base import Reading, Sensor

DEFAULT_W_PER_CPU = 10.0
DEFAULT_IDLE_FRACTION = 0.3
#: The name of a :class:`CpuEstimateSensor` unless one is given.
DEFAULT_NAME = "cpu_estimate"


class CpuEstimateSensor(Sensor):
    """Estimated CPU power from utilisation and a linear power model (see the module docstring).

    Args:
        max_w: watts at 100 % utilisation; default ``10 W`` × logical CPUs.
        idle_w: watts at 0 % utilisation; default ``0.3 × max_w``.
        name: the sensor's name in metric keys.

    Raises:
        ValueError: a negative or non-finite wattage, ``idle_w > max_w`` or an empty ``name``.
    """

    source = "estimate"
    kind = "power"
    domain = "cpu"
    host_level = True

    def __init__(self, max_w: float | None = None, idle_w: float | None = None, name: str = DEFAULT_NAME) -> None:
        cpus = os.cpu_count() or 1
        max_w = DEFAULT_W_PER_CPU * cpus if max_w is None else max_w
        idle_w = DEFAULT_IDLE_FRACTION * max_w if idle_w is None else idle_w
        for arg, value in (("max_w", max_w), ("idle_w", idle_w)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"`{arg}` must be a finite number of watts >= 0, got {value!r}")
        if idle_w > max_w:
            raise ValueError(f"`idle_w` ({idle_w}) must not exceed `max_w` ({max_w})")
        import psutil

        self._psutil = psutil
        self.max_w = float(max_w)
        self.idle_w = float(idle_w)
        self.name = check_name("name", name)
        self.note = f"model: {self.idle_w:g} W idle + {self.max_w - self.idle_w:g} W x utilisation; not a measurement"
        self._last = self._busy_total()

    def _busy_total(self) -> tuple[float, float]:
        t = self._psutil.cpu_times()
        idle = t.idle + getattr(t, "iowait", 0.0)
        total = sum(t)
        return total - idle, total

    def read(self) -> Reading:
        busy, total = self._busy_total()
        d_total = total - self._last[1]
        util = (busy - self._last[0]) / d_total if d_total > 0 else 0.0
        self._last = (busy, total)
        util = min(max(util, 0.0), 1.0)
        return Reading(time.monotonic(), self.idle_w + (self.max_w - self.idle_w) * util, "power")

    def describe(self) -> dict:
        out = super().describe()
        out.update(max_w=self.max_w, idle_w=self.idle_w)
        return out
