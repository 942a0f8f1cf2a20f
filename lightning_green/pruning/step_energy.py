"""Training energy of a pruned fit, without a Trainer: the energy of the fit less its evaluations, and
J per optimizer step over a window before the first pruning event and over the last steps of fit.

:class:`TrainingEnergy` and :class:`StepEnergyWindows` take readings as plain numbers;
:class:`PruningEnergy` reads them from anything with ``measured_now_j()``, ``evaluation_energy_j`` and
``sources()`` (a ``PowerSampler``) and gives the callback one call per hook.
"""

from __future__ import annotations

import math
from typing import Any, Protocol


class TrainingEnergy:
    """Training energy of one ``fit`` call: this process's joules from the start of training, less the
    validation loops of fit and the blocks measured apart as evaluation (``measure_evaluation``: the
    pruning report's forward passes, QAT's end-of-fit evaluation). Energy restored from a checkpoint
    is added as ``restored_j``.

    Args:
        restored_j: training energy of the run before the checkpoint this fit resumed from.
    """

    def __init__(self, restored_j: float = 0.0) -> None:
        self.restored_j = restored_j
        self.validation_j = 0.0
        self.started = False
        self._start_j = 0.0
        self._start_evaluation_j = 0.0
        self._validation_start_j: float | None = None

    def start(self, energy_j: float, evaluation_j: float) -> None:
        """At the start of training: the cumulative readings the figures count from."""
        self.started = True
        self._start_j = energy_j
        self._start_evaluation_j = evaluation_j
        self.validation_j = 0.0
        self._validation_start_j = None

    def validation_started(self, energy_j: float) -> None:
        """A validation loop of fit begins."""
        self._validation_start_j = energy_j

    def validation_ended(self, energy_j: float) -> None:
        """A validation loop of fit ends: its energy is not training energy."""
        if self._validation_start_j is not None:
            self.validation_j += energy_j - self._validation_start_j
            self._validation_start_j = None

    def energy_j(self, energy_j: float, evaluation_j: float) -> float:
        """Training energy so far (restored included), from the cumulative readings now."""
        evaluations = evaluation_j - self._start_evaluation_j
        return self.restored_j + energy_j - self._start_j - self.validation_j - evaluations


class StepEnergyWindows:
    """J per optimizer step over the last ``window_steps`` steps before the first pruning event, and over
    the last ``window_steps`` steps of fit (after the last event).

    The caller reads energy only when ``step >= next_step`` (one int compare on other steps) and passes
    it to :meth:`mark` at the end of a batch, after any pruning; and to :meth:`first_event` just before
    the first event prunes. The window before starts after step 1 at the earliest (the first batch
    traces the model), so a first event at step 1 or earlier has no window before it. The window after
    starts after the last event (at the earliest) and ends at the last optimizer step marked.

    Args:
        window_steps: steps in each window (>= 1).
        first_event_step: optimizer step of the first event.
        last_event_step: optimizer step of the last event.
        total_steps: optimizer steps the fit will run (``inf`` when unknown: no window after).
        start_step: the fit's global step when training starts (a resumed fit's is the checkpoint's).
    """

    def __init__(
        self, window_steps: int, first_event_step: int, last_event_step: int, total_steps: float, start_step: int = 0
    ) -> None:
        self.window_steps = window_steps
        self.first_event_step = first_event_step
        after_begin = total_steps - window_steps
        self.after_begin_step = math.inf if math.isinf(after_begin) else max(int(after_begin), last_event_step)
        before_begin = max(first_event_step - window_steps, 1, start_step + 1)
        #: the next optimizer step at which :meth:`mark` wants a reading
        self.next_step: float = before_begin if before_begin < first_event_step else self.after_begin_step
        self.before: tuple[int, float, int, float] | None = None
        self.after: tuple[int, float, int, float] | None = None
        self._before_begin: tuple[int, float] | None = None
        self._after_begin: tuple[int, float] | None = None

    def mark(self, step: int, energy_j: float) -> None:
        """A reading at the end of a batch whose optimizer step count is ``step`` (``>= next_step``)."""
        if step < self.first_event_step:
            self._before_begin = (step, energy_j)
            self.next_step = self.after_begin_step
        elif step < self.after_begin_step:
            self.next_step = self.after_begin_step
        elif self._after_begin is None:
            self._after_begin = (step, energy_j)
            self.next_step = step + 1
        else:
            self.after = (*self._after_begin, step, energy_j)
            self.next_step = step + 1

    def first_event(self, step: int, energy_j: float) -> None:
        """A reading just before the first event prunes, at optimizer step ``step``."""
        if self._before_begin is not None and self.before is None:
            self.before = (*self._before_begin, step, energy_j)

    @property
    def j_per_step_before(self) -> float | None:
        """J per optimizer step in the window before the first event; None when there was none."""
        return per_step(self.before)

    @property
    def j_per_step_after(self) -> float | None:
        """J per optimizer step in the last window of fit; None when there was none."""
        return per_step(self.after)


def per_step(window: tuple[int, float, int, float] | None) -> float | None:
    """``(begin step, begin J, end step, end J)`` -> J per step, or None."""
    if window is None or window[2] <= window[0]:
        return None
    return (window[3] - window[1]) / (window[2] - window[0])


class EnergyReader(Protocol):
    """What :class:`PruningEnergy` reads of a ``PowerSampler`` (its public interface)."""

    @property
    def evaluation_energy_j(self) -> float: ...

    def measured_now_j(self) -> float: ...

    def sources(self, all_processes: bool = False) -> str: ...


class PruningEnergy:
    """Training energy and J per step of a pruned fit, read from ``reader`` at the start of training,
    at validation loops, at the window steps of :class:`StepEnergyWindows`, at the first event and at
    the end. Idle (every call a no-op) until :meth:`start` gets a reader.

    Args:
        window_steps: steps in each window of J per step.
    """

    def __init__(self, window_steps: int) -> None:
        self.window_steps = window_steps
        self.reader: EnergyReader | None = None
        self.training = TrainingEnergy()
        self.windows: StepEnergyWindows | None = None
        #: the optimizer step at which :meth:`at_step` wants a reading (inf: none)
        self.next_step: float = math.inf

    def start(self, reader: EnergyReader | None, steps: list[int], total_steps: float, start_step: int) -> None:
        """At the start of training: ``reader`` None (no measuring sampler) leaves it idle."""
        self.reader = reader
        self.windows = None
        self.next_step = math.inf
        if reader is None:
            return
        self.training.start(reader.measured_now_j(), reader.evaluation_energy_j)
        self.windows = StepEnergyWindows(self.window_steps, steps[0], steps[-1], total_steps, start_step)
        self.next_step = self.windows.next_step

    @property
    def active(self) -> bool:
        """Between :meth:`start` with a reader and :meth:`finish`."""
        return self.reader is not None and self.training.started

    def energy_j(self) -> float:
        """Training energy so far (restored included); only while :attr:`active`."""
        assert self.reader is not None
        return self.training.energy_j(self.reader.measured_now_j(), self.reader.evaluation_energy_j)

    def validation_started(self) -> None:
        if self.active:
            assert self.reader is not None
            self.training.validation_started(self.reader.measured_now_j())

    def validation_ended(self) -> None:
        if self.active:
            assert self.reader is not None
            self.training.validation_ended(self.reader.measured_now_j())

    def at_step(self, step: int) -> None:
        """At the end of a batch, after any pruning, when ``step >= next_step``."""
        assert self.windows is not None
        self.windows.mark(step, self.energy_j())
        self.next_step = self.windows.next_step

    def first_event(self, step: int) -> None:
        """Just before the first event prunes."""
        if self.windows is not None and self.active:
            self.windows.first_event(step, self.energy_j())

    def finish(self, params_before: int, params_after: int) -> dict[str, Any]:
        """At the end of fit: ``train_energy_j``, its source, J per step before/after (when measured) and
        the two EERs; {} when idle."""
        if not self.active:
            return {}
        assert self.reader is not None and self.windows is not None
        energy_j = self.energy_j()
        self.training.started = False
        figures: dict[str, Any] = {"train_energy_j": energy_j, "train_energy_source": self.reader.sources()}
        for when, value in (("before", self.windows.j_per_step_before), ("after", self.windows.j_per_step_after)):
            if value is not None:
                figures[f"train_j_per_step_{when}"] = value
        figures["eer_j_per_initial_param"] = energy_j / params_before
        figures["eer_j_per_final_param"] = energy_j / params_after
        return figures
