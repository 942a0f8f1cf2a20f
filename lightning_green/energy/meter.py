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
* A failed read attempt after the newest reading (a rejected reading, a transient error, the drop)
  stops the tail where that attempt was made: the sensor's energy stays at what "now" gave then,
  ``last J + last W * min(t_failed - t_last, interval)``, while reads keep failing and after a drop,
  so nothing already reported is taken back; the next good reading bridges the gap as below.

Gaps, resets, failures (what the summary's partial figures come from, see :meth:`EnergyMeter.stats`):

* a rejected reading (not a :class:`Reading`, NaN, infinite, negative, a counter going backwards a
  little, time not moving forward) and a transient read error are gaps. The next good reading
  bridges the gap: by the counter difference for counters, by interpolating between the neighbouring
  powers for polled sensors. ``gaps`` counts the missed readings, ``gap_s`` the seconds bridged.
* a counter that falls below ``RESET_FRACTION`` of its value was reset (driver reload, RAPL reset):
  a new base starts at the new reading; the interval across the reset is bridged at the counter's
  power just before it. Energy before and after is kept; ``resets`` counts them.
* a failed sensor (dropped by the sampler, or hung) keeps its energy up to its last good reading plus
  the tail it had at its first failed attempt: at most one interval extrapolated at its last good power.

Memory is flat: each sensor keeps a bounded window of recent points and a downsampled trace.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterable, Mapping
from typing import Any

from lightning_green.checks import check_int, check_number
from lightning_green.energy.channel import MIN_COUNTER_DT_S, RESET_FRACTION, Channel, DownsampledTrace, extrapolated_s

__all__ = ["MIN_COUNTER_DT_S", "RESET_FRACTION", "DownsampledTrace", "EnergyMeter"]


class EnergyMeter:
    """Cumulative energy per sensor and energy in windows.

    Args:
        history: recent points kept per sensor for window queries (a bounded window: at 10 Hz,
            4096 points cover about 7 minutes); an int >= 2.
        trace_points: points kept per sensor in the downsampled whole-run trace; an int >= 2.
        extrapolate_s: the longest tail past the newest reading that is extrapolated at the newest
            power (set it to the sampling interval); seconds >= 0.

    Raises:
        ValueError: a bad argument (named in the message).

    Example::

        meter = EnergyMeter()
        meter.add_channel({"name": "sim", "source": "simulated", "kind": "power"})
        meter.record("sim", Reading(0.0, 100.0, "power"))
        meter.record("sim", Reading(1.0, 100.0, "power"))
        assert meter.energy_between(0.0, 1.0) == 100.0
    """

    def __init__(self, history: int = 4096, trace_points: int = 512, extrapolate_s: float = 0.1) -> None:
        self._history = check_int("history", history, 2)
        self._trace_points = check_int("trace_points", trace_points, 2)
        self.extrapolate_s = check_number("extrapolate_s", extrapolate_s, 0.0)
        self._channels: dict[str, Channel] = {}
        self._lock = threading.Lock()
        # name -> (newest reading time, cumulative J there with the offset, W there, time the extrapolation
        # stops: Channel.stop_t): replaced whole under the lock at each change, read without it for
        # "energy now" (a dropped sensor stops where it failed)
        self._newest: dict[str, tuple[float, float, float, float]] = {}

    # ------------------------------------------------------------------ feeding
    def add_channel(self, info: dict) -> None:
        """Register a sensor by its :meth:`Sensor.describe` dict (needs ``name``, ``source`` and ``kind``)."""
        name = info["name"]
        if info.get("kind") not in ("energy", "power"):
            raise ValueError(f"sensor {name!r}: `kind` must be 'energy' or 'power', got {info.get('kind')!r}")
        with self._lock:
            if name in self._channels:
                raise ValueError(f"two sensors are named {name!r}: sensor names must be unique")
            self._channels[name] = Channel(info, self._history, self._trace_points)

    def submit(self, name: str, reading: Any, t_s: float | None = None) -> str | None:
        """Add one reading of ``name``. Returns None when it was used, else why it was rejected
        (counted as a gap). Never raises: anything that is not a valid :class:`Reading` (None, a
        float, NaN, a counter going backwards, time not moving forward) is a rejected reading.
        Readings of a sensor marked failed are ignored.

        ``t_s``: when the read was made, on the readings' clock (default: the reading's own time, if it
        has one). The first rejected reading after a good one stops the extrapolation there."""
        with self._lock:
            ch = self._channels.get(name)
            if ch is None:
                return f"no sensor named {name!r} in this meter"
            if ch.failed is not None:
                return f"sensor {name!r} was dropped ({ch.failed})"
            why = ch.add(reading, t_s)
            self._note_newest(name, ch)
            return why

    def _note_newest(self, name: str, ch: Channel) -> None:
        if ch.t:
            self._newest[name] = (ch.t[-1], ch.offset_j + ch.e[-1], ch.p[-1], ch.stop_t)

    def record(self, name: str, reading: Any) -> bool:
        """Add one reading. Returns False (and counts a gap) when the reading is rejected; never raises."""
        return self.submit(name, reading) is None

    def note_transient(self, name: str, reason: str, t_s: float | None = None) -> None:
        """A read of ``name`` failed for a reason that may pass: a gap, bridged by the next reading.
        ``t_s``: when the read failed, on the readings' clock; the first failure after a good reading
        stops the extrapolation there (None: at the newest reading)."""
        with self._lock:
            ch = self._channels[name]
            ch.problem(reason, transient=True, t_s=t_s)
            self._note_newest(name, ch)

    def mark_failed(self, name: str, reason: str, hung: bool = False, t_s: float | None = None) -> None:
        """Record that a sensor was dropped (``hung``: its read never returned) at ``t_s`` (on the
        readings' clock). Its energy stays where the extrapolation stopped: at the first failed attempt
        after its last good reading, or else at ``t_s`` (None: at its last good reading); so it holds
        at most one interval extrapolated at its last good power."""
        with self._lock:
            ch = self._channels[name]
            if ch.failed is None:
                ch.failed = reason
                ch.stop_extrapolation(t_s)
            self._note_newest(name, ch)
            ch.hung = ch.hung or hung

    def mark_abandoned(self, name: str) -> None:
        """Record that the reader of ``name`` was left blocked in ``read()`` when sampling stopped."""
        with self._lock:
            self._channels[name].abandoned = True

    # ------------------------------------------------------------------ queries
    @property
    def names(self) -> list[str]:
        return list(self._channels)

    def info(self, name: str) -> dict:
        return dict(self._channels[name].info)

    def newest(self) -> dict[str, tuple[float, float, float, float]]:
        """Each sensor's newest reading, copied without the lock: ``{name: (time, cumulative J there with
        the offset, W there, time the extrapolation stops)}``. Pass it to :meth:`energy_at` to get, later
        and on any thread, the figures "now" had when it was taken (a sensor without a reading yet is
        not in it)."""
        # one C call under the GIL: a consistent copy
        return dict(self._newest)

    def energy_at(
        self, name: str, t_s: float, readings: Mapping[str, tuple[float, float, float, float]] | None = None
    ) -> float:
        """Joules this process measured on ``name`` from its first reading to ``t_s``, plus its offset
        (the energy carried in: earlier stages, a checkpoint); ``readings``: a :meth:`newest` copy to
        answer from, for ``t_s`` at or after its reading."""
        newest = (self._newest if readings is None else readings).get(name)
        # now or later: no lock, no history
        if newest is not None and t_s >= newest[0]:
            t, joules, watts, stop_t = newest
            return joules + watts * extrapolated_s(t_s, t, stop_t, self.extrapolate_s)
        with self._lock:
            ch = self._channels[name]
            return ch.offset_j + self._energy_at(ch, t_s)

    def _energy_at(self, ch: Channel, t: float) -> float:
        if not ch.t:
            return 0.0
        times = ch.t
        if t >= times[-1]:
            # extrapolate at the newest power, at most one sampling interval, not past a failed attempt
            return ch.e[-1] + ch.p[-1] * ch.tail(t, self.extrapolate_s)
        if t <= times[0]:
            return ch.e[0]
        # times[i-1] <= t < times[i]
        i = bisect.bisect_right(times, t)
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
        """Cumulative joules (offsets included) over ``names`` (default: all) at ``t_s``."""
        if names is None:
            return sum(self.energy_at(n, t_s) for n in list(self._channels))
        with self._lock:
            chans = [self._channels[n] for n in (self._channels if names is None else names)]
            return sum(ch.offset_j + self._energy_at(ch, t_s) for ch in chans)

    def samples_between(self, name: str, t0_s: float, t1_s: float) -> list[tuple[float, float]]:
        """(time, watts) points of ``name`` with ``t0_s < t <= t1_s`` still in the history window."""
        with self._lock:
            ch = self._channels[name]
            # a counter's first point carries no power
            start = 1 if ch.kind == "energy" else 0
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
        """Summary figures of one sensor: its :meth:`Sensor.describe` facts and

        * ``energy_j`` (the offset included), ``energy_this_run_j``, ``offset_j`` (the energy carried in
          by :meth:`set_offsets`: earlier stages, a checkpoint), ``mean_power_w``,
          ``peak_power_w``, ``duration_s``, ``samples``; the energy and duration run to the last good
          reading, plus, for a sensor whose reads failed since (or that was dropped), the tail that
          :meth:`energy_at` keeps (at most one interval extrapolated at its last good power);
        * ``gaps``: readings missed (``rejected`` + ``transient_errors``), bridged over ``gap_s``
          seconds by ``gap_bridge`` (``"counter difference"`` or ``"interpolated power"``);
        * ``rejected``: readings that were not usable; ``transient_errors``: reads retried;
          ``resets``: counter resets (a new base); ``last_problem``: the newest reason of those;
        * ``failed``: why the sensor was dropped (None while it works); ``hung``: its read never
          returned; ``abandoned``: its reader thread was left blocked when sampling stopped;
        * ``partial``: any of the above happened, so the figures are not a complete measurement.
        """
        with self._lock:
            ch = self._channels[name]
            # a failing or dropped sensor keeps the tail it had at its first failed attempt (what energy_at gives)
            tail_s = ch.tail(ch.fail_t, self.extrapolate_s) if ch.t and ch.fail_t is not None else 0.0
            duration = (ch.t[-1] + tail_s - ch.first_t) if ch.t else 0.0
            measured = (ch.e[-1] + ch.p[-1] * tail_s) if ch.t else 0.0
            gaps = ch.n_rejected + ch.n_transient
            out = dict(ch.info)
            out.update(
                energy_j=ch.offset_j + measured,
                energy_this_run_j=measured,
                offset_j=ch.offset_j,
                mean_power_w=measured / duration if duration > 0 else 0.0,
                peak_power_w=ch.peak_w,
                duration_s=duration,
                samples=ch.n_samples,
                gaps=gaps,
                rejected=ch.n_rejected,
                transient_errors=ch.n_transient,
                gap_s=ch.gap_s,
                gap_bridge="counter difference" if ch.kind == "energy" else "interpolated power",
                resets=ch.n_resets,
                last_problem=ch.last_problem,
                failed=ch.failed,
                hung=ch.hung,
                abandoned=ch.abandoned,
                partial=ch.failed is not None or gaps > 0 or ch.n_resets > 0,
            )
            return out

    def trace(self, name: str) -> list[tuple[float, float]]:
        """The downsampled (time, watts) trace of ``name`` over the whole run."""
        with self._lock:
            return self._channels[name].trace.as_list()

    # ------------------------------------------------------------------ checkpoints
    def set_offsets(self, energy_j: dict[str, float]) -> None:
        """Start each named sensor's cumulative energy at the given joules (carried from earlier stages
        or restored from a checkpoint).
        Names not in the meter are ignored: the sensors of a resumed run may differ."""
        with self._lock:
            for name, joules in energy_j.items():
                if name in self._channels:
                    self._channels[name].offset_j = float(joules)
                    self._note_newest(name, self._channels[name])
