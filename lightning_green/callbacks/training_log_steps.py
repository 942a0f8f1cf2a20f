"""The training loop's logging of a :class:`~lightning_green.callbacks.power.PowerSampler`: its log
steps, the epoch's energy and the power trace, written through a :class:`~lightning_green.log_queue.LogQueue`."""

from __future__ import annotations

from collections.abc import Callable

from lightning.pytorch import LightningModule, Trainer

from lightning_green.callbacks.trainer_steps import global_step_reader
from lightning_green.distributed import reduce_sum, sum_reducer
from lightning_green.energy.loops import TrainingLog
from lightning_green.log_queue import LogQueue

__all__ = ["TrainingLogSteps"]


class TrainingLogSteps:
    """What a PowerSampler logs while Lightning trains: each logging window (and the progress bar),
    each epoch's energy, the last partial window and the power trace. The figures are built by the
    :class:`~lightning_green.energy.loops.TrainingLog`; this connects it to the Trainer's cadence,
    loggers and progress bar.

    Args:
        train_log: the training loop's log.
        log_trace: keep and write ``power_trace/<sensor>_w`` points (on global rank 0).
        progress_bar: show energy so far and power in Lightning's progress bar.
    """

    def __init__(self, train_log: TrainingLog, log_trace: bool, progress_bar: bool) -> None:
        self.train_log = train_log
        self.log_trace = log_trace
        self.progress_bar = progress_bar
        self.queue = LogQueue("PowerSampler")
        # whether any process reads a sensor in this fit (False: no log steps, no epoch energy)
        self._measuring = False
        # ``global_step_reader(trainer)``, set by :meth:`start`
        self._global_step: Callable[[], int] | None = None

    def start(self, trainer: Trainer, measuring: bool, trace_origin_t: float | None) -> Callable[[], int]:
        """Training starts: log every ``log_every_n_steps`` (never without a sensor) and keep the trace
        from ``trace_origin_t``. Returns the reader of the global step that :meth:`TrainingLog.batch_end`
        takes on the training thread."""
        self._measuring = measuring
        # without a sensor there are no log steps (0: never) and no trace
        every = trainer.log_every_n_steps if measuring else 0
        keeps_trace = self.log_trace and measuring and trainer.is_global_zero
        self.train_log.start(
            every,
            trainer.global_step,
            trainer.strategy.root_device,
            sum_reducer(trainer),
            trainer.world_size,
            trace_origin_t if keeps_trace else None,
        )
        self.queue.start(trainer.loggers, background=trainer.is_global_zero)
        self._global_step = global_step_reader(trainer)
        return self._global_step

    def log_window(self, pl_module: LightningModule) -> None:
        """A log step: the window's figures (built off the training thread where they can be)."""
        step = self._global_step()
        metrics = self.train_log.log_window(step, self.queue, in_place=self.progress_bar)
        if self.progress_bar:
            progress = {"energy_kj": metrics["energy/total_j"] / 1000.0, "power_w": self.train_log.window.power_w}
            pl_module.log_dict(progress, prog_bar=True, logger=False)

    def log_epoch(self, trainer: Trainer) -> None:
        """The epoch's energy, all processes (a collective), and the trace so far."""
        if self._measuring:
            epoch_j = reduce_sum(trainer, [self.train_log.window.epoch_energy_j()])[0]
            self.queue.put({"energy/epoch_j": epoch_j}, trainer.global_step, trainer.loggers)
        self.drain_trace(trainer)

    def drain_trace(self, trainer: Trainer) -> None:
        """Write the trace points kept so far."""
        self.queue.call(self.train_log.drain_trace, trainer.loggers)

    def end(self, trainer: Trainer) -> None:
        """Training ends: the last, partial logging window (no listeners, no progress bar), the trace,
        and the queue written out."""
        if self.train_log.unlogged_steps:
            self.train_log.log_window(self._global_step(), self.queue, log_step=False)
        self.drain_trace(trainer)
        self.queue.stop()
        self.train_log.end()

    def stop(self) -> None:
        """Write what is queued and end the queue's thread (a stage ends or stops)."""
        self.queue.stop()
