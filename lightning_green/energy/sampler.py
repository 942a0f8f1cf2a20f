"""The background thread that reads every sensor each ``interval_s`` and feeds the meter.

It never raises out of its thread: a sensor that throws is reported once (a log warning), dropped,
and marked failed in the meter so the summary says its figures are partial.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Sequence

from lightning_green.energy.meter import EnergyMeter
from lightning_green.sensors.base import Sensor

log = logging.getLogger("lightning_green")


def check_interval(interval_s: float) -> float:
    if isinstance(interval_s, bool) or not isinstance(interval_s, (int, float)) or not math.isfinite(interval_s) or interval_s <= 0:
        raise ValueError(f"`interval_s` must be a number of seconds > 0, got {interval_s!r}")
    return float(interval_s)


class Sampler:
    """Reads ``sensors`` on a named daemon thread and records the readings in ``meter``.

    Args:
        sensors: the sensors to read; each is registered in ``meter`` by :meth:`start`.
        meter: where readings go.
        interval_s: seconds between readings (> 0).
        thread_name: the thread's name (visible in ``threading.enumerate()``).
        stop_timeout_s: how long :meth:`stop` waits for a read in progress before giving up on the
            thread (a hung sensor call; the thread is a daemon and cannot block exit).

    The first reading of every sensor is taken synchronously in :meth:`start` and a last one in
    :meth:`stop`, so energy covers exactly the span between the two calls.
    """

    def __init__(
        self,
        sensors: Sequence[Sensor],
        meter: EnergyMeter,
        interval_s: float = 0.1,
        thread_name: str = "lightning_green-sampler",
        stop_timeout_s: float = 5.0,
    ) -> None:
        self.interval_s = check_interval(interval_s)
        self.meter = meter
        self.sensors = list(sensors)
        self._active: list[Sensor] = []
        self._thread_name = thread_name
        self.stop_timeout_s = stop_timeout_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._registered = False
        self._read_lock = threading.Lock()  # the thread and stop()/measure() may both read

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def failed(self) -> dict[str, str]:
        return {n: r for n in self.meter.names if (r := self.meter.stats(n)["failed"])}

    def start(self) -> None:
        """Register the sensors (first call only), read them once and start the thread."""
        if self.alive:
            return
        if not self._registered:
            for sensor in self.sensors:
                self.meter.add_channel(sensor.describe())
            self._active = list(self.sensors)
            self._registered = True
        self.sample_once()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=self._thread_name, daemon=True)
        self._thread.start()

    def stop(self, final_reading: bool = True) -> None:
        """Stop and join the thread; take one last reading. Safe to call more than once."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stop.set()
        thread.join(timeout=max(10 * self.interval_s, self.stop_timeout_s))
        if thread.is_alive():  # a sensor call hung: the daemon thread cannot block exit; no final reading
            log.warning("lightning_green: the sampler thread did not stop within its timeout (a sensor read hangs)")
            return
        if final_reading:
            self.sample_once()

    def sample_once(self, timeout_s: float | None = None) -> bool:
        """Read every active sensor once (called by the thread; also usable directly).

        Args:
            timeout_s: how long to wait for a read in progress on the thread (``None``: as long as it
                takes). Returns False, having read nothing, when that wait times out.
        """
        if not self._read_lock.acquire(timeout=-1 if timeout_s is None else timeout_s):
            return False
        try:
            for sensor in list(self._active):
                try:
                    reading = sensor.read()
                except Exception as err:  # noqa: BLE001 - any failure drops the sensor, never training
                    self._drop(sensor, err)
                    continue
                self.meter.record(sensor.name, reading)
        finally:
            self._read_lock.release()
        return True

    @property
    def active_names(self) -> list[str]:
        return [s.name for s in self._active]

    def _drop(self, sensor: Sensor, err: BaseException) -> None:
        if sensor in self._active:
            self._active.remove(sensor)
        reason = f"{type(err).__name__}: {err}"
        self.meter.mark_failed(sensor.name, reason)
        log.warning("lightning_green: sensor %r failed and was dropped, its figures are partial (%s)", sensor.name, reason)

    def _run(self) -> None:
        next_t = time.monotonic() + self.interval_s
        while not self._stop.wait(max(0.0, next_t - time.monotonic())):
            try:
                self.sample_once()
            except Exception as err:  # noqa: BLE001 - the thread must never die with an exception
                log.warning("lightning_green: sampler error ignored: %s", err)
            next_t += self.interval_s
            now = time.monotonic()
            if next_t < now:  # fell behind (slow sensor): skip missed ticks instead of bursting
                next_t = now + self.interval_s
