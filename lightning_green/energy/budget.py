"""An energy budget for a fit, Trainer-free: what was spent, the forecast, progress per kJ, the stop step.

* :func:`budget_j`: the budget in joules from ``max_j``, ``max_kwh`` or ``max_gco2e``.
* :class:`BudgetPlan`: at each log step, from every process's energy spent since the start of fit,
  the step at which the fit stops (the budget, or an overrun forecast) and the forecast itself.
* :class:`ProgressPerKj`: the monitored metric's improvement per kJ between validations, and the
  patience count of validations in a row below ``min_delta_per_kj`` (EarlyStopping measured in energy).

No collective here: the callers hand in the figures every process shares (sums that were made at a
log step anyway). Every process given the same figures plans the same stop step, so the processes
stop together without talking in between.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from lightning_green.checks import check_choice, check_int, check_number, is_finite_number
from lightning_green.energy import metrics as M

FORECAST_ACTIONS = ("warn", "stop", "ignore")
MODES = ("min", "max")

#: Why a fit stopped, as the summary and the log line say it.
BUDGET = "energy budget"
FORECAST = "forecast over the budget"
PLATEAU = "diminishing returns"


def budget_j(
    max_j: float | None = None,
    max_kwh: float | None = None,
    max_gco2e: float | None = None,
    carbon_intensity_g_per_kwh: float = M.DEFAULT_CARBON_INTENSITY_G_PER_KWH,
    pue: float = 1.0,
) -> float:
    """The budget in joules from exactly one of ``max_j``, ``max_kwh`` or ``max_gco2e`` (grams of
    CO2-equivalent, converted at ``carbon_intensity_g_per_kwh`` × ``pue``, as ``carbon/gco2e`` is).

    Raises:
        ValueError: none or several budgets given, a budget that is not a finite number > 0, or
            ``max_gco2e`` with a carbon intensity of 0 (naming the argument).
    """
    given = {"max_j": max_j, "max_kwh": max_kwh, "max_gco2e": max_gco2e}
    named = [name for name, value in given.items() if value is not None]
    if len(named) != 1:
        raise ValueError(
            f"EnergyBudget needs exactly one of `max_j`, `max_kwh` or `max_gco2e`, got {', '.join(named) or 'none'}"
        )
    name = named[0]
    value = check_number(name, given[name], 0.0, strict=True)
    if name == "max_j":
        return value
    if name == "max_kwh":
        return value * M.J_PER_KWH
    M.check_carbon_args(carbon_intensity_g_per_kwh, pue)
    if carbon_intensity_g_per_kwh == 0:
        raise ValueError("`max_gco2e` needs `carbon_intensity_g_per_kwh` > 0 (gCO2e per kWh), got 0")
    return value / (carbon_intensity_g_per_kwh * pue) * M.J_PER_KWH


def check_forecast_after(value: Any) -> float | int:
    """A share of the fit in ``(0, 1]`` (a float) or a step count ``>= 1`` (an int)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return check_int("forecast_after", value, 1)
    if not is_finite_number(value) or not 0 < value <= 1:
        raise ValueError(
            f"`forecast_after` must be a share of the fit in (0, 1] (float) or a step count >= 1 (int), got {value!r}"
        )
    return float(value)


class BudgetPlan:
    """When a fit stops for its energy budget, decided at log steps from every process's energy.

    :meth:`log_step` takes the energy spent since the start of fit (all processes, validation
    included, what a checkpoint had spent too) at a log step, and plans :attr:`stop_step`: the step
    at which the energy of the last logging window, per step, reaches the budget (that step itself
    when it is reached already). Between log steps the caller only compares the global step with
    :attr:`stop_step`: one integer compare per step, and the same step on every process that was
    given the same figures. With steady power the fit then stops less than one step's energy past
    the budget; the next log step corrects a plan that a change of power made wrong.

    From ``forecast_after`` on (a share of the fit's steps, or a step count), :meth:`log_step` also
    projects the fit's total: spent + the mean J per step since the first log step × the steps left.
    ``on_forecast="stop"`` stops at a log step whose forecast is over the budget.

    Args:
        budget_j: the budget (J, > 0).
        forecast_after: a share of the fit's steps in (0, 1], or a step count >= 1.
        on_forecast: ``"warn"``, ``"stop"`` or ``"ignore"``; what :meth:`log_step` does with a forecast
            over the budget (a warning is the caller's: :attr:`forecast_over` says when one is due).

    Example::

        plan = BudgetPlan(budget_j=1000.0, forecast_after=0.2, on_forecast="warn")
        plan.start(step=0, total_steps=500)
        plan.log_step(step=10, spent_j=10.0)      # {"energy/forecast_j": ...} once past 20 % of the fit
        if plan.stops_at(step):                     # each step, between log steps
            ...
    """

    def __init__(self, budget_j: float, forecast_after: float | int = 0.1, on_forecast: str = "warn") -> None:
        self.budget_j = check_number("budget_j", budget_j, 0.0, strict=True)
        self.forecast_after = check_forecast_after(forecast_after)
        self.on_forecast = check_choice("on_forecast", on_forecast, FORECAST_ACTIONS)
        # what a checkpoint had spent
        self.restored_j = 0.0
        # the budget that stopped the checkpoint's fit, if one did
        self.stopped_by_j: float | None = None
        # at the last log step, restored included
        self.spent_j = 0.0
        self.stop_step: int | None = None
        # why stop_step is planned
        self.reason: str | None = None
        self.forecast_j = math.nan
        # the first step with a forecast
        self.forecast_from = math.inf
        self.total_steps = math.inf
        # (step, spent_j) of the last log step, or of the start
        self._last: tuple[int, float] = (0, 0.0)
        # of the first log step of this fit
        self._first: tuple[int, float] | None = None

    @property
    def forecast_over(self) -> bool:
        """The last forecast is over the budget."""
        return self.forecast_j > self.budget_j

    def start(self, step: int, total_steps: float) -> None:
        """A fit (or its resumed part) trains from ``step`` to ``total_steps`` (``inf``: unknown, no
        forecast). A checkpoint that had spent the budget, or that its budget stopped (and the budget
        is not raised), or whose forecast stopped it and is still over the budget, plans a stop at ``step``."""
        self.total_steps = total_steps
        if isinstance(self.forecast_after, int):
            self.forecast_from = self.forecast_after
        elif math.isfinite(total_steps):
            self.forecast_from = math.ceil(self.forecast_after * total_steps)
        else:
            self.forecast_from = math.inf
        self.spent_j = self.restored_j
        self._last = (step, self.restored_j)
        self._first = None
        self.stop_step = self.reason = None
        if self.restored_j >= self.budget_j or (self.stopped_by_j is not None and self.budget_j <= self.stopped_by_j):
            self.stop_step = step
            self.reason = BUDGET
        elif self.on_forecast == "stop" and self.forecast_over:
            self.stop_step = step
            self.reason = FORECAST

    def stops_at(self, step: int) -> bool:
        """Whether the fit stops at ``step`` (a planned stop step reached)."""
        return self.stop_step is not None and step >= self.stop_step

    def log_step(self, step: int, spent_j: float) -> dict[str, float]:
        """At log step ``step`` every process has spent ``spent_j`` since the start of fit (restored
        included): plan the stop step; returns ``{"energy/forecast_j": J}`` once forecasts begin."""
        last_step, last_j = self._last
        self.spent_j = spent_j
        self._last = (step, spent_j)
        if step > last_step:
            self._plan_budget(step, spent_j, (spent_j - last_j) / (step - last_step))
        if self._first is None:
            # the mean J per step is taken from here: no start-up in it
            self._first = (step, spent_j)
            return {}
        first_step, first_j = self._first
        if step < self.forecast_from or step <= first_step or not math.isfinite(self.total_steps):
            return {}
        j_per_step = (spent_j - first_j) / (step - first_step)
        self.forecast_j = spent_j + j_per_step * max(0.0, self.total_steps - step)
        if self.forecast_over and self.on_forecast == "stop" and not self.stops_at(step):
            self.stop_step = step
            self.reason = FORECAST
        return {"energy/forecast_j": self.forecast_j}

    def _plan_budget(self, step: int, spent_j: float, j_per_step: float) -> None:
        if self.reason not in (None, BUDGET):
            # a stop planned for another reason stands
            return
        if spent_j >= self.budget_j:
            self.stop_step = step
            self.reason = BUDGET
        elif j_per_step > 0:
            # a millionth of a step of slack: rounding in the energy figures must not cost a whole step
            steps_left = math.ceil((self.budget_j - spent_j) / j_per_step - 1e-6)
            self.stop_step = step + steps_left
            self.reason = BUDGET

    def state_dict(self, spent_j: float, stopped_for: str | None = None) -> dict[str, Any]:
        """What goes on after a resume: ``spent_j`` (every process's, now), the last forecast, and why
        the fit stopped (``stopped_for``, None while it runs): a fit stopped by its budget stays
        stopped until the budget is raised, however close to it the figures rounded."""
        return {
            "spent_j": float(spent_j),
            "budget_j": self.budget_j,
            "forecast_j": self.forecast_j,
            "stopped_for": stopped_for,
        }

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        """Go on from a checkpoint's :meth:`state_dict`; None: from nothing (a fit that starts afresh)."""
        if state is None:
            self.restored_j = 0.0
            self.forecast_j = math.nan
            self.stopped_by_j = None
            return
        self.restored_j = float(state["spent_j"])
        self.forecast_j = float(state["forecast_j"])
        self.stopped_by_j = float(state["budget_j"]) if state["stopped_for"] == BUDGET else None


class ProgressPerKj:
    """The monitored metric's improvement per kJ between validations, and when it has dried up.

    Each :meth:`update` takes the metric's value at a validation and the energy spent so far (J, all
    processes). The rate is the improvement over the best value before it (down for ``"min"``, up
    for ``"max"``; negative when worse) per kJ spent since the previous validation. A rate below
    ``min_delta_per_kj`` counts one; a rate at or above it sets the count back to 0. The count
    reaching ``patience`` is :attr:`exhausted`.

    Args:
        mode: ``"min"`` or ``"max"``.
        min_delta_per_kj: the least improvement per kJ that counts as progress (>= 0).
        patience: validations in a row below it that stop the fit (>= 1).

    Example::

        progress = ProgressPerKj("min", min_delta_per_kj=0.01, patience=3)
        rate = progress.update(val_loss, spent_j)   # NaN at the first validation
        if progress.exhausted: ...
    """

    def __init__(self, mode: str = "min", min_delta_per_kj: float = 0.0, patience: int = 3) -> None:
        self.mode = check_choice("mode", mode, MODES)
        self.min_delta_per_kj = check_number("min_delta_per_kj", min_delta_per_kj, 0.0)
        self.patience = check_int("patience", patience, 1)
        self.best = math.nan
        # the energy spent at the previous validation
        self.last_j = math.nan
        self.wait = 0

    @property
    def exhausted(self) -> bool:
        return self.wait >= self.patience

    def update(self, value: float, spent_j: float) -> float:
        """The improvement per kJ of ``value`` since the previous validation (NaN at the first, or when
        no energy was spent between them, or for a NaN value, which counts nothing)."""
        if math.isnan(value):
            return math.nan
        rate = math.nan
        if not math.isnan(self.best) and spent_j > self.last_j:
            gain = self.best - value if self.mode == "min" else value - self.best
            rate = gain / ((spent_j - self.last_j) / 1000.0)
            self.wait = self.wait + 1 if rate < self.min_delta_per_kj else 0
        if math.isnan(self.best) or (value < self.best if self.mode == "min" else value > self.best):
            self.best = value
        self.last_j = spent_j
        return rate

    def state_dict(self) -> dict[str, float | int]:
        return {"best": self.best, "last_j": self.last_j, "wait": self.wait}

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        """Go on from a checkpoint's :meth:`state_dict`; None: from nothing."""
        if state is None:
            self.best = math.nan
            self.last_j = math.nan
            self.wait = 0
            return
        self.best = float(state["best"])
        self.last_j = float(state["last_j"])
        self.wait = int(state["wait"])
