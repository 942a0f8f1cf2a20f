"""A sensor whose power is scripted: for tests, demos and benchmarks. Its figures are labelled
``simulated`` everywhere and never pose as a measurement."""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Callable

from lightning_green.checks import check_bool, check_name
from lightning_green.sensors.base import DOMAINS, Reading, Sensor, SensorError

PowerSpec = float | Callable[[float], float]


class SimulatedSensor(Sensor):
    """Scripted power, as a constant or a function of the seconds since the sensor's first reading.

    Args:
        power_w: watts, or a callable ``f(t_s) -> watts`` where ``t_s`` is seconds since the first
            :meth:`read`. A callable that raises or returns something other than a number makes
            :meth:`read` raise a :class:`SensorError` naming ``power_w`` and what it returned (the
            sampler then drops the sensor with a warning; training goes on). A negative or NaN
            number is a rejected reading (a gap).
        name: the sensor's name in metric keys (``power/<name>_w``).
        host_level: treat the sensor as a machine-wide one (read by one process per node).
        domain: what it stands for in the summary (``"gpu"``, ``"cpu"``, ``"dram"``, ``"other"``).
        clock: the clock to read; ``time.monotonic`` unless a test drives time itself.

    Raises:
        ValueError: ``power_w`` is negative or not a number/callable, ``name`` is empty, ``host_level``
            is not a bool, ``domain`` is not one of ``DOMAINS`` or ``clock`` is not callable.

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
        if domain not in DOMAINS:
            raise ValueError(f"`domain` must be one of {', '.join(DOMAINS)}, got {domain!r}")
        if not callable(clock):
            raise ValueError(f"`clock` must be a callable returning seconds, got {clock!r}")
        self.name = check_name("name", name)
        self.host_level = check_bool("host_level", host_level)
        self.domain = domain
        self._clock = clock
        self._t0: float | None = None

    def read(self) -> Reading:
        now = self._clock()
        if self._t0 is None:
            self._t0 = now
        power = self._call_power(now - self._t0) if callable(self.power_w) else self.power_w
        return Reading(t_s=now, value=float(power), kind="power")

    def _call_power(self, t_s: float) -> float:
        try:
            power = self.power_w(t_s)
        except Exception as err:  # noqa: BLE001 - say which argument failed
            raise SensorError(f"`power_w` raised {type(err).__name__}: {err}") from err
        if isinstance(power, bool) or not isinstance(power, numbers.Real):
            raise SensorError(
                f"`power_w` returned {power!r} ({type(power).__name__}); it must return watts as a number"
            )
        return power
