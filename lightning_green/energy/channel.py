"""One sensor's readings in the meter: validation, integration, gaps and resets (the rules are
described in :mod:`lightning_green.energy.meter`), and the bounded power trace."""

from __future__ import annotations

import math
from collections import deque
from typing import Any

from lightning_green.checks import check_int, is_finite_number
from lightning_green.sensors.base import Reading

#: A counter's power (difference / time) is only trusted for peaks and traces over at least this
#: long: NVML's energy counter updates about every 100 ms, so a shorter interval can hold a whole
#: update (a false spike) or none (a false zero). Energy itself is exact either way.
MIN_COUNTER_DT_S = 0.1
#: A counter reading below this fraction of the previous one is a reset (a new base); a smaller fall
#: is a rejected reading. A wrap of a RAPL counter is unwrapped by the sensor itself.
RESET_FRACTION = 0.5


class DownsampledTrace:
    """A power trace of bounded size: when it holds more than ``max_points`` points, neighbouring
    points are merged in pairs (weighted by the samples each holds) and later samples are averaged
    in buckets twice as wide. Each point is the mean time and mean power of the samples it holds.

    Args:
        max_points: the most points kept (>= 2).
    """

    def __init__(self, max_points: int = 512) -> None:
        self.max_points = check_int("max_points", max_points, 2)
        # (mean t, mean power, samples)
        self._points: list[tuple[float, float, int]] = []
        self._stride = 1
        # running sums of the bucket being filled: (sum t, sum power, samples)
        self._pending = (0.0, 0.0, 0)

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


def extrapolated_s(t: float, newest_t: float, stop_t: float, limit_s: float) -> float:
    """Seconds past the newest reading (at ``newest_t``) extrapolated at its power for a query at ``t``:
    at most ``limit_s`` (one sampling interval), and never past ``stop_t`` (a failed read attempt)."""
    return max(0.0, min(min(t, stop_t) - newest_t, limit_s))


class Channel:
    """State of one sensor in the meter, and the rule that turns its readings into energy."""

    def __init__(self, info: dict, history: int, trace_points: int) -> None:
        self.info = dict(info)
        self.kind = info["kind"]
        self.t: deque[float] = deque(maxlen=history)
        # cumulative joules at t (this process)
        self.e: deque[float] = deque(maxlen=history)
        # watts at t (for counters: mean over the interval ending at t)
        self.p: deque[float] = deque(maxlen=history)
        self.last_raw: float | None = None
        self.first_t: float | None = None
        self.n_samples = 0
        self.n_rejected = 0
        self.n_transient = 0
        self.n_resets = 0
        self.gap_s = 0.0
        # a reading was missed since the newest good one
        self.gap_open = False
        # time of the first failed read attempt after the newest good reading (None: none failed): the
        # extrapolation past the newest reading stops there, so what "now" gave is never taken back
        self.fail_t: float | None = None
        self.peak_w = 0.0
        self.failed: str | None = None
        self.hung = False
        self.abandoned = False
        self.last_problem: str | None = None
        # energy carried in: earlier stages of the process, a checkpoint
        self.offset_j = 0.0
        # (t, energy) where the last counter power point ended
        self.counter_mark: tuple[float, float] | None = None
        self.trace = DownsampledTrace(trace_points)

    def problem(self, reason: str, transient: bool, t_s: float | None = None) -> None:
        """A read gave no usable reading: count it; the next good reading closes the gap. ``t_s``: when
        the attempt failed (see :meth:`stop_extrapolation`)."""
        if transient:
            self.n_transient += 1
        else:
            self.n_rejected += 1
        self.last_problem = reason
        self.gap_open = bool(self.t)
        self.stop_extrapolation(t_s)

    def stop_extrapolation(self, t_s: float | None) -> None:
        """A read attempt at ``t_s`` failed: the tail extrapolated past the newest reading stops there
        (the first failed attempt counts; None or a time before the newest reading: no tail)."""
        if self.t and self.fail_t is None:
            newest = self.t[-1]
            ok = is_finite_number(t_s) and t_s > newest
            self.fail_t = float(t_s) if ok else newest

    @property
    def stop_t(self) -> float:
        """Where extrapolation past the newest reading stops: the first failed attempt since, else inf."""
        return math.inf if self.fail_t is None else self.fail_t

    def tail(self, t: float, extrapolate_s: float) -> float:
        """Seconds past the newest reading that are extrapolated at the newest power for a query at
        ``t`` (see :func:`extrapolated_s`)."""
        return extrapolated_s(t, self.t[-1], self.stop_t, extrapolate_s)

    def check(self, reading: Any) -> str | None:
        """Why ``reading`` cannot be used, or None."""
        if not isinstance(reading, Reading):
            return f"read() returned {reading!r} ({type(reading).__name__}), not a Reading"
        value, t = reading.value, reading.t_s
        if reading.kind != self.kind:
            return f"a {reading.kind!r} reading from a {self.kind!r} sensor"
        if not is_finite_number(value) or value < 0:
            return f"value {value!r} is not a finite number >= 0"
        if not is_finite_number(t):
            return f"timestamp {t!r} is not a finite number"
        if self.t and t <= self.t[-1]:
            return f"time did not move forward ({t!r} after {self.t[-1]!r})"
        return None

    def add(self, reading: Any, t_s: float | None = None) -> str | None:
        """Add one reading; return why it was rejected (counted as a gap), or None. ``t_s``: when the
        read was made (for a rejected reading; default: the reading's own time, if it has one)."""
        why = self.check(reading)
        if (
            why is None
            and self.t
            and self.kind == "energy"
            and RESET_FRACTION * self.last_raw <= reading.value < self.last_raw
        ):
            why = f"counter went backwards from {self.last_raw!r} to {reading.value!r} J"
        if why is not None:
            if t_s is None and isinstance(reading, Reading):
                t_s = reading.t_s
            self.problem(why, transient=False, t_s=t_s)
            return why
        value, t = float(reading.value), float(reading.t_s)
        if not self.t:
            self.first_t = t
            energy, power = 0.0, (value if self.kind == "power" else 0.0)
        else:
            dt = t - self.t[-1]
            if self.kind == "power":
                energy, power = self.e[-1] + 0.5 * (self.p[-1] + value) * dt, value
            else:
                delta = value - self.last_raw
                # fell below RESET_FRACTION of its value: a reset, bridged at the power before it
                if delta < 0:
                    self.n_resets += 1
                    self.last_problem = f"counter reset from {self.last_raw!r} to {value!r} J"
                    delta = self.recent_power() * dt
                    self.gap_open = True
                energy, power = self.e[-1] + delta, delta / dt
            if self.gap_open:
                self.gap_s += dt
                self.gap_open = False
        # a good reading: the gap is bridged, extrapolation goes on from here
        self.fail_t = None
        self.last_raw = value
        self.t.append(t)
        self.e.append(energy)
        self.p.append(power)
        self.n_samples += 1
        if self.kind == "power":
            self.peak_w = max(self.peak_w, power)
            self.trace.add(t, power)
        elif self.n_samples > 1:
            self.counter_power_point(t, energy)
        return None

    def recent_power(self) -> float:
        """A counter's mean power over its newest interval of at least MIN_COUNTER_DT_S (or all it has)."""
        t, e = self.t, self.e
        i = len(t) - 1
        while i > 0 and t[-1] - t[i] < MIN_COUNTER_DT_S:
            i -= 1
        return (e[-1] - e[i]) / (t[-1] - t[i]) if t[-1] > t[i] else 0.0

    def counter_power_point(self, t: float, energy: float) -> None:
        """Peak and trace of a counter over intervals of at least MIN_COUNTER_DT_S."""
        t0, e0 = self.counter_mark if self.counter_mark is not None else (self.first_t, 0.0)
        if t - t0 >= MIN_COUNTER_DT_S:
            power = (energy - e0) / (t - t0)
            self.peak_w = max(self.peak_w, power)
            self.trace.add(0.5 * (t0 + t), power)
            self.counter_mark = (t, energy)
