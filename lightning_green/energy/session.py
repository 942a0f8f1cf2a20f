"""EnergySession: the meter-facing API of one process's measurement, and the logging window over it.

A session owns the sampler thread and the meter of one stage (``start`` … ``finish``), carries each
sensor's energy from one stage to the next and from a checkpoint, and answers the questions the
callbacks ask: energy now, energy of a block (:meth:`EnergySession.measure`), sources, state.
Of the energy carried in, it keeps apart the part restored from a checkpoint
(:meth:`EnergySession.restored_j`): the rest was measured by this process in earlier stages.

:class:`LogWindow` turns a session into the figures of one logging window (energy, power per
sensor, energy per step without the validation loops in it, trace points). Both know no Trainer:
collectives are passed in as a function, time as a clock.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lightning_green.energy.meter import MIN_COUNTER_DT_S, EnergyMeter
from lightning_green.energy.sampler import Sampler
from lightning_green.resume import ALL, OWN, continued_part
from lightning_green.sensors.base import Sensor

log = logging.getLogger("lightning_green")

Clock = Callable[[], float]
Reduce = Callable[[Sequence[float]], list]

#: Key of the restored energy no sensor of this run can hold, in a checkpoint's per-process state.
UNATTRIBUTED_KEY = "__unattributed__"


@dataclass
class Measurement:
    """Energy of a block run under :meth:`EnergySession.measure` (filled when the block exits)."""

    energy_j: float = float("nan")
    duration_s: float = float("nan")
    sources: list[str] = field(default_factory=list)
    #: False when an energy counter took part and the block was shorter than its ~100 ms update
    #: period: the figure may then be 0 J or a whole update too much.
    resolved: bool = True

    @property
    def power_w(self) -> float:
        return self.energy_j / self.duration_s if self.duration_s > 0 else float("nan")


class EnergySession:
    """One process's sensors, read off the training thread, from :meth:`start` to :meth:`finish`.

    Args:
        interval_s: seconds between readings.
        history: recent readings kept per sensor for window queries.
        clock: the monotonic clock the sensors' readings are on (injected by tests).

    Example::

        session = EnergySession(interval_s=0.1)
        session.start([SimulatedSensor(100.0)])
        with session.measure() as m:
            work()
        session.finish()
    """

    def __init__(self, interval_s: float = 0.1, history: int = 4096, clock: Clock = time.monotonic) -> None:
        self.interval_s = interval_s
        self.history = history
        self.clock = clock
        self.meter: EnergyMeter | None = None
        self.sensors: list[Sensor] = []
        # built for this session: closed by finish()
        self._owned: list[Sensor] = []
        self._sampler: Sampler | None = None
        # per sensor, from earlier stages and checkpoints
        self._carry_j: dict[str, float] = {}
        # per sensor, the part of _carry_j a checkpoint restored
        self._restored_j: dict[str, float] = {}
        # restored energy no sensor of this run can hold
        self.unattributed_j = 0.0
        # a checkpoint loaded before this process's rank is known
        self._pending_state: dict | None = None
        self._uid = uuid.uuid4().hex

    @property
    def origin(self) -> str:
        """This session in this process (a copy in a spawned process has another), as written in the
        checkpoints it saves: loading its own, it has already counted that energy."""
        return f"{self._uid}-{os.getpid()}"

    @property
    def started(self) -> bool:
        return self._sampler is not None

    # ------------------------------------------------------------------ lifecycle
    def start(self, sensors: Sequence[Sensor], owned: Sequence[Sensor] = ()) -> None:
        """A new meter over ``sensors``; each sensor's energy goes on from what was carried. The
        ``owned`` ones were built for this session and are closed by :meth:`finish`."""
        self.sensors = list(sensors)
        self._owned = list(owned)
        self.meter = EnergyMeter(history=self.history, extrapolate_s=self.interval_s)
        self._sampler = Sampler(self.sensors, self.meter, self.interval_s, clock=self.clock)
        self._sampler.start()
        self.meter.set_offsets(self._carry_j)

    def finish(self) -> bool:
        """Stop the sampler after a last reading and close the owned sensors. Returns False when it
        was not running."""
        sampler = self._sampler
        self._sampler = None
        if sampler is None:
            return False
        try:
            sampler.stop(final_reading=True)
        finally:
            # up to the last reading
            self._carry_j = {n: self.meter.stats(n)["energy_j"] for n in self.meter.names}
            owned = self._owned
            self._owned = []
            for sensor in owned:
                try:
                    sensor.close()
                except Exception as err:  # noqa: BLE001 - closing must not hide the run's own outcome
                    log.warning("lightning_green: closing sensor %r failed, ignored: %r", sensor.name, err)
        return True

    def read_now(self) -> None:
        """Read every sensor once more now (not on the hot path: checkpoints, ``measure``)."""
        if self._sampler is not None:
            self._sampler.sample_once(timeout_s=max(1.0, 10 * self.interval_s))

    # ------------------------------------------------------------------ energy
    def energy_now_j(self) -> float:
        """Cumulative joules of every sensor of this process (restored energy included)."""
        return self.energy_at_j(self.clock())

    def measured_now_j(self) -> float:
        """:meth:`energy_now_j` less what was carried in (earlier stages, a checkpoint): the joules this
        process's sensors measured in the running stage. A checkpoint restored mid-stage (FSDP and
        DeepSpeed restore after ``on_fit_start``) leaves it unchanged, so differences of it are safe."""
        if self.meter is None:
            return 0.0
        names = set(self.meter.names)
        return self.meter.total_at(self.clock()) - sum(j for n, j in self._carry_j.items() if n in names)

    def energy_at_j(self, t_s: float) -> float:
        """:meth:`energy_now_j` at ``t_s`` (several figures at one instant)."""
        if self.meter is None:
            return self.unattributed_j + sum(self._carry_j.values())
        return self.unattributed_j + self.meter.total_at(t_s)

    def by_sensor_j(self, t_s: float, readings: Mapping[str, tuple] | None = None) -> dict[str, float]:
        """Cumulative joules of each sensor at ``t_s`` (``readings``: answered from :meth:`newest_readings`
        taken at ``t_s``)."""
        meter = self.meter
        return {n: meter.energy_at(n, t_s, readings) for n in meter.names} if meter is not None else {}

    def newest_readings(self) -> dict[str, tuple]:
        """Each sensor's newest reading (:meth:`EnergyMeter.newest`): with the time it was taken, what
        :meth:`by_sensor_j` needs to give that moment's figures later, on another thread."""
        return self.meter.newest() if self.meter is not None else {}

    def device_energy_j(self, t_s: float) -> float:
        """Joules of this process's own devices (not the host-level sensors one rank per node reads)."""
        meter = self.meter
        return (
            sum(meter.energy_at(n, t_s) for n in meter.names if not meter.info(n).get("host_level")) if meter else 0.0
        )

    @contextlib.contextmanager
    def measure(self) -> Iterator[Measurement]:
        """Measure the energy of a block on this process's sensors.

        The sensors are read once more as the block exits, so the figure covers the block exactly
        (an NVML counter updates about every 100 ms: blocks shorter than that are not resolved).

        Raises:
            RuntimeError: the session is not running (outside fit/validate/test/predict).
        """
        if self._sampler is None or self.meter is None:
            raise RuntimeError(
                "PowerSampler.measure() needs a running sampler: call it inside fit/validate/test/predict"
            )
        m = Measurement()
        meter, sampler = self.meter, self._sampler
        t0 = self.clock()
        # in case the block outlasts the meter's history window
        start_j = meter.total_at(t0)
        yield m
        t1 = self.clock()
        sampler.sample_once(timeout_s=max(1.0, 10 * self.interval_s))
        oldest = meter.oldest_time()
        m.energy_j = (
            meter.energy_between(t0, t1) if oldest is not None and oldest <= t0 else meter.total_at(t1) - start_j
        )
        m.duration_s = t1 - t0
        # every sensor's source, a sensor dropped inside the block too: its energy is in the figure
        m.sources = sorted({meter.info(n)["source"] for n in meter.names})
        m.resolved = not (
            m.duration_s < MIN_COUNTER_DT_S and any(meter.info(n)["kind"] == "energy" for n in sampler.active_names)
        )

    def sources(self) -> str:
        """The sources of this process's sensors, joined with ``+`` (``"none"`` before any)."""
        meter = self.meter
        return (
            "+".join(sorted({meter.info(n)["source"] for n in meter.names}))
            if meter is not None and meter.names
            else "none"
        )

    def names_in_domain(self, domain: str) -> list[str]:
        meter = self.meter
        return [n for n in meter.names if meter.info(n).get("domain") == domain] if meter is not None else []

    # ------------------------------------------------------------------ checkpoint state
    def local_state(self) -> dict[str, float]:
        """Cumulative joules per sensor now, and the unattributed rest: this process's checkpoint part."""
        local = dict(self._carry_j)
        local.update(self.by_sensor_j(self.clock()))
        local[UNATTRIBUTED_KEY] = self.unattributed_j
        return local

    def restored_j(self) -> dict[str, float]:
        """Per sensor, the joules of its cumulative energy restored from a checkpoint (by this stage or
        an earlier one of this process); the rest of what was carried in, the sensor's cumulative less
        this stage's and these, this process measured in earlier stages. ``unattributed_j`` is
        restored energy too."""
        return dict(self._restored_j)

    def restore(self, mine: dict[str, float] | None, total_j: float = 0.0) -> None:
        """Go on from a checkpoint: ``mine`` is this process's saved state (same world size), else
        ``total_j`` is carried as unattributed energy (rank 0 of another world size; 0 elsewhere).
        The checkpoint's energy replaces what earlier stages carried (it is all restored energy)."""
        self._carry_j = {}
        self.unattributed_j = 0.0
        names = set(self.meter.names) if self.meter is not None else set()
        if mine is not None:
            mine = dict(mine)
            self.unattributed_j = float(mine.pop(UNATTRIBUTED_KEY, 0.0))
            self._carry_j = {n: j for n, j in mine.items() if n in names}
            self.unattributed_j += sum(j for n, j in mine.items() if n not in names)
        else:
            self.unattributed_j = float(total_j)
        self._restored_j = dict(self._carry_j)
        if self.meter is not None:
            self.meter.set_offsets(self._carry_j)

    def load_checkpoint(self, state: Mapping[str, Any]) -> None:
        """Keep a PowerSampler checkpoint until :meth:`restore_checkpoint` knows this process's rank."""
        self._pending_state = dict(state)

    def restore_checkpoint(self, world_size: int, rank: int) -> None:
        """Go on from the checkpoint loaded (nothing without one, or one this process saved): the same
        world size restores this rank's part per sensor; another world size puts the total on rank 0,
        unattributed."""
        state = self._pending_state
        self._pending_state = None
        if state is None:
            return
        per_rank = state.get("per_rank_energy_j") or []
        origins = state.get("origins") or []
        part = continued_part(len(per_rank), world_size, rank)
        if part == OWN and len(origins) == world_size and origins[rank] == self.origin:
            # this process saved it: its energy is in what this process carries (nothing measured since
            # is lost)
            return
        if part == OWN:
            self.restore(per_rank[rank])
        else:
            self.restore(None, total_j=float(state.get("total_j", 0.0)) if part == ALL else 0.0)


#: What a logging window's figures need from the training thread, taken at its log step
#: (:meth:`LogWindow.end`): ``(t, readings, steps, val_j)``, the session clock at the end, each sensor's
#: newest reading then (:meth:`EnergySession.newest_readings`), the optimizer steps in the window and
#: this process's joules of the validation loops inside it. A plain tuple: made on every log step.
WindowEnd = tuple[float, dict, int, float]


class LogWindow:
    """The figures of one logging window of a training loop, over an :class:`EnergySession`.

    Per validation loop inside fit it notes the energy spent, which is not step energy (the steps are
    counted by the caller's :class:`~lightning_green.log_queue.LogCadence`). A log step ends the window
    on the training thread (:meth:`end`: a clock read and a copy of the sensors' newest readings), and
    :meth:`close` builds the metrics from that end with one collective (``reduce``, the element-wise
    sum over processes), on the training thread or, for a single process, on a log thread: ``close``
    reads only the end and the figures of the last close.
    """

    def __init__(self, session: EnergySession) -> None:
        self.session = session
        # mean power of every process over the last closed window
        self.power_w = float("nan")
        # this process's cumulative joules at the last close (or reset)
        self.local_j = 0.0
        self._t = 0.0
        self._by_sensor: dict[str, float] = {}
        # sensor name -> its metric keys, made once
        self._keys: dict[str, tuple[str, str]] = {}
        self._val_j = 0.0
        self._val_start_j = 0.0
        # validation inside this epoch: not training energy
        self._epoch_val_j = 0.0
        self.trace_t = 0.0
        self.epoch_start_j = 0.0

    def reset(self) -> None:
        now = self.session.clock()
        self._t = self.trace_t = now
        self._by_sensor = self.session.by_sensor_j(now)
        self.local_j = self.epoch_start_j = self.session.energy_now_j()
        self._val_j = self._val_start_j = self._epoch_val_j = 0.0

    def validation_started(self) -> None:
        self._val_start_j = self.session.energy_now_j()

    def validation_ended(self) -> None:
        val_j = self.session.energy_now_j() - self._val_start_j
        self._val_j += val_j
        self._epoch_val_j += val_j

    def end(self, steps: int) -> WindowEnd:
        """The window of ``steps`` optimizer steps ends now (training thread); the next one starts."""
        end = (self.session.clock(), self.session.newest_readings(), steps, self._val_j)
        self._val_j = 0.0
        return end

    def close(self, reduce: Reduce, end: WindowEnd) -> dict[str, float]:
        """The metrics of the window that ``end`` ended: ``energy/total_j``, ``energy/step_j``,
        ``energy/<s>_j`` and ``power/<s>_w``."""
        now, readings, steps, val_j = end
        by_sensor = self.session.by_sensor_j(now, readings)
        local_j = self.session.unattributed_j + sum(by_sensor.values())
        total_j, window_j, all_j = reduce([local_j, local_j - self.local_j - val_j, local_j - self.local_j])
        dt = now - self._t
        self.power_w = all_j / dt if dt > 0 else float("nan")
        metrics: dict[str, float] = {"energy/total_j": total_j}
        if steps:
            metrics["energy/step_j"] = window_j / steps
        for name, joules in by_sensor.items():
            energy_key, power_key = self._keys.get(name) or self._keys.setdefault(
                name, (f"energy/{name}_j", f"power/{name}_w")
            )
            metrics[energy_key] = joules
            if dt > 0:
                metrics[power_key] = (joules - self._by_sensor.get(name, joules)) / dt
        self._t = now
        self._by_sensor = by_sensor
        self.local_j = local_j
        return metrics

    def epoch_energy_j(self) -> float:
        """This process's training energy since :meth:`reset` or the last :meth:`start_epoch`, less the
        validation loops run inside the epoch (Lightning runs them before ``on_train_epoch_end``)."""
        return self.session.energy_now_j() - self.epoch_start_j - self._epoch_val_j

    def start_epoch(self) -> None:
        self.epoch_start_j = self.session.energy_now_j()
        self._epoch_val_j = 0.0

    def trace_points(self, max_points: int) -> dict[str, list[tuple[float, float]]]:
        """Each sensor's (time, watts) readings since the last call, at most ``max_points`` (an even
        spread that always keeps the newest)."""
        meter = self.session.meter
        t_end = meter.last_time() or self.session.clock()
        out = {}
        for name in meter.names:
            points = meter.samples_between(name, self.trace_t, t_end)
            if len(points) > max_points:
                stride = len(points) / max_points
                points = [points[min(len(points) - 1, int((i + 1) * stride) - 1)] for i in range(max_points)]
            out[name] = points
        self.trace_t = t_end
        return out
