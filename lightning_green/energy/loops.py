"""The loops of a stage over an :class:`~lightning_green.energy.session.EnergySession`, Trainer-free.

* :class:`TrainingLog`: a training loop's logging window, cadence, phases and trace points;
* :class:`TraceLog`: ``power_trace`` points waiting to be written, in batches;
* :class:`LoopTimeline`: which loop ran when, for the summary and its picture.

The callbacks connect them to Trainer hooks; collectives come in as a function, time as a clock.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from lightning_green.energy.phases import PhaseRecorder
from lightning_green.energy.session import Clock, EnergySession, LogWindow, Measurement, Reduce, WindowEnd
from lightning_green.log_queue import LogCadence, LogQueue

# write(metrics, step) to the loggers
Write = Callable[[dict, int], None]
#: ``finish(energy_j) -> metrics``: a listener's figures of a window, given this process's energy at its end
Finish = Callable[[float], Mapping[str, float]]
#: ``listener(step, reduce) -> finish``, called on the training thread at each log step
#: (see :meth:`TrainingLog.log_window`)
Listener = Callable[[int, Reduce], Finish]


class TrainingLog:
    """A training loop's energy figures: the :class:`LogWindow`, Lightning's ``log_every_n_steps``
    cadence, the optional :class:`~lightning_green.energy.phases.PhaseRecorder` and the trace points.

    Per batch :attr:`batch_end` costs two integer compares and an add (and the phase edges with
    phases on); figures are built on log steps only (:meth:`log_window`), off the training thread
    where they can be.

    Args:
        session: the measurement.
        trace_points: most trace points per sensor per logging window.
        phase_timing: ``"host"``, ``"cuda_events"`` or ``"sync"``; None without phases.
    """

    def __init__(self, session: EnergySession, trace_points: int, phase_timing: str | None = None) -> None:
        self.session = session
        self.window = LogWindow(session)
        self.cadence = LogCadence()
        self.trace = TraceLog(trace_points)
        self.phase_timing = phase_timing
        self.phases: PhaseRecorder | None = None
        # the element-wise sum over processes at log steps (one process: the values)
        self.reduce: Reduce = list
        self.world_size = 1
        self.listeners: list[Listener] = []
        # this process's joules of measure_evaluation() blocks since training started
        self.evaluation_j = 0.0
        #: every process's cumulative joules (``energy/total_j``) at the end of the last window closed: a
        #: listener's ``finish`` reads it for the cluster figure without a collective of its own (with
        #: more than one process windows close on the training thread, before the finishers run)
        self.total_j = math.nan
        # the trace work of this loop, if it keeps one
        self._collect_trace: Callable[[Write], None] | None = None
        #: the exposed all-reduce seconds since the last call (``ddp_green`` hands its counter over)
        self.comm_seconds: Callable[[], float] | None = None
        #: ``batch_end(global_step) -> bool``: a training batch ended at ``global_step``; True on a log
        #: step. Without phases the cadence's own call, one Python call per batch.
        self.batch_end: Callable[[int], bool] = (
            self.cadence.log_step if phase_timing is None else self._batch_end_with_phases
        )

    def start(
        self,
        every: int,
        global_step: int,
        device: Any = None,
        reduce: Reduce = list,
        world_size: int = 1,
        trace_origin_t: float | None = None,
    ) -> None:
        """Training starts at ``global_step``, logging every ``every`` optimizer steps; log steps sum
        over the ``world_size`` processes with ``reduce``; trace points are kept with steps in ms since
        ``trace_origin_t`` (None: no trace on this process)."""
        self.reduce = reduce
        self.world_size = world_size
        self.evaluation_j = 0.0
        self.total_j = math.nan
        self._collect_trace = None if trace_origin_t is None else functools.partial(self.collect_trace, trace_origin_t)
        self.window.reset()
        self.cadence.reset(every, global_step)
        if self.phase_timing is not None:
            self.phases = PhaseRecorder(self.phase_timing, device, self.session.clock)

    @property
    def closes_off_thread(self) -> bool:
        """Whether a window's figures may be built off the training thread: one process (no
        collective) and no phases (their recorder lives on the training thread)."""
        return self.world_size == 1 and self.phases is None

    def begin_stage(self) -> None:
        """A stage (fit, validate, …) begins: a new window, and no listener from an earlier stage."""
        self.window.reset()
        self.listeners.clear()

    def start_epoch(self) -> None:
        self.window.start_epoch()
        if self.phases is not None:
            self.phases.restart()

    def mark_edge(self, name: str) -> None:
        """Mark the phase edge ``name`` (``batch_start`` …) of the running step (phases on only)."""
        self.phases.edge(name)

    def _batch_end_with_phases(self, global_step: int) -> bool:
        self.phases.edge("batch_end")
        stepped, log_now = self.cadence.advance(global_step)
        # not a batch that only accumulates gradients
        if stepped:
            self.phases.close_step(self.session.meter, self.comm_seconds() if self.comm_seconds else 0.0)
        return log_now

    def close(self, end: WindowEnd) -> dict[str, float]:
        """The metrics (phases included) of the window that ``end`` ended, with one collective each."""
        metrics = self.window.close(self.reduce, end)
        if self.phases is not None:
            metrics.update(self.phases.metrics(self.session.meter, self.reduce, self.world_size))
        return metrics

    @contextlib.contextmanager
    def measure_evaluation(self) -> Iterator[Measurement]:
        """``session.measure()`` a block that evaluates the model outside Lightning's loops (QAT's float
        and converted figures at the end of fit): its energy is not training energy, whatever the order
        of the callbacks. It is left out of the logging window it falls in (``energy/step_j``), as a
        validation loop is, and added to :attr:`evaluation_j`. Not inside a validation loop."""
        with self.session.measure() as m:
            self.window.validation_started()
            yield m
            self.window.validation_ended()
        self.evaluation_j += m.energy_j

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener`` at each log step (once, however often it is added)."""
        if listener not in self.listeners:
            self.listeners.append(listener)

    def log_window(
        self, step: int, queue: LogQueue, log_step: bool = True, in_place: bool = False
    ) -> dict[str, float] | None:
        """End the window now (training thread) and log its metrics at ``step`` through ``queue``, with
        the listeners' on a ``log_step``, then the trace work. The figures are built on the queue's
        thread when :attr:`closes_off_thread` and not ``in_place``; else here, and returned.

        A listener is called here, ``listener(step, reduce)``, on the training thread: it notes what it
        needs (counts, the targets it settles) and returns ``finish(energy_j) -> metrics``, which gets
        this process's cumulative joules at the window's end and builds the metrics to log at ``step``;
        ``finish`` runs where the figures are built, so it reads only what the listener handed it and
        what only it writes. ``reduce(values)`` is the element-wise sum over processes."""
        finishers = [listen(step, self.reduce) for listen in self.listeners] if log_step else ()
        work = functools.partial(self._write_window, self.window.end(self.cadence.take_steps()), step, finishers)
        metrics = None
        if self.closes_off_thread and not in_place:
            queue.call(work)
        else:
            metrics = work(queue.put)
        if self._collect_trace is not None:
            queue.call(self._collect_trace)
        return metrics

    def _write_window(self, end: WindowEnd, step: int, finishers: Sequence[Finish], write: Write) -> dict[str, float]:
        metrics = self.close(end)
        self.total_j = metrics["energy/total_j"]
        # every figure first, then the writes: a write that hangs past LogQueue.stop then leaves no
        # state change behind to land in the next fit
        listened = [finish(self.window.local_j) for finish in finishers]
        for each in (metrics, *listened):
            write(each, step)
        return metrics

    def collect_trace(self, origin_t: float, write: Write) -> None:
        """Keep the window's trace points (steps in ms since ``origin_t``); ``write`` a batch when one is due."""
        self.trace.collect(self.window, origin_t)
        if self.trace.due():
            self.drain_trace(write)

    def drain_trace(self, write: Write) -> None:
        """``write(points, step_ms)`` every waiting trace point."""
        for step_ms, points in self.trace.drain():
            write(points, step_ms)

    @property
    def unlogged_steps(self) -> bool:
        """Steps since the last log step, while logging is on (the last, partial window)."""
        return bool(self.cadence.steps and self.cadence.every)

    def validation_started(self, in_fit: bool) -> None:
        """A validation loop (``in_fit``: inside fit, not the sanity check) begins: not step energy."""
        if in_fit:
            self.window.validation_started()
        if self.phases is not None:
            # a validation loop is not part of any training step
            self.phases.restart(with_edge=False)

    def validation_ended(self, in_fit: bool) -> None:
        if in_fit:
            self.window.validation_ended()
        if self.phases is not None:
            self.phases.restart()

    def end(self) -> None:
        if self.phases is not None:
            self.phases.flush(self.session.meter)

    def phase_rows(self) -> dict[str, list[dict]]:
        """The ``energy by phase`` summary table ({} without phases)."""
        phases, session = self.phases, self.session
        if phases is None or session.meter is None:
            return {}
        meter, dram = session.meter, session.names_in_domain("dram")
        dram_j = sum(meter.stats(n)["energy_this_run_j"] for n in dram) if dram else None
        return {"energy by phase": phases.rows(dram_j, dram, session.sources())}


class TraceLog:
    """``power_trace/<sensor>_w`` points waiting to be logged.

    On each log step :meth:`collect` takes the window's readings (at most ``points`` per sensor, see
    :meth:`LogWindow.trace_points`); they are written in batches (:meth:`due`, :meth:`drain`), so a log
    step costs the training thread no extra logger call. Each point keeps its own step: milliseconds
    since ``origin_t``.
    """

    def __init__(self, points: int, batch: int = 512) -> None:
        self.points = points
        self.batch = batch
        self._pending: list[tuple[int, str, float]] = []
        self._keys: dict[str, str] = {}

    def collect(self, window: LogWindow, origin_t: float) -> None:
        for name, points in window.trace_points(self.points).items():
            key = self._keys.get(name) or self._keys.setdefault(name, f"power_trace/{name}_w")
            self._pending.extend((int(round((t_s - origin_t) * 1000)), key, power_w) for t_s, power_w in points)

    def due(self) -> bool:
        """Enough points wait for a batch (memory stays bounded between stage ends)."""
        return len(self._pending) >= self.batch

    def drain(self) -> list[tuple[int, dict[str, float]]]:
        """The waiting points as ``(step_ms, {key: watts})`` in time order (one dict per step)."""
        by_step: dict[int, dict[str, float]] = {}
        for step, key, power_w in self._pending:
            by_step.setdefault(step, {})[key] = power_w
        self._pending = []
        return sorted(by_step.items())


class LoopTimeline:
    """Which loop ran when (``train``, ``validation``, ``sanity``, ``test`` …), on the trace's time axis.

    Edges are marked once per loop (never per step). Consecutive intervals of the same loop are one;
    past ``max_entries`` the shortest finished interval that is not ``train`` is given to training, so
    the record stays bounded and keeps the longest loops (and the one running).
    """

    def __init__(self, clock: Clock, max_entries: int = 200) -> None:
        self.clock = clock
        self.max_entries = max_entries
        self.origin_t = 0.0
        # [loop, start_t, end_t or None while open]
        self.rows: list[list] = []

    def reset(self, origin_t: float) -> None:
        self.origin_t = origin_t
        self.rows = []

    def begin(self, loop: str) -> None:
        now = self.clock()
        self.end(now)
        if self.rows and self.rows[-1][0] == loop:
            # the same loop goes on
            self.rows[-1][2] = None
            return
        self.rows.append([loop, now, None])
        if len(self.rows) > self.max_entries:
            self._drop_shortest()

    def end(self, now: float | None = None) -> None:
        if self.rows and self.rows[-1][2] is None:
            self.rows[-1][2] = self.clock() if now is None else now

    def _drop_shortest(self) -> None:
        closed = [i for i, r in enumerate(self.rows[:-1]) if r[0] != "train"]
        if not closed:
            del self.rows[0]
            return
        i = min(closed, key=lambda k: self.rows[k][2] - self.rows[k][1])
        self.rows[i][0] = "train"
        merged: list[list] = []
        for row in self.rows:
            if merged and merged[-1][0] == row[0]:
                merged[-1][2] = row[2]
            else:
                merged.append(row)
        self.rows = merged

    def as_rows(self) -> list[dict]:
        """``[{"loop", "start_s", "end_s"}]`` in seconds since ``origin_t`` (an open loop ends now)."""
        now = self.clock()
        return [
            {
                "loop": loop,
                "start_s": round(t0 - self.origin_t, 4),
                "end_s": round((now if t1 is None else t1) - self.origin_t, 4),
            }
            for loop, t0, t1 in self.rows
        ]
