"""Energy integration: cumulative energy per sensor, windows between arbitrary timestamps.

Plain Python, no Trainer and no threads of its own: the sampler feeds :meth:`EnergyMeter.record`
from its thread; the callbacks ask for energy between two ``time.monotonic()`` timestamps.

How readings become energy (the attribution rule):

* ``energy`` readings (a cumulative counter in joules) are integrated **by difference**; between two
  readings the counter is interpolated linearly.
* ``power`` readings (watts) are integrated with the **trapezoid rule**; between two readings power
  is interpolated linearly, so a window edge that falls between readings gets the exact integral of
  that line (not a whole interval).
* Past the newest reading, energy is extrapolated at the newest power for at most ``interval``
  seconds of tail; the next reading replaces the extrapolation.

Rejected readings (NaN, infinite, negative, a counter going backwards, time not moving forward)
count as gaps: the integral spans the gap by interpolation and the summary reports the gap count.
Memory is flat: each sensor keeps a bounded window of recent points and a downsampled trace.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections import deque
from typing import Any, Iterable

from lightning_green.sensors.base import Reading

#: A counter's power (difference / time) is only trusted for peaks and traces over at least this
#: long: NVML's energy counter updates about every 100 ms, so a shorter interval can hold a whole
#: update (a false spike) or none (a false zero). Energy itself is exact either way.
MIN_COUNTER_DT_S = 0.1


class DownsampledTrace:
    """A power trace of bounded size: when it holds more than ``max_points`` points, neighbouring
    points are merged in pairs (weighted by the samples each holds) and later samples are averaged
    in buckets twice as wide. Each point is the mean time and mean power of the samples it holds.

    Args:
        max_points: the most points kept (>= 2).
    """

    def __init__(self, max_points: int = 512) -> None:
        if max_points < 2:
            raise ValueError(f"`max_points` must be >= 2, got {max_points}")
        self.max_points = max_points
        self._points: list[tuple[float, float, int]] = []  # (mean t, mean power, samples)
        self._stride = 1
        self._pending = (0.0, 0.0, 0)  # running sums of the bucket being filled: (sum t, sum power, samples)

    def add(self, t_s: float, power_w: float) -> None:
        sum_t, sum_p, n = self._pending
        sum_t, sum_p, n = sum_t + t_s, sum_p + power_w, n + 1
        if n < self._stride:
            self._pending = (sum_t, sum_p, n)
            return
        self._points.append((sum_t / n, sum_p / n, n))
        self._pending = (0.0, 0.0, 0)
        if len(self._points) > self.max_points:
            self._points = [_merge(self._points[i : i + 2]) for i in range(0, len(self._points), 2)]
            self._stride *= 2

    @property
    def pending_samples(self) -> int:
        return self._pending[2]

    def as_list(self) -> list[tuple[float, float]]:
        sum_t, sum_p, n = self._pending
        points = self._points + ([(sum_t / n, sum_p / n, n)] if n else [])
        return [(t, p) for t, p, _ in points]


def _merge(points: list[tuple[float, float, int]]) -> tuple[float, float, int]:
    n = sum(p[2] for p in points)
    return (sum(p[0] * p[2] for p in points) / n, sum(p[1] * p[2] for p in points) / n, n)


class _Channel:
    """State of one sensor in the meter."""

    def __init__(self, info: dict, history: int, trace_points: int) -> None:
        self.info = dict(info)
        self.kind = info["kind"]
        self.t: deque[float] = deque(maxlen=history)
        self.e: deque[float] = deque(maxlen=history)  # cumulative joules at t (this process)
        self.p: deque[float] = deque(maxlen=history)  # watts at t (for counters: mean over the interval ending at t)
        self.last_raw: float | None = None
        self.first_t: float | None = None
        self.n_samples = 0
        self.n_gaps = 0
        self.peak_w = 0.0
        self.failed: str | None = None
        self.offset_j = 0.0  # energy restored from a checkpoint
        self.counter_mark: tuple[float, float] | None = None  # (t, energy) where the last counter power point ended
        self.trace = DownsampledTrace(trace_points)


class EnergyMeter:
    """Cumulative energy per sensor and energy in windows.

    Args:
        history: recent points kept per sensor for window queries (a bounded window: at 10 Hz,
            4096 points cover about 7 minutes).
        trace_points: points kept per sensor in the downsampled whole-run trace.
        extrapolate_s: the longest tail past the newest reading that is extrapolated at the newest
            power (set it to the sampling interval).

    Example::

        meter = EnergyMeter()
        meter.add_channel({"name": "sim", "source": "simulated", "kind": "power"})
        meter.record("sim", Reading(0.0, 100.0, "power"))
        meter.record("sim", Reading(1.0, 100.0, "power"))
        assert meter.energy_between(0.0, 1.0) == 100.0
    """

    def __init__(self, history: int = 4096, trace_points: int = 512, extrapolate_s: float = 0.1) -> None:
        if history < 2:
            raise ValueError(f"`history` must be >= 2, got {history}")
        self.extrapolate_s = extrapolate_s
        self._history = history
        self._trace_points = trace_points
        self._channels: dict[str, _Channel] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ feeding
    def add_channel(self, info: dict) -> None:
        """Register a sensor by its :meth:`Sensor.describe` dict (needs ``name``, ``source`` and ``kind``)."""
        name = info["name"]
        if info.get("kind") not in ("energy", "power"):
            raise ValueError(f"sensor {name!r}: `kind` must be 'energy' or 'power', got {info.get('kind')!r}")
        with self._lock:
            if name in self._channels:
                raise ValueError(f"two sensors are named {name!r}: sensor names must be unique")
            self._channels[name] = _Channel(info, self._history, self._trace_points)

    def record(self, name: str, reading: Reading) -> bool:
        """Add one reading. Returns False (and counts a gap) when the reading is rejected."""
        with self._lock:
            ch = self._channels[name]
            value, t = reading.value, reading.t_s
            if reading.kind != ch.kind or not math.isfinite(value) or value < 0 or not math.isfinite(t):
                ch.n_gaps += 1
                return False
            if ch.t and t <= ch.t[-1]:
                ch.n_gaps += 1
                return False
            if not ch.t:
                ch.first_t = t
                energy, power = 0.0, (value if ch.kind == "power" else 0.0)
            else:
                dt = t - ch.t[-1]
                if ch.kind == "energy":
                    delta = value - ch.last_raw
                    if delta < 0:  # a counter going backwards: reject, keep the old base
                        ch.n_gaps += 1
                        return False
                    energy, power = ch.e[-1] + delta, delta / dt
                else:
                    energy, power = ch.e[-1] + 0.5 * (ch.p[-1] + value) * dt, value
            ch.last_raw = value
            ch.t.append(t)
            ch.e.append(energy)
            ch.p.append(power)
            ch.n_samples += 1
            if ch.kind == "power":
                ch.peak_w = max(ch.peak_w, power)
                ch.trace.add(t, power)
            elif ch.n_samples > 1:
                self._counter_power_point(ch, t, energy)
            return True

    @staticmethod
    def _counter_power_point(ch: _Channel, t: float, energy: float) -> None:
        """Peak and trace of a counter over intervals of at least MIN_COUNTER_DT_S."""
        t0, e0 = ch.counter_mark if ch.counter_mark is not None else (ch.first_t, 0.0)
        if t - t0 >= MIN_COUNTER_DT_S:
            power = (energy - e0) / (t - t0)
            ch.peak_w = max(ch.peak_w, power)
            ch.trace.add(0.5 * (t0 + t), power)
            ch.counter_mark = (t, energy)

    def mark_failed(self, name: str, reason: str) -> None:
        """Record that a sensor was dropped; its figures stop at its last good reading."""
        with self._lock:
            ch = self._channels[name]
            if ch.failed is None:
                ch.failed = reason

    # ------------------------------------------------------------------ queries
    @property
    def names(self) -> list[str]:
        return list(self._channels)

    def info(self, name: str) -> dict:
        return dict(self._channels[name].info)

    def energy_at(self, name: str, t_s: float) -> float:
        """Joules this process measured on ``name`` from its first reading to ``t_s``, plus any
        restored offset."""
        with self._lock:
            ch = self._channels[name]
            return ch.offset_j + self._energy_at(ch, t_s)

    def _energy_at(self, ch: _Channel, t: float) -> float:
        if not ch.t:
            return 0.0
        times = ch.t
        if t >= times[-1]:
            if ch.failed is not None:
                return ch.e[-1]
            # extrapolate at the newest power, at most one sampling interval
            return ch.e[-1] + ch.p[-1] * min(t - times[-1], self.extrapolate_s)
        if t <= times[0]:
            return ch.e[0]
        i = bisect.bisect_right(times, t)  # times[i-1] <= t < times[i]
        ta, tb = times[i - 1], times[i]
        ea, eb = ch.e[i - 1], ch.e[i]
        frac = (t - ta) / (tb - ta)
        if ch.kind == "energy":
            return ea + (eb - ea) * frac
        pa, pb = ch.p[i - 1], ch.p[i]
        dt = t - ta
        return ea + pa * dt + 0.5 * (pb - pa) * dt * frac

    def energy_between(self, t0_s: float, t1_s: float, names: Iterable[str] | None = None) -> float:
        """Joules spent between two monotonic timestamps, summed over ``names`` (default: all)."""
        with self._lock:
            chans = [self._channels[n] for n in (self._channels if names is None else names)]
            return sum(self._energy_at(ch, t1_s) - self._energy_at(ch, t0_s) for ch in chans)

    def total_at(self, t_s: float, names: Iterable[str] | None = None) -> float:
        """Cumulative joules (restored offsets included) over ``names`` (default: all) at ``t_s``."""
        with self._lock:
            chans = [self._channels[n] for n in (self._channels if names is None else names)]
            return sum(ch.offset_j + self._energy_at(ch, t_s) for ch in chans)

    def samples_between(self, name: str, t0_s: float, t1_s: float) -> list[tuple[float, float]]:
        """(time, watts) points of ``name`` with ``t0_s < t <= t1_s`` still in the history window."""
        with self._lock:
            ch = self._channels[name]
            start = 1 if ch.kind == "energy" else 0  # a counter's first point carries no power
            lo = max(bisect.bisect_right(ch.t, t0_s), start)
            hi = bisect.bisect_right(ch.t, t1_s)
            return [(ch.t[i], ch.p[i]) for i in range(lo, hi)]

    def oldest_time(self) -> float | None:
        """The oldest reading time still in every sensor's history window (None before any reading)."""
        with self._lock:
            times = [ch.t[0] for ch in self._channels.values() if ch.t]
            return max(times) if times else None

    def last_time(self) -> float | None:
        """The newest reading time over all sensors, or None before any reading."""
        with self._lock:
            times = [ch.t[-1] for ch in self._channels.values() if ch.t]
            return max(times) if times else None

    def stats(self, name: str) -> dict[str, Any]:
        """Summary figures of one sensor: source, energy, mean and peak power, duration, gaps."""
        with self._lock:
            ch = self._channels[name]
            duration = (ch.t[-1] - ch.first_t) if ch.t else 0.0
            measured = ch.e[-1] if ch.t else 0.0
            out = dict(ch.info)
            out.update(
                energy_j=ch.offset_j + measured,
                energy_this_run_j=measured,
                restored_j=ch.offset_j,
                mean_power_w=measured / duration if duration > 0 else 0.0,
                peak_power_w=ch.peak_w,
                duration_s=duration,
                samples=ch.n_samples,
                gaps=ch.n_gaps,
                failed=ch.failed,
                partial=ch.failed is not None or ch.n_gaps > 0,
            )
            return out

    def trace(self, name: str) -> list[tuple[float, float]]:
        """The downsampled (time, watts) trace of ``name`` over the whole run."""
        with self._lock:
            return self._channels[name].trace.as_list()

    # ------------------------------------------------------------------ checkpoints
    def offsets(self) -> dict[str, float]:
        with self._lock:
            return {n: ch.offset_j for n, ch in self._channels.items()}

    def set_offsets(self, energy_j: dict[str, float]) -> None:
        """Start each named sensor's cumulative energy at the given joules (a resumed run).
        Names not in the meter are ignored: the sensors of a resumed run may differ."""
        with self._lock:
            for name, joules in energy_j.items():
                if name in self._channels:
                    self._channels[name].offset_j = float(joules)
