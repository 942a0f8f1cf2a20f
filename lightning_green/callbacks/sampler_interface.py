"""What other callbacks read of a :class:`~lightning_green.callbacks.power.PowerSampler`: its
:class:`SamplerInterface`, over the measurement, the training loop's log and the stage's summaries."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from lightning_green.callbacks.stage_summaries import StageSummaries
from lightning_green.energy.generation import GenerationPhases, PhaseBlock
from lightning_green.energy.loops import Listener, TrainingLog
from lightning_green.energy.session import EnergySession, Measurement
from lightning_green.sensors.base import Sensor

__all__ = ["LogStepListener", "SamplerInterface"]

#: ``listener(step, reduce) -> finish``: see :meth:`SamplerInterface.add_log_step_listener`.
LogStepListener = Listener


class SamplerInterface:
    """What other callbacks read of a :class:`~lightning_green.callbacks.power.PowerSampler` (its
    interface, and nothing else of it): the energy of this process so far, blocks measured apart, the
    sensors and their sources, the stage and the clock, and hooks into its summary and its log steps.

    Properties: :attr:`sensors`, :attr:`measuring`, :attr:`stage`, :attr:`clock`,
    :attr:`evaluation_energy_j`, :attr:`logged_total_j`, :attr:`summary`, :attr:`summary_by_stage`. Methods:
    :meth:`energy_now_j`, :meth:`measured_now_j`, :meth:`energy_at_j`, :meth:`device_energy_j`,
    :meth:`measure`, :meth:`measure_evaluation`, :meth:`sources`, :meth:`add_summary_section`,
    :meth:`add_summary_provider`, :meth:`add_log_step_listener`, :meth:`set_comm_seconds`, :meth:`generation_phase`.

    Args:
        session: the measurement.
        train_log: the training loop's log (log-step listeners, evaluation blocks, phases).
        summaries: the stage's summary (sections, providers, the sources gathered from every process).
    """

    def __init__(self, session: EnergySession, train_log: TrainingLog, summaries: StageSummaries) -> None:
        #: the measurement; read by tests that drive its readings, not by other callbacks
        self.session = session
        self._train_log = train_log
        self._summaries = summaries
        # whether any process reads a sensor in this stage (False: nothing is logged)
        self._measuring = False
        # prefill / decode blocks marked by a generation loop (Trainer-free: energy/generation.py)
        self._generation_phases = GenerationPhases(session)

    @property
    def sensors(self) -> list[Sensor]:
        """The sensors this process reads in the running (or last) stage; [] before the first."""
        return list(self.session.sensors) if self.session.started else []

    @property
    def measuring(self) -> bool:
        """Whether any process reads a sensor in this stage (set in ``setup``). False: no energy is
        measured, so a callback logs no figure that needs energy."""
        return self._measuring

    @property
    def stage(self) -> str:
        """The running (or last) stage: ``"fit"``, ``"validate"``, ``"test"`` or ``"predict"``; ``""``
        before the first."""
        return self._summaries.stage_record.stage

    @property
    def clock(self) -> Callable[[], float]:
        """The monotonic clock of the measurement (seconds): time figures that go with its energy."""
        return self.session.clock

    @property
    def logged_total_j(self) -> float:
        """Every process's cumulative joules (the ``energy/total_j`` logged) at the last training log step
        whose figures are built; NaN before the first. Under several processes it is read after that
        log step's own sum, so reading it adds no collective."""
        return self._train_log.total_j

    @property
    def evaluation_energy_j(self) -> float:
        """This process's joules of :meth:`measure_evaluation` blocks since training started (not
        training energy)."""
        return self._train_log.evaluation_j

    @property
    def summary(self) -> dict | None:
        """The last summary built on this process (every process builds its own), or None."""
        return self._summaries.summary

    @property
    def summary_by_stage(self) -> dict[str, dict]:
        """The last summary of each stage, by stage name."""
        return self._summaries.by_stage

    def energy_now_j(self) -> float:
        """Cumulative joules of every sensor of this process (restored energy included)."""
        return self.session.energy_now_j()

    def measured_now_j(self) -> float:
        """The joules this process's sensors measured in the running stage: :meth:`energy_now_j` less
        what was carried in, unmoved by a checkpoint restored mid-stage (so differences of it are safe)."""
        return self.session.measured_now_j()

    def energy_at_j(self, t_s: float) -> float:
        """:meth:`energy_now_j` at ``t_s`` on :attr:`clock` (several figures at one instant)."""
        return self.session.energy_at_j(t_s)

    def device_energy_j(self, t_s: float) -> float:
        """This process's own devices' joules at ``t_s`` (not the host-level sensors one rank per node
        reads)."""
        return self.session.device_energy_j(t_s)

    def measure(self) -> contextlib.AbstractContextManager[Measurement]:
        """Measure the energy of a block: ``with sampler.measure() as m:``
        (see :meth:`~lightning_green.energy.session.EnergySession.measure`)."""
        return self.session.measure()

    def measure_evaluation(self) -> contextlib.AbstractContextManager[Measurement]:
        """:meth:`measure` an evaluation outside Lightning's loops; its energy is not training energy
        (:meth:`~lightning_green.energy.loops.TrainingLog.measure_evaluation`)."""
        return self._train_log.measure_evaluation()

    def sources(self, all_processes: bool = False) -> str:
        """The sources of this process's sensors joined with ``+``; ``all_processes``: of every
        process's, as gathered at the end of the stage's loop."""
        return self._summaries.sources(all_processes)

    def add_summary_section(
        self, title: str, rows: list[dict], *, section_id: str | None = None, fields: dict | None = None
    ) -> None:
        """Add a table (a list of dict rows) to the next summary, under ``section_id`` (the package's
        own ids are in :mod:`lightning_green.run_summary`; else the title is the id) with ``fields``,
        structured facts about it that readers take instead of parsing the title."""
        self._summaries.sections.add_section(title, rows, section_id=section_id, fields=fields)

    def add_summary_provider(self, provider: Callable[[], dict[str, list[dict]]]) -> None:
        """Register ``provider() -> {title: rows}``, called when the summary is built: at the end of
        the stage, or when it stops on an exception (``on_train_end`` may not have run)."""
        self._summaries.sections.add_provider(provider)

    def add_log_step_listener(self, listener: LogStepListener) -> None:
        """Have another callback log at this one's training log steps (EfficiencyLogger does); add it
        in ``on_train_start``, as each stage's setup forgets them. The protocol:
        :meth:`~lightning_green.energy.loops.TrainingLog.log_window`. Without a sensor
        (:attr:`measuring` False) there are no log steps."""
        self._train_log.add_listener(listener)

    def generation_phase(self, name: str, tokens: int | None = None) -> contextlib.AbstractContextManager[PhaseBlock]:
        """Mark a ``"prefill"`` or ``"decode"`` block of a generation loop (in a test or predict step):
        ``with sampler.generation_phase("decode") as block: ...; block.tokens = n``. The summary and the
        logged ``generation/<phase>_j_per_token`` give each phase's J and s per token, all processes
        (:class:`~lightning_green.energy.generation.GenerationPhases`)."""
        return self._generation_phases.phase(name, tokens)

    def set_comm_seconds(self, pop_exposed_comm_s: Callable[[], float] | None) -> None:
        """Where the ``comm`` phase's seconds come from (``ddp_green`` hands its counter in ``setup``)."""
        self._train_log.comm_seconds = pop_exposed_comm_s
