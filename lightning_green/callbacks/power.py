"""PowerSampler: samples power on a background thread and logs energy through ``trainer.loggers``.

The callback is glue: the measurement is an :class:`~lightning_green.energy.session.EnergySession`,
the logging window a :class:`~lightning_green.energy.session.LogWindow`, phases a
:class:`~lightning_green.energy.phases.PhaseRecorder` and the summary :mod:`lightning_green.summary`.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from enum import Enum
from typing import Any, ContextManager

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

from lightning_green import summary as S
from lightning_green.callbacks.trainer_steps import global_step_reader
from lightning_green.checks import check_bool, check_callable, check_choice, check_int, check_path
from lightning_green.distributed import gather_floats, reduce_sum, shared_owners, sum_reducer
from lightning_green.energy.generation import GenerationPhases, PhaseBlock
from lightning_green.energy.loops import Listener, TrainingLog
from lightning_green.energy.phases import PHASE_TIMINGS
from lightning_green.energy.sampler import check_interval
from lightning_green.energy.session import EnergySession, Measurement
from lightning_green.errors import MisconfiguredTrainer
from lightning_green.log_queue import LogQueue, log_metrics
from lightning_green.messages import SayOnce
from lightning_green.sensor_choice import check_sensors, sensors_for_process
from lightning_green.sensors.base import Sensor
from lightning_green.sensors.rapl import DEFAULT_ROOT

log = logging.getLogger("lightning_green")

__all__ = ["LogStepListener", "Measurement", "PowerSampler", "find_power_sampler", "shared_owners"]

#: ``listener(step, reduce) -> finish``: see :meth:`PowerSampler.add_log_step_listener`.
LogStepListener = Listener


def find_power_sampler(trainer: Trainer) -> PowerSampler | None:
    """The first :class:`PowerSampler` in ``trainer.callbacks``, or None."""
    return next((cb for cb in trainer.callbacks if isinstance(cb, PowerSampler)), None)


def summary_dir_of(trainer: Trainer) -> str:
    """The first logger's folder, else ``default_root_dir``. Not ``trainer.log_dir``: that broadcasts,
    and the summary is written on rank 0 alone."""
    for logger in trainer.loggers:
        if logger.log_dir:
            return logger.log_dir
    return trainer.default_root_dir


#: The hooks that mark phase edges (``phases=True``), and the edge each marks.
PHASE_EDGE_HOOKS = (
    ("on_train_batch_start", "batch_start"),
    ("on_before_zero_grad", "zero_grad"),
    ("on_before_backward", "backward_start"),
    ("on_after_backward", "backward_end"),
    ("on_before_optimizer_step", "optimizer_start"),
)


def _stage_name(stage: Any) -> str:
    """``"fit"`` for ``"fit"`` or ``TrainerFn.FITTING`` (a str enum whose ``str()`` is its name)."""
    return stage.value if isinstance(stage, Enum) else str(stage)


def _loop_name(trainer: Trainer) -> str:
    return "sanity" if trainer.sanity_checking else "validation"


class PowerSampler(Callback):
    r"""Measure energy while Lightning trains, validates, tests or predicts.

    Background threads read the sensors each ``interval_s``; hooks only note timestamps. Energy is
    logged at the Trainer's ``log_every_n_steps``, its figures built off the training thread where they
    can be (:meth:`~lightning_green.energy.loops.TrainingLog.log_window`). Each process measures its own
    GPU; machine-wide sensors are read by local rank 0 of each node; totals are summed at log time.

    Logged metrics (through ``trainer.loggers``, step = ``trainer.global_step``):
        - ``power/<sensor>_w`` (W): mean power of this process's sensor over the logging window.
        - ``energy/<sensor>_j`` (J): cumulative energy of this process's sensor.
        - ``energy/total_j`` (J): cumulative energy of all sensors of all processes.
        - ``energy/step_j`` (J): mean energy per optimizer step over the logging window, all processes
          (validation loops and :meth:`measure_evaluation` blocks in the window excluded).
        - ``energy/epoch_j`` (J): energy of the training epoch, all processes (at epoch end).
        - ``power_trace/<sensor>_w`` (W): the sampler's readings, at most ``trace_points`` per logging
          window; step: ms since the sampler first started. Written in batches of 512 and at loop edges.
        - with ``phases=True``: ``energy/phase/<phase>_j`` (J, all processes) and ``time/phase/<phase>_s``
          (s, mean over processes) over the logging window, for ``data``, ``compute``, ``optimizer``,
          ``comm`` and ``other`` (the rule is in :mod:`lightning_green.energy.phases`).
        - with :meth:`generation_phase` blocks in a test or predict loop, at its end:
          ``generation/<phase>_j_per_token`` (J/token) and ``generation/<phase>_s_per_token`` (s/token)
          for ``prefill`` (per prompt token) and ``decode`` (per generated token), all processes.
        - with ``progress_bar=True``, in the progress bar only: ``energy_kj`` (kJ, all processes, so far)
          and ``power_w`` (W, all processes, over the logging window).

    At the end of ``fit``, ``test`` and ``predict`` a table is printed, ``energy_summary_<stage>.json`` written
    (:mod:`lightning_green.summary`) and, with matplotlib and ``report_picture``, ``energy_report_<stage>.png`` drawn beside
    it and sent to TensorBoard as the image ``energy/report`` (:mod:`lightning_green.report_plot`).

    Args:
        sensors: ``"auto"``, ``"nvml"``, ``"rapl"``, ``"estimate"``, or a list of
            :class:`~lightning_green.sensors.Sensor` objects and such names.
        interval_s: seconds between readings (> 0).
        log_trace: log ``power_trace/<sensor>_w`` points.
        trace_points: most trace points per sensor per logging window (>= 1).
        print_summary: print the summary table at the end of fit, test and predict (rank 0).
        summary_dir: where the summary and picture go (a path); default the first logger's folder.
        rapl_root: the powercap sysfs root for RAPL sensors.
        history: recent readings kept per sensor for window queries (>= 2).
        phases: attribute each training step's energy to data / compute / optimizer / comm / other.
        phase_timing: ``"host"``, ``"cuda_events"`` or ``"sync"`` (see
            :class:`~lightning_green.energy.phases.PhaseRecorder`).
        clock: the monotonic clock of window edges; tests inject one with their sensors.
        progress_bar: show energy so far and power in Lightning's progress bar (TQDM or Rich).
        report_picture: draw ``energy_report_<stage>.png`` (and the TensorBoard image) at the end.

    Raises:
        ValueError / TypeError: an argument out of range or of the wrong type (the message names it).
        MisconfigurationException: in ``setup``, ``phase_timing="cuda_events"`` off CUDA.

    Example::

        trainer = Trainer(callbacks=[PowerSampler(interval_s=0.1, progress_bar=True), EfficiencyLogger()])
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
        clock: Callable[[], float] | None = None,
        progress_bar: bool = False,
        report_picture: bool = True,
    ) -> None:
        super().__init__()
        self._sensor_spec = check_sensors(sensors)
        self.interval_s = check_interval(interval_s)
        self.log_trace, self.print_summary = (
            check_bool("log_trace", log_trace),
            check_bool("print_summary", print_summary),
        )
        self.trace_points = check_int("trace_points", trace_points, 1)
        self.summary_dir, self.rapl_root = (
            check_path("summary_dir", summary_dir),
            check_path("rapl_root", rapl_root, optional=False),
        )
        self.history = check_int("history", history, 2)
        self.phases, self.phase_timing = (
            check_bool("phases", phases),
            check_choice("phase_timing", phase_timing, PHASE_TIMINGS),
        )
        self.progress_bar, self.report_picture = (
            check_bool("progress_bar", progress_bar),
            check_bool("report_picture", report_picture),
        )
        self.session = EnergySession(self.interval_s, self.history, check_callable("clock", clock) or time.monotonic)
        self.training = TrainingLog(self.session, self.trace_points, self.phase_timing if self.phases else None)
        self.sections = S.SummarySections()
        self.summary: dict | None = None  # the last summary built (every rank has its own)
        self.summary_by_stage: dict[str, dict] = {}
        self.record = S.StageRecord(self.session.clock)
        self._trainer: Trainer | None = None
        self.log_queue, self._global_step = (
            LogQueue("PowerSampler"),
            None,
        )  # per-step metrics (EfficiencyLogger's too); step reader
        self._plots_hint = SayOnce(rank_zero_info)  # matplotlib missing: said once, not per stage
        for hook, edge in PHASE_EDGE_HOOKS if self.phases else ():  # per instance: phases=False costs nothing
            setattr(self, hook, self.training.edge_hook(edge))
        if self.phases:
            self.sections.add_provider(self._phase_rows)
        # generation phases (prefill / decode) marked by the user's loop: Trainer-free in energy/generation.py
        self._generation_phases = GenerationPhases(self.session)
        self.sections.add_provider(self._generation_rows)

    # ------------------------------------------------------------------ public API
    @property
    def sensors(self) -> list[Sensor]:
        return list(self.session.sensors) if self.session.started else []

    def energy_now_j(self) -> float:
        """Cumulative joules of every sensor of this process (restored energy included)."""
        return self.session.energy_now_j()

    def measure(self) -> ContextManager[Measurement]:
        """Measure the energy of a block: ``with sampler.measure() as m:`` (see :meth:`EnergySession.measure`)."""
        return self.session.measure()

    def measure_evaluation(self) -> ContextManager[Measurement]:
        """:meth:`measure` an evaluation outside Lightning's loops: not training energy (:meth:`TrainingLog.measure_evaluation`)."""
        return self.training.measure_evaluation()

    def generation_phase(self, name: str, tokens: int | None = None) -> ContextManager[PhaseBlock]:
        """Mark a ``"prefill"`` or ``"decode"`` block of a generation loop (in a test or predict step):
        ``with sampler.generation_phase("decode") as block: ...; block.tokens = n``. The summary and the
        logged ``generation/<phase>_j_per_token`` give each phase's J and s per token, all processes
        (:class:`~lightning_green.energy.generation.GenerationPhases`)."""
        return self._generation_phases.phase(name, tokens)

    def sources(self, all_processes: bool = False) -> str:
        """The sources of this process's sensors (``all_processes``: of every process's, as gathered at the loop's end), joined with ``+``."""
        return self.record.sources(self.session.sources()) if all_processes else self.session.sources()

    def add_summary_section(self, title: str, rows: list[dict]) -> None:
        """Add a table (a list of dict rows) to the next summary (for other callbacks)."""
        self.sections.add_section(title, rows)

    def add_summary_provider(self, provider: Callable[[], dict[str, list[dict]]]) -> None:
        """Register ``provider() -> {title: rows}``, called when the summary is built."""
        self.sections.add_provider(provider)

    def add_log_step_listener(self, listener: LogStepListener) -> None:
        """Have another callback log at this one's training log steps (EfficiencyLogger does); add it in
        ``on_train_start``, as each stage's setup forgets them. The protocol: :meth:`TrainingLog.log_window`."""
        self.training.add_listener(listener)

    def set_comm_seconds(self, pop_exposed_comm_s: Callable[[], float] | None) -> None:
        """Where the ``comm`` phase's seconds come from (``ddp_green`` hands its counter in ``setup``)."""
        self.training.comm_seconds = pop_exposed_comm_s

    # ------------------------------------------------------------------ lifecycle
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.phases and self.phase_timing == "cuda_events" and trainer.strategy.root_device.type != "cuda":
            raise MisconfiguredTrainer(
                f"`phase_timing='cuda_events'` needs a CUDA device, but this Trainer runs on {trainer.strategy.root_device.type}; use phase_timing='host' or 'sync'"
            )
        self.training.comm_seconds = None
        self._start(trainer, _stage_name(stage))

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._finish(trainer, _stage_name(stage), status="finished")

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._finish(
            trainer, _stage_name(trainer.state.fn or "unknown"), status=f"interrupted ({type(exception).__name__})"
        )

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        trace_origin_t = self.record.origin_t if self.log_trace and trainer.is_global_zero else None
        self.training.start(
            trainer.log_every_n_steps,
            trainer.global_step,
            trainer.strategy.root_device,
            sum_reducer(trainer),
            trainer.world_size,
            trace_origin_t,
        )
        self.record.timeline.begin("train")
        self.log_queue.start(trainer.loggers, background=trainer.is_global_zero)
        self._global_step = global_step_reader(trainer)

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.training.start_epoch()
        self.record.timeline.begin("train")

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.training.batch_end(
            self._global_step()
        ):  # a log step: the figures are built off this thread where they can be
            metrics = self.training.log_window(self._global_step(), self.log_queue, in_place=self.progress_bar)
            if self.progress_bar:
                pl_module.log_dict(
                    {"energy_kj": metrics["energy/total_j"] / 1000.0, "power_w": self.training.window.power_w},
                    prog_bar=True,
                    logger=False,
                )

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.log_queue.put(
            {"energy/epoch_j": reduce_sum(trainer, [self.training.window.epoch_energy_j()])[0]},
            trainer.global_step,
            trainer.loggers,
        )
        self.log_queue.call(self.training.drain_trace, trainer.loggers)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.training.unlogged_steps:  # the last, partial logging window (no listeners, no progress bar)
            self.training.log_window(self._global_step(), self.log_queue, log_step=False)
        self.log_queue.call(self.training.drain_trace, trainer.loggers)
        self.log_queue.stop()
        self.training.end()
        self.record.stage_loop_ended(trainer, self.session, with_state=True)

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.record.timeline.begin(_loop_name(trainer))
        self.training.validation_started(in_fit=trainer.state.fn == "fit" and not trainer.sanity_checking)
        self.log_queue.call(self.training.drain_trace, trainer.loggers)

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == "fit":
            self.record.timeline.begin("train")
            self.training.validation_ended(in_fit=not trainer.sanity_checking)
        elif trainer.state.fn == "validate":
            self.record.stage_loop_ended(trainer, self.session)

    @override
    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.record.timeline.begin("test")

    @override
    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.record.stage_loop_ended(trainer, self.session)
        self._generation_loop_ended(trainer)

    @override
    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.record.timeline.begin("predict")

    @override
    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.record.stage_loop_ended(trainer, self.session)
        self._generation_loop_ended(trainer)

    # ------------------------------------------------------------------ checkpoints
    @override
    def state_dict(self) -> dict[str, Any]:
        """Every process's energy so far (a collective when the process group is up; after fit under
        ``ddp_green`` the group is gone, and the other ranks' parts are those gathered at train end)."""
        self.session.read_now()  # a checkpoint is no hot path: read the sensors now
        return S.checkpoint_state(
            self._trainer, self.session.local_state(), self.record.per_rank_state, self.session.origin
        )

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.session.load_checkpoint(state_dict)
        if self.session.started and self._trainer is not None:
            self.session.restore_checkpoint(self._trainer.world_size, self._trainer.global_rank)

    # ------------------------------------------------------------------ internals
    def _start(self, trainer: Trainer, stage: str) -> None:
        if self.session.started:  # a previous run ended without teardown
            self._finish(trainer, self.record.stage, status="superseded")
        self._trainer = trainer
        sensors, owned, skipped = sensors_for_process(
            trainer, self._sensor_spec, self.rapl_root, tell=self.record.first
        )
        self.session.start(sensors, owned)
        self.session.restore_checkpoint(trainer.world_size, trainer.global_rank)
        self.record.begin(stage, skipped)
        self.sections.clear_sections()
        self.training.begin_stage()
        self._generation_phases.reset()

    def _finish(self, trainer: Trainer, stage: str, status: str) -> None:
        self.log_queue.stop()
        if not self.session.finish():
            return
        self.summary = self.summary_by_stage[stage] = self.record.summary(
            self.session,
            status,
            rank=trainer.global_rank,
            node_rank=trainer.node_rank,
            world_size=trainer.world_size,
            sections=self.sections.collect(),
        )
        if stage in S.SUMMARY_STAGES and trainer.is_global_zero:
            picture = (
                {"loggers": trainer.loggers, "step": trainer.global_step, "info": self._plots_hint}
                if self.report_picture
                else None
            )
            S.emit(self.summary, self.summary_dir or summary_dir_of(trainer), self.print_summary, picture)

    def _generation_loop_ended(self, trainer: Trainer) -> None:
        """Every process's generation phases (a collective) and their metrics, at the loop's end."""
        log_metrics(trainer, self._generation_phases.loop_ended(functools.partial(gather_floats, trainer)))

    def _generation_rows(self) -> dict[str, list[dict]]:
        rows = self._generation_phases.rows(self.sources(all_processes=True))
        return {"generation phases": rows} if rows else {}

    def _phase_rows(self) -> dict[str, list[dict]]:
        return self.training.phase_rows() if self.record.stage == "fit" else {}
