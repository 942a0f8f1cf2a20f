"""Sensor reading off the training thread: one daemon reader per sensor, paced by one scheduler.

Isolation: each sensor is read on its own daemon thread (``<thread_name>:<sensor name>``), woken by
the scheduler thread (``thread_name``) every ``interval_s``. A read that blocks holds up only its
own reader; the others keep their cadence. The scheduler never calls sensor code, so it cannot hang,
and the training thread does no work at all (hooks only note timestamps).

What each outcome of a read does (the whole policy is here):

* a :class:`Reading` the meter accepts is recorded;
* anything else returned (None, a float, NaN, time not moving forward, ...) is a rejected reading:
  a gap, with one warning per sensor naming it and the reason;
* :class:`SensorTransientError` (NVML ``UNKNOWN``/``TIMEOUT``, an I/O error on sysfs): a gap; the
  sensor is read again after a backoff (``interval_s``, doubling, at most ``MAX_BACKOFF_S``);
* any other exception: the sensor is dropped (failed, reported once);
* ``TRIES_IN_A_ROW`` unusable reads in a row (rejected or transient): the sensor is dropped;
* a read still running ``read_timeout_s`` after it began: the sensor is hung: dropped and marked
  failed; if it is still blocked when sampling stops, its daemon reader is abandoned (it cannot keep
  the process alive) and reported in :attr:`Sampler.abandoned` and the meter's stats.

Energy up to a dropped sensor's last good reading is kept, with the tail the meter extrapolated up
to its first failed read (at most one interval at its last good power: what was reported is never
taken back); the meter bridges gaps. Failed reads are stamped with ``clock`` (the readings' clock).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from lightning_green.checks import check_callable, check_name, check_number
from lightning_green.energy.meter import EnergyMeter
from lightning_green.sensors.base import Sensor, SensorTransientError

log = logging.getLogger("lightning_green")

#: Unusable reads in a row (transient errors or rejected readings) after which a sensor is dropped.
TRIES_IN_A_ROW = 6
#: The longest wait between retries of a sensor that fails transiently.
MAX_BACKOFF_S = 2.0
#: How long :meth:`Sampler.stop` waits for an idle reader to end (it runs no sensor code, so it ends at once).
IDLE_JOIN_S = 5.0
#: :meth:`Sampler.start` waits for first readings for one interval, but at least this long.
MIN_START_WAIT_S = 0.5


def check_interval(interval_s: float) -> float:
    return check_number("interval_s", interval_s, 0.0, strict=True, unit="a number of seconds")


class _Reader:
    """One sensor's daemon thread and its bookkeeping (guarded by the sampler's condition)."""

    def __init__(self, sensor: Sensor) -> None:
        self.sensor = sensor
        self.wake = threading.Event()
        # monotonic time the read in progress began
        self.busy_since: float | None = None
        # request generation of the newest finished read
        self.done_gen = -1
        self.bad_in_row = 0
        # backoff: no scheduled read before this monotonic time
        self.not_before = 0.0
        self.dropped = False
        self.warned = False
        self.thread: threading.Thread | None = None


class Sampler:
    """Reads ``sensors`` on daemon threads and records the readings in ``meter``.

    Args:
        sensors: the sensors to read; each is registered in ``meter`` by :meth:`start`.
        meter: where readings go.
        interval_s: seconds between readings (> 0).
        thread_name: the scheduler thread's name; readers are ``<thread_name>:<sensor name>``.
        stop_timeout_s: the longest :meth:`stop` waits for the last readings and the readers to end.
        read_timeout_s: a read running longer than this is hung: the sensor is dropped.
        start_timeout_s: the longest :meth:`start` waits for first readings; default one interval,
            at least ``MIN_START_WAIT_S`` (it returns as soon as every sensor answered).
        clock: the readings' clock (a test's own); it stamps failed reads, where extrapolation stops.

    :meth:`start` takes a first reading of every sensor and :meth:`stop` a last one, so energy covers
    the span between the two calls (for sensors that answer within those bounded waits).

    Raises:
        ValueError / TypeError: a bad argument (named in the message).
    """

    def __init__(
        self,
        sensors: Sequence[Sensor],
        meter: EnergyMeter,
        interval_s: float = 0.1,
        thread_name: str = "lightning_green-sampler",
        stop_timeout_s: float = 2.0,
        read_timeout_s: float = 5.0,
        start_timeout_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval_s = check_interval(interval_s)
        if isinstance(sensors, (str, Sensor)) or not all(isinstance(s, Sensor) for s in sensors):
            raise ValueError(f"`sensors` must be a list of lightning_green.sensors.Sensor, got {sensors!r}")
        names = [s.name for s in sensors]
        if len(set(names)) != len(names):
            raise ValueError(f"`sensors` holds two sensors with the same name: {names}")
        if not isinstance(meter, EnergyMeter):
            raise ValueError(f"`meter` must be an EnergyMeter, got {meter!r}")
        self._clock = check_callable("clock", clock, optional=False)
        self.meter = meter
        self.sensors = list(sensors)
        self._thread_name = check_name("thread_name", thread_name)
        self.stop_timeout_s = check_number("stop_timeout_s", stop_timeout_s, 0.0, strict=True)
        self.read_timeout_s = check_number("read_timeout_s", read_timeout_s, 0.0, strict=True)
        self.start_timeout_s = (
            max(self.interval_s, MIN_START_WAIT_S)
            if start_timeout_s is None
            else check_number("start_timeout_s", start_timeout_s, 0.0)
        )
        self._cv = threading.Condition()
        self._readers: list[_Reader] = []
        # request generation: a read that begins after a request carries its number
        self._gen = 0
        self._stopping = False
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None
        self._registered = False
        self._abandoned: list[str] = []

    # ------------------------------------------------------------------ public API
    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def active_names(self) -> list[str]:
        with self._cv:
            return [r.sensor.name for r in self._readers if not r.dropped]

    @property
    def abandoned(self) -> list[str]:
        """Sensors whose daemon reader was still blocked in ``read()`` when :meth:`stop` returned
        (their threads end, unused, if the read ever returns)."""
        return list(self._abandoned)

    def start(self) -> None:
        """Register the sensors (first call only), start the readers and the scheduler, and wait
        at most ``start_timeout_s`` for first readings: never longer, whatever a sensor does."""
        if self.alive:
            return
        if not self._registered:
            for sensor in self.sensors:
                self.meter.add_channel(sensor.describe())
            self._registered = True
            sensors = self.sensors
        # a restart after stop(): sensors dropped before stay dropped
        else:
            sensors = [r.sensor for r in self._readers if not r.dropped]
        with self._cv:
            self._stopping = False
            self._readers = [_Reader(s) for s in sensors]
        for reader in self._readers:
            name = f"{self._thread_name}:{reader.sensor.name}"
            reader.thread = threading.Thread(target=self._read_loop, args=(reader,), name=name, daemon=True)
            reader.thread.start()
        if not self.sample_once(self.start_timeout_s):
            for name in self._unanswered():
                log.warning(
                    "lightning_green: sensor %r gave no first reading within %.2g s; training goes on and it is "
                    "read in the background (dropped as hung after %.2g s)",
                    name,
                    self.start_timeout_s,
                    self.read_timeout_s,
                )
        self._halt.clear()
        self._thread = threading.Thread(target=self._schedule, name=self._thread_name, daemon=True)
        self._thread.start()

    def stop(self, final_reading: bool = True) -> None:
        """Take a last reading (``final_reading``), stop the scheduler and end the readers, within
        ``stop_timeout_s`` in all. A reader still blocked in ``read()`` then is abandoned: its sensor
        is marked failed (hung) and abandoned in the meter. Safe to call more than once."""
        thread = self._thread
        self._thread = None
        if thread is None:
            return
        deadline = time.monotonic() + self.stop_timeout_s
        self._halt.set()
        # the scheduler never calls sensor code: this is quick
        thread.join()
        if final_reading:
            self.sample_once(max(0.0, deadline - time.monotonic()))
        with self._cv:
            # an idle reader now ends without reading again
            self._stopping = True
            busy = [r for r in self._readers if r.busy_since is not None]
            idle = [r for r in self._readers if r.busy_since is None]
        for reader in busy + idle:
            reader.wake.set()
        for reader in idle:
            reader.thread.join(IDLE_JOIN_S)
        for reader in busy:
            # a reader known to be hung is not waited for
            if not reader.dropped:
                reader.thread.join(max(0.0, deadline - time.monotonic()))
        readers = busy + idle
        left = [r for r in readers if r.thread.is_alive()]
        self._abandoned = [r.sensor.name for r in left]
        for reader in left:
            with self._cv:
                self._drop(
                    reader,
                    f"hung: read() did not return within stop_timeout_s={self.stop_timeout_s:g} at stop",
                    hung=True,
                )
            self.meter.mark_abandoned(reader.sensor.name)
            log.warning(
                "lightning_green: sensor %r is blocked in read(); its daemon reader was abandoned and its figures "
                "stop at its last good reading (plus at most one interval at its last good power)",
                reader.sensor.name,
            )

    def sample_once(self, timeout_s: float | None = None) -> bool:
        """Have every active sensor read once now, on its reader, and wait for the readings.

        Args:
            timeout_s: the longest wait (``None``: ``read_timeout_s``). Returns False when some sensor
                did not answer in time, or when the sampler is not running; the readings that came
                in are recorded either way.
        """
        wait_s = self.read_timeout_s if timeout_s is None else timeout_s
        with self._cv:
            if self._stopping or not self._readers:
                return False
            self._gen += 1
            gen, now = self._gen, time.monotonic()
            # a read already running for over an interval is late (maybe hung): the caller does not wait on it
            late = [r for r in self._readers if r.busy_since is not None and now - r.busy_since > self.interval_s]
            for reader in self._readers:
                reader.wake.set()
            answered = self._cv.wait_for(
                lambda: all(r.dropped or r in late or r.done_gen >= gen for r in self._readers), wait_s
            )
            return answered and not late

    # ------------------------------------------------------------------ readers
    def _read_loop(self, reader: _Reader) -> None:
        while True:
            reader.wake.wait()
            reader.wake.clear()
            with self._cv:
                if self._stopping or reader.dropped:
                    return
                gen = self._gen
                reader.busy_since = time.monotonic()
            try:
                result, error = reader.sensor.read(), None
            except Exception as err:  # noqa: BLE001 - whatever a sensor raises, training goes on
                result, error = None, err
            with self._cv:
                reader.busy_since = None
                # hung and dropped meanwhile: its late reading is not used
                if reader.dropped:
                    return
                try:
                    message = self._apply(reader, result, error)
                except Exception as err:  # noqa: BLE001 - a reader never dies with an exception
                    message = self._drop(reader, f"error recording a reading: {type(err).__name__}: {err}")
                reader.done_gen = gen
                self._cv.notify_all()
            if message:
                log.warning("lightning_green: %s", message)

    def _apply(self, reader: _Reader, result: object, error: Exception | None) -> str | None:
        """Record one read's outcome (under the condition); return a warning to log, if any."""
        name = reader.sensor.name
        # when this read ended: a failed one stops the meter's extrapolation here
        now = self._clock()
        if error is not None and not isinstance(error, SensorTransientError):
            return self._drop(reader, f"{type(error).__name__}: {error}", t_s=now)
        if error is None:
            why = self.meter.submit(name, result, now)
            if why is None:
                reader.bad_in_row = 0
                reader.not_before = 0.0
                return None
            what = f"sensor {name!r} gave an unusable reading ({why}); counted as a gap"
        else:
            self.meter.note_transient(name, str(error), now)
            why = f"{type(error).__name__}: {error}"
            what = f"sensor {name!r} failed transiently ({why}); retried with backoff, counted as a gap"
        reader.bad_in_row += 1
        reader.not_before = time.monotonic() + min(self.interval_s * 2 ** (reader.bad_in_row - 1), MAX_BACKOFF_S)
        if reader.bad_in_row >= TRIES_IN_A_ROW:
            return self._drop(reader, f"{TRIES_IN_A_ROW} unusable reads in a row (last: {why})", t_s=now)
        if reader.warned:
            return None
        reader.warned = True
        return what + "; further ones are counted in the summary"

    def _drop(self, reader: _Reader, reason: str, hung: bool = False, t_s: float | None = None) -> str | None:
        """Drop a sensor (under the condition) at ``t_s`` (default: now); return the warning to log once."""
        if reader.dropped:
            return None
        reader.dropped = True
        self.meter.mark_failed(reader.sensor.name, reason, hung=hung, t_s=self._clock() if t_s is None else t_s)
        self._cv.notify_all()
        return f"sensor {reader.sensor.name!r} failed and was dropped, its figures are partial ({reason})"

    # ------------------------------------------------------------------ scheduler
    def _schedule(self) -> None:
        next_t = time.monotonic() + self.interval_s
        while not self._halt.wait(max(0.0, next_t - time.monotonic())):
            try:
                messages = self._tick(time.monotonic())
            except Exception as err:  # noqa: BLE001 - the scheduler must never die with an exception
                messages = [f"sampler error ignored: {type(err).__name__}: {err}"]
            for message in messages:
                log.warning("lightning_green: %s", message)
            next_t += self.interval_s
            now = time.monotonic()
            # fell behind: skip missed ticks instead of bursting
            if next_t < now:
                next_t = now + self.interval_s

    def _tick(self, now: float) -> list[str]:
        """Wake every idle reader that is not backing off; drop readers that are hung."""
        messages = []
        with self._cv:
            for reader in self._readers:
                if reader.dropped:
                    continue
                if reader.busy_since is not None:
                    if now - reader.busy_since > self.read_timeout_s:
                        waited_s = now - reader.busy_since
                        reason = (
                            f"hung: read() has not returned for {waited_s:.1f} s "
                            f"(read_timeout_s={self.read_timeout_s:g})"
                        )
                        messages.append(self._drop(reader, reason, hung=True))
                elif now >= reader.not_before:
                    reader.wake.set()
        return [m for m in messages if m]

    def _unanswered(self) -> list[str]:
        with self._cv:
            return [r.sensor.name for r in self._readers if not r.dropped and r.done_gen < self._gen]
