"""The summaries of a :class:`~lightning_green.callbacks.power.PowerSampler`: each stage's record, the
sections other callbacks add, the summary built when the stage ends, and where it is written."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lightning_green import summary as S
from lightning_green.energy.loops import TrainingLog
from lightning_green.energy.session import EnergySession
from lightning_green.messages import SayOnce

__all__ = ["NO_SENSOR_NOTE", "StageSummaries", "summary_dir_of"]


def summary_dir_of(trainer: Trainer) -> str:
    """The first logger's folder, else ``default_root_dir``. Not ``trainer.log_dir``: that broadcasts,
    and the summary is written on rank 0 alone."""
    for logger in trainer.loggers:
        if logger.log_dir:
            return logger.log_dir
    return trainer.default_root_dir


#: The line a summary's ``partial`` list gets when no process read any sensor.
NO_SENSOR_NOTE = "no sensor: no energy was measured (the energy figures are absent from the logs, not 0)"


class StageSummaries:
    """The summaries of a :class:`PowerSampler`: each stage's record (its loops and the figures
    gathered from every process), the extra sections other callbacks add, the summary built when
    the stage ends, and where it is written.

    Args:
        session: the measurement.
        train_log: the training loop's log (its phase rows go in a fit's summary).
        report_picture: draw ``energy_report_<stage>.png`` beside the written summary.
    """

    def __init__(self, session: EnergySession, train_log: TrainingLog, report_picture: bool) -> None:
        self.session = session
        self.train_log = train_log
        self.report_picture = report_picture
        self.stage_record = S.StageRecord(session.clock)
        self.sections = S.SummarySections()
        self.sections.add_provider(self._phase_rows)
        #: the last summary built
        self.summary: dict | None = None
        self.by_stage: dict[str, dict] = {}
        # matplotlib missing: said once, not per stage
        self._plots_hint = SayOnce(rank_zero_info)

    @property
    def first_stage(self) -> bool:
        """No stage has begun yet (what is said once per run is said now)."""
        return self.stage_record.first

    @property
    def trace_origin_t(self) -> float | None:
        """The trace's time zero: the first stage's start."""
        return self.stage_record.origin_t

    def begin(self, stage: str, skipped: list[str]) -> None:
        self.stage_record.begin(stage, skipped)
        self.sections.clear_sections()

    def loop_begins(self, loop: str) -> None:
        self.stage_record.timeline.begin(loop)

    def stage_loop_ended(self, trainer: Trainer, with_state: bool = False) -> None:
        """The stage's main loop ended: every process's figures are gathered (a collective)."""
        self.stage_record.stage_loop_ended(trainer, self.session, with_state=with_state)

    def sources(self, all_processes: bool) -> str:
        this_process = self.session.sources()
        return self.stage_record.sources(this_process) if all_processes else this_process

    def checkpoint_state(self, trainer: Trainer | None) -> dict[str, Any]:
        per_rank = self.stage_record.per_rank_state
        return S.checkpoint_state(trainer, self.session.local_state(), per_rank, self.session.origin)

    def finish(self, trainer: Trainer, stage: str, status: str, no_sensor: bool) -> None:
        """Build the stage's summary (the providers are asked now)."""
        summary = self.stage_record.summary(
            self.session,
            status,
            rank=trainer.global_rank,
            node_rank=trainer.node_rank,
            world_size=trainer.world_size,
            sections=self.sections.collect(),
        )
        summary["no_sensor"] = no_sensor
        if no_sensor:
            summary["partial"].insert(0, NO_SENSOR_NOTE)
        self.summary = summary
        self.by_stage[stage] = summary

    def emit(self, trainer: Trainer, directory: str, print_table: bool) -> None:
        """Write (and print, and draw) the last summary (rank 0)."""
        picture = None
        if self.report_picture:
            picture = {"loggers": trainer.loggers, "step": trainer.global_step, "info": self._plots_hint}
        S.emit(self.summary, directory, print_table, picture)

    def _phase_rows(self) -> dict[str, list[dict]]:
        return self.train_log.phase_rows() if self.stage_record.stage == "fit" else {}
