"""PowerSampler: samples power on a background thread and logs energy through ``trainer.loggers``."""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

from lightning_green import summary as _summary
from lightning_green.callbacks._dist import gather_objects, reduce_sum
from lightning_green.energy.meter import EnergyMeter
from lightning_green.energy.sampler import Sampler, check_interval
from lightning_green.sensors.auto import SENSOR_NAMES, build_sensors
from lightning_green.sensors.base import Sensor
from lightning_green.sensors.rapl import DEFAULT_ROOT

log = logging.getLogger("lightning_green")

SUMMARY_STAGES = ("fit", "test")


@dataclass
class Measurement:
    """Energy of a block run under :meth:`PowerSampler.measure` (filled when the block exits)."""

    energy_j: float = float("nan")
    duration_s: float = float("nan")
    sources: list[str] = field(default_factory=list)

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
        - ``energy/step_j`` (J): mean energy per optimizer step over the logging window, all processes.
        - ``energy/epoch_j`` (J): energy of the training epoch, all processes (at epoch end).
        - ``power_trace/<sensor>_w`` (W): the sampler's readings, at most ``trace_points`` per logging
          window; their step is milliseconds since the sampler first started, so TensorBoard shows a
          power-over-time curve.

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

    Raises:
        ValueError: an unknown sensor name, an empty sensor list or a non-sensor in it,
            ``interval_s <= 0``, ``trace_points < 1``.

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

        self.meter: EnergyMeter | None = None
        self.summary: dict | None = None  # the last summary built (every rank has its own)
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
        self._stage_t0 = 0.0
        self._started_at = ""
        self._cluster: dict | None = None
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
        t0 = time.monotonic()
        yield m
        t1 = time.monotonic()
        self._sampler.sample_once()
        m.energy_j = self.meter.energy_between(t0, t1)
        m.duration_s = t1 - t0
        m.sources = sorted({self.meter.info(n)["source"] for n in self.meter.names})

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

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._epoch_local_j = self.energy_now_j()

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.fit_loop._should_accumulate():
            return
        self._steps_in_window += 1
        if trainer._logger_connector.should_update_logs:
            self._log_window(trainer)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch_j = reduce_sum(trainer, [self.energy_now_j() - self._epoch_local_j])[0]
        self._log(trainer, {"energy/epoch_j": epoch_j})

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._gather_cluster(trainer)

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == "validate":
            self._gather_cluster(trainer)

    @override
    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._gather_cluster(trainer)

    @override
    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._gather_cluster(trainer)

    # ------------------------------------------------------------------ checkpoints
    @override
    def state_dict(self) -> dict[str, Any]:
        local = dict(self._carry_j)
        if self.meter is not None:
            now = time.monotonic()
            local.update({n: self.meter.energy_at(n, now) for n in self.meter.names})
        local["__unattributed__"] = self._unattributed_j
        per_rank = gather_objects(self._trainer, local) if self._trainer is not None else [local]
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
        self._epoch_local_j = self._log_local_j

    def _start(self, trainer: Trainer, stage: str) -> None:
        if self._sampler is not None:  # a previous run ended without teardown
            self._finish(trainer, stage, status="superseded")
        self._trainer = trainer
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

    def _finish(self, trainer: Trainer, stage: str, status: str) -> None:
        stage = getattr(stage, "value", stage)
        sampler, self._sampler = self._sampler, None
        if sampler is None:
            return
        try:
            sampler.stop(final_reading=True)
            self.summary = self._build_summary(trainer, stage, status)
            if stage in SUMMARY_STAGES and trainer.is_global_zero:
                self._emit_summary(trainer, stage)
        finally:
            self._carry_j = {n: self.meter.energy_at(n, time.monotonic()) for n in self.meter.names}
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
        total_j, window_j = reduce_sum(trainer, [local_j, local_j - self._log_local_j])
        dt = now - self._log_t
        metrics: dict[str, float] = {"energy/total_j": total_j}
        if self._steps_in_window:
            metrics["energy/step_j"] = window_j / self._steps_in_window
        for name, joules in by_sensor.items():
            metrics[f"energy/{name}_j"] = joules
            if dt > 0:
                metrics[f"power/{name}_w"] = (joules - self._log_by_sensor.get(name, joules)) / dt
        self._log(trainer, metrics)
        if self.log_trace and trainer.is_global_zero:
            self._log_trace_points(trainer, now)
        self._log_t, self._log_by_sensor, self._log_local_j = now, by_sensor, local_j
        self._steps_in_window = 0

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

    def _gather_cluster(self, trainer: Trainer) -> None:
        """Per-process energy for the summary: a collective at stage end (all ranks call it)."""
        if self.meter is None:
            return
        now = time.monotonic()
        device_j = sum(self.meter.energy_at(n, now) for n in self.meter.names if not self.meter.info(n).get("host_level"))
        mine = {"rank": trainer.global_rank, "node_rank": trainer.node_rank, "energy_j": self.energy_now_j(), "device_energy_j": device_j}
        per_rank = gather_objects(trainer, mine)
        self._cluster = _cluster_figures(per_rank)

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
        cluster = self._cluster or _cluster_figures(
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
        directory = self.summary_dir or trainer.log_dir or trainer.default_root_dir
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


def _cluster_figures(per_rank: list[dict]) -> dict:
    energies = [r["device_energy_j"] for r in per_rank]
    if not any(energies):  # no per-device sensor: compare whole-process totals
        energies = [r["energy_j"] for r in per_rank]
    mean = sum(energies) / len(energies)
    return {
        "world_size": len(per_rank),
        "num_nodes": len({r["node_rank"] for r in per_rank}),
        "total_j": sum(r["energy_j"] for r in per_rank),
        "per_rank": per_rank,
        "imbalance": max(energies) / mean if mean > 0 else float("nan"),
    }
