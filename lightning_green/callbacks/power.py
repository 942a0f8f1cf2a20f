"""PowerSampler: samples power on a background thread and logs energy through ``trainer.loggers``."""

from __future__ import annotations

import contextlib
import datetime
import functools
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

from lightning_green import summary as _summary
from lightning_green.callbacks._dist import distributed, gather_objects, reduce_sum
from lightning_green.energy.meter import MIN_COUNTER_DT_S, EnergyMeter
from lightning_green.energy.phases import PHASES, PhaseAccumulator, step_intervals
from lightning_green.energy.sampler import Sampler, check_interval
from lightning_green.sensors.auto import SENSOR_NAMES, build_sensors
from lightning_green.sensors.base import Sensor
from lightning_green.sensors.rapl import DEFAULT_ROOT

log = logging.getLogger("lightning_green")

SUMMARY_STAGES = ("fit", "test")
PHASE_TIMINGS = ("host", "cuda_events", "sync")


@dataclass
class Measurement:
    """Energy of a block run under :meth:`PowerSampler.measure` (filled when the block exits)."""

    energy_j: float = float("nan")
    duration_s: float = float("nan")
    sources: list[str] = field(default_factory=list)
    #: False when an energy counter took part and the block was shorter than its ~100 ms update
    #: period: the figure may then be 0 J or a whole update too much.
    resolved: bool = True

    @property
    def power_w(self) -> float:
        return self.energy_j / self.duration_s if self.duration_s > 0 else float("nan")


def find_power_sampler(trainer: Trainer) -> "PowerSampler | None":
    """The first :class:`PowerSampler` in ``trainer.callbacks``, or None."""
    return next((cb for cb in trainer.callbacks if isinstance(cb, PowerSampler)), None)


def _check_sensors(sensors: Any) -> str | list:
    if isinstance(sensors, str):
        if sensors not in SENSOR_NAMES:
            raise ValueError(f"unknown sensor name {sensors!r} for `sensors`; allowed: {', '.join(SENSOR_NAMES)} or a list of Sensor objects")
        return sensors
    if not isinstance(sensors, (list, tuple)) or not sensors:
        raise ValueError(f"`sensors` must be one of {', '.join(SENSOR_NAMES)} or a non-empty list of Sensor objects / sensor names, got {sensors!r}")
    for item in sensors:
        if isinstance(item, str):
            if item not in SENSOR_NAMES:
                raise ValueError(f"unknown sensor name {item!r} in `sensors`; allowed: {', '.join(SENSOR_NAMES)}")
        elif not isinstance(item, Sensor):
            raise ValueError(f"`sensors` holds {item!r}, which is not a lightning_green.sensors.Sensor or a sensor name ({', '.join(SENSOR_NAMES)})")
    names = [s.name for s in sensors if isinstance(s, Sensor)]
    if len(names) != len(set(names)):
        raise ValueError(f"`sensors` holds two sensors with the same name: {names}")
    return list(sensors)


class PowerSampler(Callback):
    r"""Measure energy while Lightning trains, validates, tests or predicts.

    A background thread reads every sensor each ``interval_s``; the Trainer hooks only note
    timestamps. Energy is integrated by the meter (counters by difference, power by the trapezoid
    rule) and logged at the Trainer's logging cadence (``log_every_n_steps``). Under multi-process
    training each process measures its own GPU, machine-wide sensors (RAPL, the CPU estimate,
    ``host_level`` simulated sensors) are read by local rank 0 of each node only, and totals are
    summed across processes at log time.

    Logged metrics (through ``trainer.loggers``, step = ``trainer.global_step``):
        - ``power/<sensor>_w`` (W): mean power of this process's sensor over the logging window.
        - ``energy/<sensor>_j`` (J): cumulative energy of this process's sensor.
        - ``energy/total_j`` (J): cumulative energy of all sensors of all processes.
        - ``energy/step_j`` (J): mean energy per optimizer step over the logging window, all processes
          (validation loops in the window excluded).
        - ``energy/epoch_j`` (J): energy of the training epoch, all processes (at epoch end).
        - ``power_trace/<sensor>_w`` (W): the sampler's readings, at most ``trace_points`` per logging
          window; their step is milliseconds since the sampler first started, so TensorBoard shows a
          power-over-time curve.
        - with ``phases=True``: ``energy/phase/<phase>_j`` (J, all processes) and ``time/phase/<phase>_s``
          (s, mean over processes) over the logging window, for ``data``, ``compute``, ``optimizer``,
          ``comm`` and ``other`` (the rule is in :mod:`lightning_green.energy.phases`).

    Every figure comes from a sensor with a source (``counter``, ``polled``, ``rapl``, ``estimate``,
    ``simulated``); the summary names them. At the end of ``fit`` and ``test`` a table is printed and
    ``energy_summary_<stage>.json`` is written to ``trainer.log_dir`` (per sensor: source, energy,
    mean and peak power, duration, gaps; the totals; per-process energy and imbalance).

    Args:
        sensors: ``"auto"`` (NVML GPUs this process trains on, then RAPL, else a CPU estimate),
            ``"nvml"``, ``"rapl"``, ``"estimate"``, or a list of :class:`~lightning_green.sensors.Sensor`
            objects and such names.
        interval_s: seconds between readings.
        log_trace: log ``power_trace/<sensor>_w`` points.
        trace_points: most trace points per sensor per logging window (evenly downsampled).
        print_summary: print the summary table at the end of fit and test (rank 0).
        summary_dir: where the JSON summary goes; default ``trainer.log_dir``.
        rapl_root: the powercap sysfs root for RAPL sensors.
        history: recent readings kept per sensor for window queries (bounded memory).
        phases: attribute each training step's energy to data / compute / optimizer / comm / other.
        phase_timing: how phase edges are timed. ``"host"`` (default): ``time.monotonic()`` at the
            hooks, no synchronisation; approximate on a GPU, where kernels run after the host returns.
            ``"cuda_events"``: CUDA events recorded at the edges and resolved a few steps later without
            blocking. ``"sync"``: ``torch.cuda.synchronize()`` at every edge: exact, slower. On a CPU
            all three see the same (synchronous) work; ``"cuda_events"`` needs CUDA.

    Raises:
        ValueError: an unknown sensor name, an empty sensor list or a non-sensor in it,
            ``interval_s <= 0``, ``trace_points < 1``, an unknown ``phase_timing``; in ``setup``,
            ``phase_timing="cuda_events"`` on a Trainer that does not run on CUDA.

    Example::

        from lightning_green import PowerSampler, EfficiencyLogger
        trainer = Trainer(callbacks=[PowerSampler(interval_s=0.1), EfficiencyLogger()])
    """

    def __init__(
        self,
        sensors: str | Sequence[Sensor | str] = "auto",
        interval_s: float = 0.1,
        log_trace: bool = True,
        trace_points: int = 32,
        print_summary: bool = True,
        summary_dir: str | None = None,
        rapl_root: str = DEFAULT_ROOT,
        history: int = 4096,
        phases: bool = False,
        phase_timing: str = "host",
    ) -> None:
        super().__init__()
        self._sensor_spec = _check_sensors(sensors)
        self.interval_s = check_interval(interval_s)
        if isinstance(trace_points, bool) or not isinstance(trace_points, int) or trace_points < 1:
            raise ValueError(f"`trace_points` must be an integer >= 1, got {trace_points!r}")
        self.log_trace = log_trace
        self.trace_points = trace_points
        self.print_summary = print_summary
        self.summary_dir = summary_dir
        self.rapl_root = rapl_root
        self.history = history
        if phase_timing not in PHASE_TIMINGS:
            raise ValueError(f"unknown `phase_timing` {phase_timing!r}; allowed: {', '.join(PHASE_TIMINGS)}")
        self.phases = bool(phases)
        self.phase_timing = phase_timing
        self._phase_acc = PhaseAccumulator()
        self._edges: dict[str, list] = {}
        self._event_steps: list[tuple[dict, float]] = []  # cuda_events: steps whose events may not have run yet
        self._anchor: tuple[Any, float] | None = None
        if self.phases:
            # Phase hooks are bound per instance so that phases=False costs nothing per step.
            self.on_train_batch_start = self._phase_batch_start
            self.on_before_zero_grad = functools.partial(self._phase_edge, "zero_grad")
            self.on_before_backward = functools.partial(self._phase_edge, "backward_start")
            self.on_after_backward = functools.partial(self._phase_edge, "backward_end")
            self.on_before_optimizer_step = functools.partial(self._phase_edge, "optimizer_start")

        self.meter: EnergyMeter | None = None
        self.summary: dict | None = None  # the last summary built (every rank has its own)
        self.summary_by_stage: dict[str, dict] = {}
        self._sampler: Sampler | None = None
        self._owned: list[Sensor] = []
        self._skipped: list[str] = []
        self._told_skipped = False
        self._carry_j: dict[str, float] = {}
        self._unattributed_j = 0.0  # restored energy no sensor of this run can hold
        self._pending_state: dict | None = None
        self._sections: dict[str, list[dict]] = {}
        self._providers: list[Callable[[], dict[str, list[dict]]]] = []
        self._trainer: Trainer | None = None
        self._origin_t: float | None = None
        self._stage = ""
        self._stage_t0 = 0.0
        self._started_at = ""
        self._cluster: dict | None = None
        self._per_rank_state: list[dict] | None = None
        self._reset_windows(0.0)

    # ------------------------------------------------------------------ public helpers
    @property
    def running(self) -> bool:
        return self._sampler is not None and self._sampler.alive

    @property
    def sensors(self) -> list[Sensor]:
        return list(self._sampler.sensors) if self._sampler is not None else []

    def energy_now_j(self) -> float:
        """Cumulative joules of every sensor of this process (restored energy included)."""
        if self.meter is None:
            return self._unattributed_j + sum(self._carry_j.values())
        return self._unattributed_j + self.meter.total_at(time.monotonic())

    @contextlib.contextmanager
    def measure(self) -> Iterator[Measurement]:
        """Measure the energy of a block on this process's sensors.

        The sensors are read once more as the block exits, so the figure covers the block exactly
        (an NVML counter updates about every 100 ms: blocks shorter than that are not resolved).

        Raises:
            RuntimeError: the sampler is not running (outside fit/validate/test/predict).
        """
        if self._sampler is None or self.meter is None:
            raise RuntimeError("PowerSampler.measure() needs a running sampler: call it inside fit/validate/test/predict")
        m = Measurement()
        meter, sampler = self.meter, self._sampler
        t0 = time.monotonic()
        start_j = meter.total_at(t0)  # in case the block outlasts the meter's history window
        yield m
        t1 = time.monotonic()
        sampler.sample_once(timeout_s=max(1.0, 10 * self.interval_s))
        oldest = meter.oldest_time()
        m.energy_j = meter.energy_between(t0, t1) if oldest is not None and oldest <= t0 else meter.total_at(t1) - start_j
        m.duration_s = t1 - t0
        active = sampler.active_names
        m.sources = sorted({meter.info(n)["source"] for n in active})
        m.resolved = not (m.duration_s < MIN_COUNTER_DT_S and any(meter.info(n)["kind"] == "energy" for n in active))

    def sources(self) -> str:
        """The sources of this process's sensors, joined with ``+`` (``"none"`` before any)."""
        names = self.meter.names if self.meter is not None else []
        return "+".join(sorted({self.meter.info(n)["source"] for n in names})) or "none"

    def add_summary_section(self, title: str, rows: list[dict]) -> None:
        """Add a table (a list of dict rows) to the next summary (for other callbacks)."""
        self._sections[title] = list(rows)

    def add_summary_provider(self, provider: Callable[[], dict[str, list[dict]]]) -> None:
        """Register ``provider() -> {title: rows}``, called when the summary is built."""
        if provider not in self._providers:
            self._providers.append(provider)

    # ------------------------------------------------------------------ lifecycle
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.phases and self.phase_timing == "cuda_events" and trainer.strategy.root_device.type != "cuda":
            raise ValueError(
                f"`phase_timing='cuda_events'` needs a CUDA device, but this Trainer runs on "
                f"{trainer.strategy.root_device.type}; use phase_timing='host' or 'sync'"
            )
        self._start(trainer, stage)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._finish(trainer, stage, status="finished")

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        stage = trainer.state.fn.value if trainer.state.fn is not None else "unknown"
        self._finish(trainer, stage, status=f"interrupted ({type(exception).__name__})")

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._reset_windows(time.monotonic())
        self._every = trainer.log_every_n_steps
        self._last_step = trainer.global_step  # not -1: with accumulation the first batch is no step
        if self.phases:
            self._phase_acc = PhaseAccumulator()
            self._event_steps = []
            if self.phase_timing == "cuda_events":
                import torch

                torch.cuda.synchronize()
                anchor = torch.cuda.Event(enable_timing=True)
                anchor.record()
                anchor.synchronize()
                self._anchor = (anchor, time.monotonic())
            self.add_summary_provider(self._phase_rows)

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._epoch_local_j = self.energy_now_j()
        if self.phases:
            self._edges = {"prev_end": [self._edge_time(trainer)]}

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if self.phases:
            self._edges.setdefault("batch_end", []).append(self._edge_time(trainer))
        if step != self._last_step:  # else accumulating gradients: no optimizer step yet
            self._last_step = step
            self._steps_in_window += 1
            if self.phases:
                self._close_step(trainer)
            if self._every and step % self._every == 0:
                self._log_window(trainer)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch_j = reduce_sum(trainer, [self.energy_now_j() - self._epoch_local_j])[0]
        self._log(trainer, {"energy/epoch_j": epoch_j})

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._steps_in_window and self._every:  # the last, partial logging window
            self._log_window(trainer)
        if self.phases:  # fold what is still pending into the totals
            if self.phase_timing == "cuda_events":
                self._resolve_events(block=True)
            self._phase_acc.resolve(self.meter)
        self._gather_cluster(trainer, with_state=True)

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._val_start_j = self.energy_now_j()
        if self.phases:
            self._edges = {}  # a validation loop is not part of any training step

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == "validate":
            self._gather_cluster(trainer)
            return
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._val_in_window_j += self.energy_now_j() - self._val_start_j
        if self.phases and trainer.state.fn == "fit":
            self._edges = {"prev_end": [self._edge_time(trainer)]}

    @override
    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._gather_cluster(trainer)

    @override
    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._gather_cluster(trainer)

    # ------------------------------------------------------------------ checkpoints
    def _local_state(self) -> dict[str, float]:
        local = dict(self._carry_j)
        if self.meter is not None:
            now = time.monotonic()
            local.update({n: self.meter.energy_at(n, now) for n in self.meter.names})
        local["__unattributed__"] = self._unattributed_j
        return local

    @override
    def state_dict(self) -> dict[str, Any]:
        if self._sampler is not None:  # a checkpoint is no hot path: read the sensors now
            self._sampler.sample_once(timeout_s=max(1.0, 10 * self.interval_s))
        local = self._local_state()
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1 and not distributed(trainer) and self._per_rank_state:
            # after fit under ddp_green the group is gone: the other ranks as gathered at train end
            per_rank = list(self._per_rank_state)
            per_rank[trainer.global_rank] = local
        else:
            per_rank = gather_objects(trainer, local) if trainer is not None else [local]
        return {
            "version": 1,
            "world_size": len(per_rank),
            "per_rank_energy_j": per_rank,
            "total_j": sum(sum(r.values()) for r in per_rank),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending_state = dict(state_dict)
        if self.meter is not None and self._trainer is not None:
            self._apply_state(self._trainer)

    def _apply_state(self, trainer: Trainer) -> None:
        state, self._pending_state = self._pending_state, None
        if not state:
            return
        per_rank = state.get("per_rank_energy_j") or []
        self._carry_j, self._unattributed_j = {}, 0.0
        if len(per_rank) == trainer.world_size:
            mine = dict(per_rank[trainer.global_rank])
            self._unattributed_j = float(mine.pop("__unattributed__", 0.0))
            names = set(self.meter.names)
            self._carry_j = {n: j for n, j in mine.items() if n in names}
            self._unattributed_j += sum(j for n, j in mine.items() if n not in names)
        elif trainer.global_rank == 0:  # another world size: the total goes on, per-sensor split does not
            self._unattributed_j = float(state.get("total_j", 0.0))
        self.meter.set_offsets(self._carry_j)

    # ------------------------------------------------------------------ internals
    def _reset_windows(self, now: float) -> None:
        self._log_t = now
        self._log_by_sensor: dict[str, float] = {}
        self._log_local_j = self.energy_now_j() if self.meter is not None else 0.0
        if self.meter is not None:
            self._log_by_sensor = {n: self.meter.energy_at(n, now) for n in self.meter.names}
        self._trace_t = now
        self._steps_in_window = 0
        self._val_in_window_j = self._val_start_j = 0.0  # validation inside fit is not step energy
        self._last_step = -1
        self._every = 0
        self._epoch_local_j = self._log_local_j

    def _start(self, trainer: Trainer, stage: str) -> None:
        if self._sampler is not None:  # a previous run ended without teardown
            self._finish(trainer, self._stage, status="superseded")
        self._trainer = trainer
        self._stage = getattr(stage, "value", stage)
        host_level = trainer.local_rank == 0
        root = trainer.strategy.root_device
        gpu_indices = [root.index or 0] if root.type == "cuda" else []
        spec = [self._sensor_spec] if isinstance(self._sensor_spec, str) else self._sensor_spec
        given = [s for s in spec if isinstance(s, Sensor)]
        built, self._skipped = build_sensors([s for s in spec if isinstance(s, str)], gpu_indices, host_level, self.rapl_root)
        sensors = []
        for s in given:
            if s.host_level and not host_level:
                self._skipped.append(f"{s.name}: host-level sensors are read by local rank 0 of each node only")
            else:
                sensors.append(s)
        self._owned = built
        sensors += built
        sensors = self._drop_shared(trainer, sensors)
        if not self._told_skipped:
            self._told_skipped = True
            for reason in self._skipped:
                rank_zero_info(f"lightning_green: {reason}")
            if not sensors:
                rank_zero_info("lightning_green: no sensor could be read on this process; energy figures will be 0")
        self.meter = EnergyMeter(history=self.history, extrapolate_s=self.interval_s)
        self._sampler = Sampler(sensors, self.meter, self.interval_s)
        self._sampler.start()
        self.meter.set_offsets(self._carry_j)
        if self._pending_state is not None:
            self._apply_state(trainer)
        now = time.monotonic()
        self._origin_t = self._origin_t if self._origin_t is not None else now
        self._stage_t0 = now
        self._started_at = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        self._cluster = None
        self._sections = {}
        self._reset_windows(now)

    def _drop_shared(self, trainer: Trainer, sensors: list[Sensor]) -> list[Sensor]:
        """Sensors that measure one physical device from several processes (MIG instances of one GPU)
        are counted by the lowest rank only (a collective in setup, where every rank is)."""
        keys = [s.shared_key for s in sensors if s.shared_key]
        if not distributed(trainer):
            return sensors
        owners = shared_owners(gather_objects(trainer, keys))
        kept = []
        for sensor in sensors:
            owner = owners.get(sensor.shared_key, trainer.global_rank) if sensor.shared_key else trainer.global_rank
            if owner == trainer.global_rank:
                kept.append(sensor)
                continue
            self._skipped.append(f"{sensor.name}: the same physical device ({sensor.shared_key}) is counted by rank {owner}")
            if sensor in self._owned:
                self._owned.remove(sensor)
                sensor.close()
        return kept

    def _finish(self, trainer: Trainer, stage: str, status: str) -> None:
        stage = getattr(stage, "value", stage)
        sampler, self._sampler = self._sampler, None
        if sampler is None:
            return
        try:
            sampler.stop(final_reading=True)
            self.summary = self.summary_by_stage[stage] = self._build_summary(trainer, stage, status)
            if stage in SUMMARY_STAGES and trainer.is_global_zero:
                self._emit_summary(trainer, stage)
        finally:
            self._carry_j = {n: self.meter.stats(n)["energy_j"] for n in self.meter.names}  # up to the last reading
            for sensor in self._owned:
                with contextlib.suppress(Exception):
                    sensor.close()
            self._owned = []

    def _log(self, trainer: Trainer, metrics: dict[str, float], step: int | None = None) -> None:
        step = trainer.global_step if step is None else step
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def _log_window(self, trainer: Trainer) -> None:
        meter = self.meter
        now = time.monotonic()
        by_sensor = {n: meter.energy_at(n, now) for n in meter.names}
        local_j = self._unattributed_j + sum(by_sensor.values())
        total_j, window_j = reduce_sum(trainer, [local_j, local_j - self._log_local_j - self._val_in_window_j])
        dt = now - self._log_t
        metrics: dict[str, float] = {"energy/total_j": total_j}
        if self._steps_in_window:
            metrics["energy/step_j"] = window_j / self._steps_in_window
        for name, joules in by_sensor.items():
            metrics[f"energy/{name}_j"] = joules
            if dt > 0:
                metrics[f"power/{name}_w"] = (joules - self._log_by_sensor.get(name, joules)) / dt
        if self.phases:
            metrics.update(self._phase_metrics(trainer))
        self._log(trainer, metrics)
        if self.log_trace and trainer.is_global_zero:
            self._log_trace_points(trainer, now)
        self._log_t, self._log_by_sensor, self._log_local_j = now, by_sensor, local_j
        self._steps_in_window = 0
        self._val_in_window_j = 0.0

    def _log_trace_points(self, trainer: Trainer, now: float) -> None:
        t_end = self.meter.last_time() or now
        for name in self.meter.names:
            points = self.meter.samples_between(name, self._trace_t, t_end)
            if len(points) > self.trace_points:  # keep an even spread, always the newest point
                stride = len(points) / self.trace_points
                points = [points[min(len(points) - 1, int((i + 1) * stride) - 1)] for i in range(self.trace_points)]
            for t_s, power_w in points:
                self._log(trainer, {f"power_trace/{name}_w": power_w}, step=int(round((t_s - self._origin_t) * 1000)))
        self._trace_t = t_end

    # ------------------------------------------------------------------ phases
    def _edge_time(self, trainer: Trainer) -> Any:
        if self.phase_timing == "host":
            return time.monotonic()
        import torch

        if self.phase_timing == "sync":
            if trainer.strategy.root_device.type == "cuda":
                torch.cuda.synchronize(trainer.strategy.root_device)
            return time.monotonic()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _phase_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._edges.setdefault("batch_start", []).append(self._edge_time(trainer))

    def _phase_edge(self, edge: str, trainer: Trainer, pl_module: LightningModule, *args: Any, **kwargs: Any) -> None:
        self._edges.setdefault(edge, []).append(self._edge_time(trainer))

    def _close_step(self, trainer: Trainer) -> None:
        edges, end = self._edges, self._edges["batch_end"][-1]
        comm = _pop_comm_seconds(trainer)
        self._edges = {"prev_end": [end]}
        if self.phase_timing != "cuda_events":
            self._phase_acc.add(step_intervals(edges, comm))
        else:
            self._event_steps.append((edges, comm))
            self._resolve_events(block=len(self._event_steps) > 64)
        # attribute what the sensors have already read past, while the meter's history still holds it
        self._phase_acc.resolve(self.meter, until_s=self.meter.last_time() or 0.0)

    def _resolve_events(self, block: bool = False) -> None:
        """Turn CUDA events into host times for the steps whose last event has run."""
        anchor, anchor_t = self._anchor
        while self._event_steps:
            edges, comm = self._event_steps[0]
            last = edges["batch_end"][-1]
            if not block and not last.query():
                break
            last.synchronize()
            self._event_steps.pop(0)
            times = {k: [anchor_t + anchor.elapsed_time(e) / 1000.0 for e in v] for k, v in edges.items()}
            self._phase_acc.add(step_intervals(times, comm))

    def _phase_metrics(self, trainer: Trainer) -> dict[str, float]:
        if self.phase_timing == "cuda_events":
            self._resolve_events()
        self._phase_acc.resolve(self.meter)
        seconds, joules = self._phase_acc.pop_window()
        reduced = reduce_sum(trainer, [joules[p] for p in PHASES] + [seconds[p] for p in PHASES])
        world = max(trainer.world_size, 1)
        metrics = {f"energy/phase/{p}_j": reduced[i] for i, p in enumerate(PHASES)}
        metrics.update({f"time/phase/{p}_s": reduced[len(PHASES) + i] / world for i, p in enumerate(PHASES)})
        return metrics

    def _phase_rows(self) -> dict[str, list[dict]]:
        if not self.phases or self.meter is None or self._stage != "fit":
            return {}
        dram = [n for n in self.meter.names if self.meter.info(n).get("domain") == "dram"]
        if dram:
            memory_j = sum(self.meter.stats(n)["energy_this_run_j"] for n in dram)
            note = f"RAPL dram zone ({', '.join(dram)}), whole run, not split by phase"
        else:
            memory_j, note = None, "not measurable on this hardware: no RAPL dram zone"
        rows = self._phase_acc.rows(memory_j, note, source=self.sources())
        if self._phase_acc.unattributed_s:
            rows.append({"phase": "(time without energy)", "seconds": self._phase_acc.unattributed_s, "note": "phase intervals beyond the pending limit"})
        return {"energy by phase": rows}

    def _gather_cluster(self, trainer: Trainer, with_state: bool = False) -> None:
        """Per-process energy for the summary: a collective at stage end (all ranks call it). With
        ``with_state``, also every rank's checkpoint state, for a checkpoint saved after ``ddp_green``
        has destroyed the process group."""
        if self.meter is None:
            return
        now = time.monotonic()
        device_j = sum(self.meter.energy_at(n, now) for n in self.meter.names if not self.meter.info(n).get("host_level"))
        energy_j = self._unattributed_j + self.meter.total_at(now)
        mine = {"rank": trainer.global_rank, "node_rank": trainer.node_rank, "energy_j": energy_j, "device_energy_j": device_j}
        gathered = gather_objects(trainer, (mine, self._local_state() if with_state else None))
        self._cluster = _cluster_figures([g[0] for g in gathered])
        if with_state:
            self._per_rank_state = [g[1] for g in gathered]

    def _build_summary(self, trainer: Trainer, stage: str, status: str) -> dict:
        meter = self.meter
        sensors = [meter.stats(n) for n in meter.names]
        sections = dict(self._sections)
        for provider in self._providers:
            try:
                sections.update(provider() or {})
            except Exception as err:  # noqa: BLE001 - a broken provider must not lose the summary
                sections[f"error in {getattr(provider, '__qualname__', provider)}"] = [{"error": str(err)}]
        energy_j = self._unattributed_j + sum(s["energy_j"] for s in sensors)
        cluster = (self._cluster if trainer.world_size > 1 else None) or _cluster_figures(
            [{"rank": trainer.global_rank, "node_rank": trainer.node_rank, "energy_j": energy_j,
              "device_energy_j": sum(s["energy_j"] for s in sensors if not s["host_level"])}]
        )
        return {
            "stage": stage,
            "status": status,
            "started_at": self._started_at,
            "duration_s": time.monotonic() - self._stage_t0,
            "rank": trainer.global_rank,
            "sensors": sensors,
            "sources": sorted({s["source"] for s in sensors}),
            "energy_j": energy_j,
            "energy_this_run_j": sum(s["energy_this_run_j"] for s in sensors),
            "restored_j": self._unattributed_j + sum(s["restored_j"] for s in sensors),
            "cluster": cluster,
            "partial": [f"{s['name']}: " + (s["failed"] or f"{s['gaps']} rejected readings") for s in sensors if s["partial"]],
            "skipped": list(self._skipped),
            "sections": sections,
            "trace": {n: [[round(t - self._origin_t, 4), round(p, 3)] for t, p in meter.trace(n)] for n in meter.names},
        }

    def _emit_summary(self, trainer: Trainer, stage: str) -> None:
        directory = self.summary_dir or _log_dir(trainer)
        path = os.path.join(directory, f"energy_summary_{stage}.json")
        try:
            _summary.write_json(self.summary, path)
            self.summary["path"] = path
        except OSError as err:
            log.warning("lightning_green: could not write %s: %s", path, err)
        if self.print_summary:
            _summary.render(self.summary)
            if "path" in self.summary:
                rank_zero_info(f"lightning_green: energy summary written to {path}")


def shared_owners(keys_by_rank: list[list[str]]) -> dict[str, int]:
    """For each shared sensor key, the lowest rank that reads it."""
    owners: dict[str, int] = {}
    for rank, keys in enumerate(keys_by_rank):
        for key in keys:
            owners.setdefault(key, rank)
    return owners


def _log_dir(trainer: Trainer) -> str:
    """The first logger's folder, else ``default_root_dir``. Not ``trainer.log_dir``: that broadcasts,
    and the summary is written on rank 0 alone."""
    for logger in trainer.loggers:
        directory = getattr(logger, "log_dir", None)
        if directory:
            return directory
    return trainer.default_root_dir


def _pop_comm_seconds(trainer: Trainer) -> float:
    """Exposed all-reduce seconds since the last call, from a strategy that measures them (ddp_green)."""
    stats = getattr(trainer.strategy, "comm_stats", None)
    pop = getattr(stats, "pop_exposed_comm_s", None)
    return float(pop()) if pop is not None else 0.0


def _cluster_figures(per_rank: list[dict]) -> dict:
    """Cluster total and imbalance (max / mean of the per-process device energy: GPUs, not the
    host-level sensors that only one process per node reads)."""
    energies = [r["device_energy_j"] for r in per_rank]
    mean = sum(energies) / len(energies)
    return {
        "world_size": len(per_rank),
        "num_nodes": len({r["node_rank"] for r in per_rank}),
        "total_j": sum(r["energy_j"] for r in per_rank),
        "per_rank": per_rank,
        "imbalance": max(energies) / mean if mean > 0 else float("nan"),
    }
