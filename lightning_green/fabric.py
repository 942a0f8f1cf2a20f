"""FabricEnergy: energy of a Lightning Fabric run (LitGPT's ``pretrain`` and ``finetune``), on the same
Trainer-free parts as PowerSampler.

The measurement is an :class:`~lightning_green.energy.session.EnergySession`, the logging window and
cadence a :class:`~lightning_green.energy.loops.TrainingLog`, the rates a
:class:`~lightning_green.energy.rates.RateWindow` and the summary :mod:`lightning_green.summary`.
Fabric has two hooks for it, ``on_after_setup`` (from ``fabric.setup``) and ``on_after_optimizer_step``,
and no end-of-run hook: the rest is explicit calls, and the summary is written at interpreter exit when
nobody called :meth:`FabricEnergy.finish`.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from lightning.fabric.loggers import TensorBoardLogger
from torch import nn

from lightning_green import summary as S
from lightning_green.checks import check_bool, check_callable, check_int, check_path
from lightning_green.distributed import fabric_sum_reducer, local_sum
from lightning_green.energy import metrics as M
from lightning_green.energy.loops import TrainingLog
from lightning_green.energy.rates import RateWindow
from lightning_green.energy.sampler import check_interval
from lightning_green.energy.session import EnergySession, Measurement
from lightning_green.log_queue import LogQueue
from lightning_green.messages import WarnOnce
from lightning_green.sensor_choice import check_sensors, sensors_for_process
from lightning_green.sensors.base import Sensor
from lightning_green.sensors.rapl import DEFAULT_ROOT

__all__ = ["FabricEnergy", "fabric_writes_thread_safe", "measuring"]

#: The FabricEnergy measuring each Fabric, by the Fabric's strategy (what both hooks see); weakly held.
_MEASURING: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def measuring(fabric: Any) -> FabricEnergy | None:
    """The :class:`FabricEnergy` that measures ``fabric``, or None."""
    return _MEASURING.get(fabric.strategy)


class StrategyView:
    """What FabricEnergy reads of a Fabric, from its strategy alone, as Fabric itself reads it (a
    strategy of one process has no ``world_size``: 1). ``fabric.setup_module`` (LitGPT's LoRA and adapter
    scripts) fires no hook, and the first optimizer step hands over the strategy, not the Fabric: no
    loggers are reachable then."""

    loggers: tuple = ()

    def __init__(self, strategy: Any) -> None:
        self.strategy = strategy

    @property
    def device(self) -> Any:
        return self.strategy.root_device

    @property
    def world_size(self) -> int:
        return getattr(self.strategy, "world_size", 1)

    @property
    def global_rank(self) -> int:
        return getattr(self.strategy, "global_rank", 0)

    @property
    def local_rank(self) -> int:
        return getattr(self.strategy, "local_rank", 0)

    @property
    def node_rank(self) -> int:
        return getattr(self.strategy, "node_rank", 0)

    @property
    def is_global_zero(self) -> bool:
        return self.strategy.is_global_zero

    def all_reduce(self, tensor: Any, reduce_op: str) -> Any:
        return self.strategy.all_reduce(tensor, reduce_op=reduce_op)


def fabric_writes_thread_safe(logger: Any) -> bool:
    """Fabric's (and so Lightning's) ``TensorBoardLogger``: its ``SummaryWriter`` queues each event under
    a lock, so the log thread may write it. Others (``CSVLogger`` rewrites its file) are written in place."""
    return isinstance(logger, TensorBoardLogger)


def summary_dir_of(fabric: Any) -> str:
    """The first logger's folder, else the working directory."""
    for logger in fabric.loggers:
        # a Lightning logger without a folder has none
        log_dir = getattr(logger, "log_dir", None)
        if log_dir:
            return log_dir
    return os.getcwd()


class FabricEnergy:
    r"""Measure the energy of a training loop run with Lightning Fabric (LitGPT's scripts, your own).

    Pass it to ``Fabric(callbacks=[...])`` (or set ``LIGHTNING_GREEN=1``: see :mod:`lightning_green.opt_in`).
    ``fabric.setup(model, ...)`` starts it (a script that sets up with ``fabric.setup_module``, which
    fires no hook, is measured from its first optimizer step on, with no loggers: the summary only).
    Background threads read the sensors each ``interval_s``;
    each process measures its own GPU and machine-wide sensors are read by local rank 0 of each node.
    Every optimizer step set up with Fabric is counted (a run with two optimizers counts both); every
    ``log_every_n_steps`` steps the window's figures are summed over processes (one all-reduce, never
    per step) and logged through ``fabric.loggers``.

    Logged metrics (step = optimizer steps counted here; energy summed over all processes):
        - ``energy/total_j`` (J): cumulative energy of all sensors of all processes.
        - ``energy/step_j`` (J): mean energy per optimizer step over the logging window
          (:meth:`measure_evaluation` blocks excluded).
        - ``energy/<sensor>_j`` (J) and ``power/<sensor>_w`` (W): this process's sensor, cumulative and
          mean over the window.
        - ``efficiency/samples_per_j``, ``efficiency/tokens_per_j`` (1/J): over the window, when samples
          or tokens are counted (``samples_per_step``, ``tokens_per_step`` or :meth:`add`).
        - ``efficiency/eer_j_per_param`` (J/parameter): training energy so far / parameters set up.
        - ``carbon/gco2e`` (gCO2e): all energy so far × ``pue`` × ``carbon_intensity_g_per_kwh`` / 3.6e6.
        - ``power_trace/<sensor>_w`` (W): the readings, at most ``trace_points`` per window (rank 0's);
          step: ms since the start. Written in batches and at :meth:`finish`.

    :meth:`finish` (on every process, at the same point: it gathers) ends the measurement, logs the last
    partial window, saves the loggers (``logger.save()``: Fabric never finalizes them), prints the table
    and writes ``energy_summary_fit.json`` (rank 0) to ``summary_dir``.
    Nobody called it: at interpreter exit the same is done without collectives, so the summary of a
    multi-process run then holds rank 0's own figures only (its ``status`` says so). No thread outlives
    :meth:`finish` or the process.

    Args:
        sensors: ``"auto"``, ``"nvml"``, ``"rapl"``, ``"estimate"``, or a list of sensors and such names.
        interval_s: seconds between readings (> 0).
        log_every_n_steps: optimizer steps per logging window (>= 1).
        samples_per_step: samples in each optimizer step of this process (>= 0), or None.
        tokens_per_step: tokens in each optimizer step of this process (>= 0), or None.
        carbon_intensity_g_per_kwh: grid carbon intensity in gCO2e/kWh (default 475, world average, IEA 2019).
        pue: data-centre power usage effectiveness (>= 1.0).
        log_trace: log ``power_trace/<sensor>_w`` points.
        trace_points: most trace points per sensor per logging window (>= 1).
        print_summary: print the summary table at :meth:`finish` (rank 0).
        summary_dir: where the summary goes; default the first logger's folder, else the working directory.
        rapl_root: the powercap sysfs root for RAPL sensors.
        history: recent readings kept per sensor (>= 2).
        clock: the monotonic clock of window edges; tests inject one with their sensors.

    Raises:
        ValueError / TypeError: an argument out of range or of the wrong type (the message names it).

    Example::

        energy = FabricEnergy(tokens_per_step=micro_batch_size * block_size * grad_accum)
        fabric = Fabric(callbacks=[energy], loggers=[TensorBoardLogger("logs")])
        model, optimizer = fabric.setup(model, optimizer)
        for batch in loader:
            ...
            optimizer.step()
        with energy.measure_evaluation():
            evaluate(model)
        energy.finish()
    """

    def __init__(
        self,
        sensors: str | Sequence[Sensor | str] = "auto",
        interval_s: float = 0.1,
        log_every_n_steps: int = 50,
        samples_per_step: int | None = None,
        tokens_per_step: int | None = None,
        carbon_intensity_g_per_kwh: float = M.DEFAULT_CARBON_INTENSITY_G_PER_KWH,
        pue: float = 1.0,
        log_trace: bool = True,
        trace_points: int = 32,
        print_summary: bool = True,
        summary_dir: str | None = None,
        rapl_root: str = DEFAULT_ROOT,
        history: int = 4096,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._sensor_spec = check_sensors(sensors)
        self.interval_s = check_interval(interval_s)
        self.log_every_n_steps = check_int("log_every_n_steps", log_every_n_steps, 1)
        for name, count in (("samples_per_step", samples_per_step), ("tokens_per_step", tokens_per_step)):
            if count is not None:
                check_int(name, count, 0)
        M.check_carbon_args(carbon_intensity_g_per_kwh, pue)
        self.log_trace = check_bool("log_trace", log_trace)
        self.trace_points = check_int("trace_points", trace_points, 1)
        self.print_summary = check_bool("print_summary", print_summary)
        self.summary_dir = check_path("summary_dir", summary_dir)
        self.rapl_root = check_path("rapl_root", rapl_root, optional=False)
        self.history = check_int("history", history, 2)
        self.session = EnergySession(self.interval_s, self.history, check_callable("clock", clock) or time.monotonic)
        self.training = TrainingLog(self.session, self.trace_points)
        self.rates = RateWindow(samples_per_step, tokens_per_step, float(carbon_intensity_g_per_kwh), float(pue))
        self.record = S.StageRecord(self.session.clock)
        self.log_queue = LogQueue("FabricEnergy", thread_safe=fabric_writes_thread_safe)
        # optimizer steps since the Fabric was set up
        self.steps = 0
        # set by finish()
        self.summary: dict | None = None
        # the run's efficiency figures, set by finish()
        self.results: dict[str, float] = {}
        self._fabric: Any = None
        self._warn = WarnOnce()
        # until started, the first optimizer step is a "log step": no setup hook came, so it starts the measurement
        self.training.cadence.reset(1, 0)

    # ------------------------------------------------------------------ Fabric hooks
    def on_after_setup(self, fabric: Any, module: nn.Module) -> None:
        """``fabric.setup(...)`` set up ``module``: the first call starts the measurement."""
        self._set_up(fabric, module)

    def on_after_optimizer_step(self, strategy: Any, optimizer: Any) -> None:
        """An optimizer step: counted; on a log step the window's figures are logged."""
        self.steps += 1
        if self.training.batch_end(self.steps):
            self._log_window(strategy)

    # ------------------------------------------------------------------ explicit calls
    @property
    def started(self) -> bool:
        """Measuring: after ``fabric.setup`` and before :meth:`finish`."""
        return self.session.started

    def add(self, samples: int = 0, tokens: int = 0) -> None:
        """Count ``samples`` and ``tokens`` this process trained on (on top of the fixed counts per step)."""
        self.rates.add(check_int("samples", samples, 0), check_int("tokens", tokens, 0))

    def energy_now_j(self) -> float:
        """Cumulative joules of every sensor of this process."""
        return self.session.energy_now_j()

    def measure(self) -> contextlib.AbstractContextManager[Measurement]:
        """Measure the energy of a block (:meth:`EnergySession.measure`); it stays training energy."""
        return self.session.measure()

    @contextlib.contextmanager
    def measure_evaluation(self) -> Iterator[Measurement]:
        """Measure an evaluation block: its energy is left out of ``energy/step_j``, the rates and EER.

        Raises:
            RuntimeError: not measuring (before ``fabric.setup`` or after :meth:`finish`).
        """
        self.record.timeline.begin("validation")
        try:
            with self.training.measure_evaluation() as m:
                yield m
        finally:
            self.record.timeline.begin("train")

    def finish(self) -> dict | None:
        """End the measurement (every process, at the same point: it gathers), log the last window, write
        the summary (rank 0); returns this process's summary. A second call returns the same."""
        if self.session.started:
            atexit.unregister(self._at_exit)
            self._finish("finished", collectives=True)
        return self.summary

    # ------------------------------------------------------------------ internals
    def _set_up(self, fabric: Any, module: nn.Module) -> None:
        # a second model of the run (one FabricEnergy measures one run)
        if self._fabric is not None:
            self.rates.n_params += sum(p.numel() for p in module.parameters())
            return
        self.rates.n_params = sum(p.numel() for p in module.parameters())
        self._start(fabric)

    def _start_without_setup(self, strategy: Any) -> None:
        """The first optimizer step of a Fabric whose ``on_after_setup`` never came (``setup_module``)."""
        if self._fabric is not None or _MEASURING.get(strategy) is not None:
            # finished, or another one measures: nothing more
            self.training.cadence.reset(0, self.steps)
            return
        self._start(StrategyView(strategy))

    def _start(self, fabric: Any) -> None:
        self._fabric = fabric
        _MEASURING[fabric.strategy] = self
        choice = sensors_for_process(fabric, self._sensor_spec, self.rapl_root, tell=True)
        self.session.start(choice.sensors, choice.built)
        self.record.begin("fit", choice.skipped)
        self.record.timeline.begin("train")
        trace_origin_t = self.record.origin_t if self.log_trace and fabric.is_global_zero else None
        self.training.begin_stage()
        self.training.start(
            self.log_every_n_steps,
            self.steps,
            fabric.device,
            fabric_sum_reducer(fabric),
            fabric.world_size,
            trace_origin_t,
        )
        self.training.add_listener(self.rates.listener)
        self.rates.begin(self.session.energy_now_j(), self._evaluation_j)
        for logger in fabric.loggers if fabric.is_global_zero else ():
            if fabric_writes_thread_safe(logger):
                logger.experiment  # noqa: B018 - made here, on this thread, before the log thread writes it
        self.log_queue.start(fabric.loggers, background=fabric.is_global_zero)
        atexit.register(self._at_exit)

    def _save(self, logger: Any) -> None:
        """``logger.save()``: Fabric never finalizes its loggers, and a CSVLogger holds rows until it saves."""
        try:
            logger.save()
        except Exception as err:  # noqa: BLE001 - a logger must not stop the run or its summary
            self._warn(f"save:{id(logger)}", f"FabricEnergy: {type(logger).__name__}.save() raised {err!r}")

    def _evaluation_j(self) -> float:
        return self.training.evaluation_j

    def _log_window(self, strategy: Any) -> None:
        if not self.session.started:
            self._start_without_setup(strategy)
            return
        self.rates.steps = self.steps
        self.training.log_window(self.steps, self.log_queue)

    def _at_exit(self) -> None:
        """Nobody called :meth:`finish`: the same at interpreter exit, with no collective (the other
        processes may be gone)."""
        self._finish("finished at exit (finish() not called)", collectives=False)

    def _finish(self, status: str, collectives: bool) -> None:
        fabric = self._fabric
        together = collectives or fabric.world_size == 1
        self.rates.steps = self.steps
        # the last, partial window (a sum over processes)
        if self.training.unlogged_steps and together:
            self.training.log_window(self.steps, self.log_queue, log_step=False)
        self.log_queue.call(self.training.drain_trace, fabric.loggers)
        self.log_queue.stop()
        for logger in fabric.loggers:
            self._save(logger)
        self.training.end()
        # steps after the end are counted, never logged
        self.training.cadence.reset(0, self.steps)
        if together:
            # the loop's end: the gathered figures hold its last step
            self.session.read_now()
            # gathers every process's figures
            self.record.stage_loop_ended(fabric, self.session)
        self.session.finish()
        _MEASURING.pop(fabric.strategy, None)
        reduce = fabric_sum_reducer(fabric) if together else local_sum
        self.results = self.rates.totals(self.session.energy_now_j(), reduce)
        if not together:
            status += f"; rank {fabric.global_rank}'s figures only, of {fabric.world_size} processes"
        source = self.record.sources(self.session.sources())
        self.summary = self.record.summary(
            self.session,
            status,
            rank=fabric.global_rank,
            node_rank=fabric.node_rank,
            world_size=fabric.world_size if together else 1,
            sections={"efficiency": self.rates.rows(self.results, source)},
        )
        if fabric.is_global_zero:
            S.emit(self.summary, self.summary_dir or summary_dir_of(fabric), self.print_summary)
