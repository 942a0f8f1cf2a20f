"""PowerSampler: samples power on a background thread and logs energy through ``trainer.loggers``.

The callback is glue: the measurement is an :class:`~lightning_green.energy.session.EnergySession`,
the logging window a :class:`~lightning_green.energy.session.LogWindow`, phases a
:class:`~lightning_green.energy.phases.PhaseRecorder` and the summary :mod:`lightning_green.summary`.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from enum import Enum
from typing import Any, ClassVar

from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

from lightning_green import summary as S
from lightning_green.callbacks.sampler_interface import LogStepListener, SamplerInterface
from lightning_green.callbacks.stage_summaries import StageSummaries, summary_dir_of
from lightning_green.callbacks.training_log_steps import TrainingLogSteps
from lightning_green.checks import check_bool, check_callable, check_choice, check_int, check_path
from lightning_green.distributed import gather_floats, shared_owners
from lightning_green.energy.loops import TrainingLog
from lightning_green.energy.phases import PHASE_TIMINGS
from lightning_green.energy.sampler import check_interval
from lightning_green.energy.session import EnergySession, Measurement
from lightning_green.errors import MisconfiguredTrainer
from lightning_green.log_queue import log_metrics
from lightning_green.sensor_choice import check_sensors, sensors_for_process
from lightning_green.sensors.base import Sensor
from lightning_green.sensors.rapl import DEFAULT_ROOT

__all__ = [
    "LogStepListener",
    "Measurement",
    "PowerSampler",
    "SamplerInterface",
    "find_power_sampler",
    "shared_owners",
]


def find_power_sampler(trainer: Trainer) -> PowerSampler | None:
    """The first :class:`PowerSampler` in ``trainer.callbacks``, or None."""
    return next((cb for cb in trainer.callbacks if isinstance(cb, PowerSampler)), None)


def _stage_name(stage: Any) -> str:
    """``"fit"`` for ``"fit"`` or ``TrainerFn.FITTING`` (a str enum whose ``str()`` is its name)."""
    return stage.value if isinstance(stage, Enum) else str(stage)


def _loop_name(trainer: Trainer) -> str:
    return "sanity" if trainer.sanity_checking else "validation"


class PowerSampler(SamplerInterface, Callback):
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
        - with ``progress_bar=True``, in the progress bar only: ``energy_kj`` (kJ, all processes, so far)
          and ``power_w`` (W, all processes, over the logging window).

    At the end of ``fit`` and ``test`` a table is printed, ``energy_summary_<stage>.json`` written
    (:mod:`lightning_green.summary`) and, with matplotlib and ``report_picture``,
    ``energy_report_<stage>.png`` drawn beside it and sent to TensorBoard as the image ``energy/report``
    (:mod:`lightning_green.report_plot`). :attr:`summary` holds the last summary built and
    :attr:`summary_by_stage` each stage's.

    No sensor: when no process can read any sensor (``sensors="rapl"`` without powercap, say), one
    warning says so, nothing is logged (no energy, power, efficiency or carbon figure: absent, not 0),
    and the summary has ``"no_sensor": true`` and a line in its ``partial`` list.

    One per Trainer: a second ``PowerSampler`` in the same Trainer raises ``MisconfigurationException``
    in ``setup`` (both would log the same keys and write the same summary files). To measure other
    sensors, give one ``PowerSampler`` all of them: ``sensors=["nvml", "rapl"]``.

    Other callbacks read it through :class:`SamplerInterface` alone, and find it with
    :func:`find_power_sampler`.

    Args:
        sensors: ``"auto"``, ``"nvml"``, ``"rapl"``, ``"estimate"``, or a list of
            :class:`~lightning_green.sensors.Sensor` objects and such names.
        interval_s: seconds between readings (> 0).
        log_trace: log ``power_trace/<sensor>_w`` points.
        trace_points: most trace points per sensor per logging window (>= 1).
        print_summary: print the summary table at the end of fit and test (rank 0).
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
        MisconfigurationException: in ``setup``, ``phase_timing="cuda_events"`` off CUDA, or a second
            ``PowerSampler`` in the Trainer.

    Example::

        trainer = Trainer(callbacks=[PowerSampler(interval_s=0.1, progress_bar=True), EfficiencyLogger()])
    """

    #: Whether this sampler steps aside for another PowerSampler of the Trainer (the one that
    #: ``LIGHTNING_GREEN=1`` adds does); such a sampler is not counted by the one-per-Trainer check.
    yields_to_another: ClassVar[bool] = False

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
        self._sensor_spec = check_sensors(sensors)
        self.interval_s = check_interval(interval_s)
        self.log_trace = check_bool("log_trace", log_trace)
        self.trace_points = check_int("trace_points", trace_points, 1)
        self.print_summary = check_bool("print_summary", print_summary)
        self.summary_dir = check_path("summary_dir", summary_dir)
        self.rapl_root = check_path("rapl_root", rapl_root, optional=False)
        self.history = check_int("history", history, 2)
        self.phases = check_bool("phases", phases)
        self.phase_timing = check_choice("phase_timing", phase_timing, PHASE_TIMINGS)
        self.progress_bar = check_bool("progress_bar", progress_bar)
        self.report_picture = check_bool("report_picture", report_picture)
        session = EnergySession(self.interval_s, self.history, check_callable("clock", clock) or time.monotonic)
        train_log = TrainingLog(session, self.trace_points, self.phase_timing if self.phases else None)
        SamplerInterface.__init__(self, session, train_log, StageSummaries(session, train_log, self.report_picture))
        self._log_steps = TrainingLogSteps(train_log, self.log_trace, self.progress_bar)
        # the global step's reader of the training thread, set when training starts
        self._global_step: Callable[[], int] | None = None
        self._trainer: Trainer | None = None

    # ------------------------------------------------------------------ stage hooks
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._check_trainer(trainer)
        self._train_log.comm_seconds = None
        self._start(trainer, _stage_name(stage))

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._finish(trainer, _stage_name(stage), status="finished")

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        stage = _stage_name(trainer.state.fn or "unknown")
        self._finish(trainer, stage, status=f"interrupted ({type(exception).__name__})")

    # ------------------------------------------------------------------ training hooks
    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._global_step = self._log_steps.start(trainer, self._measuring, self._summaries.trace_origin_t)
        self._summaries.loop_begins("train")

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._train_log.start_epoch()
        self._summaries.loop_begins("train")

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self.phases:
            self._train_log.mark_edge("batch_start")

    @override
    def on_before_zero_grad(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        if self.phases:
            self._train_log.mark_edge("zero_grad")

    @override
    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: Any) -> None:
        if self.phases:
            self._train_log.mark_edge("backward_start")

    @override
    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.phases:
            self._train_log.mark_edge("backward_end")

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        if self.phases:
            self._train_log.mark_edge("optimizer_start")

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # a log step: the figures are built off this thread where they can be
        if self._train_log.batch_end(self._global_step()):
            self._log_steps.log_window(pl_module)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log_steps.log_epoch(trainer)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log_steps.end(trainer)
        self._summaries.stage_loop_ended(trainer, with_state=True)

    # ------------------------------------------------------------------ evaluation hooks
    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._summaries.loop_begins(_loop_name(trainer))
        in_fit = trainer.state.fn == "fit" and not trainer.sanity_checking
        self._train_log.validation_started(in_fit=in_fit)
        self._log_steps.drain_trace(trainer)

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == "fit":
            self._summaries.loop_begins("train")
            self._train_log.validation_ended(in_fit=not trainer.sanity_checking)
        elif trainer.state.fn == "validate":
            self._summaries.stage_loop_ended(trainer)

    @override
    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._summaries.loop_begins("test")

    @override
    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._end_generation_loop(trainer)
        self._summaries.stage_loop_ended(trainer)

    @override
    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._summaries.loop_begins("predict")

    @override
    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._end_generation_loop(trainer)
        self._summaries.stage_loop_ended(trainer)

    # ------------------------------------------------------------------ checkpoints
    @override
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        """Every process's energy so far, under ``checkpoint["callbacks"]["PowerSampler"]`` (see
        :meth:`_checkpoint_state`). Written here, not returned by ``state_dict``: Lightning refuses two
        callbacks with a ``state_dict`` and one ``state_key`` at Trainer construction with a generic
        message, and ``setup`` says more plainly why a Trainer takes one PowerSampler."""
        callbacks = checkpoint.get("callbacks")
        if callbacks is not None:
            callbacks[self.state_key] = self._checkpoint_state()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.session.load_checkpoint(state_dict)
        if self.session.started and self._trainer is not None:
            self.session.restore_checkpoint(self._trainer.world_size, self._trainer.global_rank)

    def _checkpoint_state(self) -> dict[str, Any]:
        """Every process's energy so far (a collective when the process group is up; after fit under
        ``ddp_green`` the group is gone, and the other ranks' parts are those gathered at train end)."""
        # a checkpoint is no hot path: read the sensors now
        self.session.read_now()
        return self._summaries.checkpoint_state(self._trainer)

    # ------------------------------------------------------------------ helpers
    def _check_trainer(self, trainer: Trainer) -> None:
        samplers = [cb for cb in trainer.callbacks if isinstance(cb, PowerSampler) and not cb.yields_to_another]
        if len(samplers) > 1:
            raise MisconfiguredTrainer(
                f"this Trainer has {len(samplers)} PowerSampler callbacks; it takes one: each would log the "
                "same energy keys and write the same summary files. Give one PowerSampler every sensor to "
                'read, e.g. PowerSampler(sensors=["nvml", "rapl"])'
            )
        device_type = trainer.strategy.root_device.type
        if self.phases and self.phase_timing == "cuda_events" and device_type != "cuda":
            raise MisconfiguredTrainer(
                f"`phase_timing='cuda_events'` needs a CUDA device, but this Trainer runs on {device_type}; "
                "use phase_timing='host' or 'sync'"
            )

    def _start(self, trainer: Trainer, stage: str) -> None:
        if self.session.started:
            # a previous run ended without teardown
            self._finish(trainer, self.stage, status="superseded")
        self._trainer = trainer
        choice = sensors_for_process(trainer, self._sensor_spec, self.rapl_root, tell=self._summaries.first_stage)
        self._measuring = choice.any_process_reads
        self.session.start(choice.sensors, choice.built)
        self.session.restore_checkpoint(trainer.world_size, trainer.global_rank)
        self._summaries.begin(stage, choice.skipped)
        self._summaries.sections.add_provider(self._generation_rows)
        self._generation_phases.reset()
        self._train_log.begin_stage()

    def _finish(self, trainer: Trainer, stage: str, status: str) -> None:
        self._log_steps.stop()
        if not self.session.finish():
            return
        self._summaries.finish(trainer, stage, status, no_sensor=not self._measuring)
        if stage in S.SUMMARY_STAGES and trainer.is_global_zero:
            directory = self.summary_dir or summary_dir_of(trainer)
            self._summaries.emit(trainer, directory, self.print_summary)

    def _end_generation_loop(self, trainer: Trainer) -> None:
        """Every process's generation phases (a collective) and their metrics, at the loop's end; none
        are logged when no process measures."""
        metrics = self._generation_phases.loop_ended(functools.partial(gather_floats, trainer))
        if self._measuring:
            log_metrics(trainer, metrics)

    def _generation_rows(self) -> dict[str, list[dict]]:
        rows = self._generation_phases.rows(self.sources(all_processes=True))
        return {"generation phases": rows} if rows else {}
