"""EnergyBudget: stops a fit at an energy budget, on an overrun forecast, or when progress per kJ dries up."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_green import run_summary as rs
from lightning_green.callbacks.power import PowerSampler, find_power_sampler
from lightning_green.callbacks.trainer_steps import global_step_reader
from lightning_green.checks import check_name
from lightning_green.distributed import distributed, reduce_sum
from lightning_green.energy import metrics as M
from lightning_green.energy.budget import PLATEAU, BudgetPlan, ProgressPerKj, budget_j
from lightning_green.energy.session import Reduce
from lightning_green.errors import MisconfiguredTrainer
from lightning_green.log_queue import log_metrics
from lightning_green.messages import WarnOnce

__all__ = ["EnergyBudget"]

SECTION = "energy budget"


def _or_none(value: float) -> float | None:
    """None for NaN (no figure), so the summary's JSON holds no NaN."""
    return None if math.isnan(value) else value


def _figures(metrics: dict[str, float], energy_j: float) -> dict[str, float]:
    """A listener's ``finish`` for figures made at the log step already."""
    return metrics


class EnergyBudget(Callback):
    r"""Stop a fit when its energy reaches a budget, when it is forecast to overrun it, or when the
    monitored metric's improvement per kJ dries up (EarlyStopping measured in energy).

    Needs a :class:`PowerSampler` in the same Trainer. The energy counted is every process's since the
    start of fit, validation included (what ``efficiency/energy_to_target`` counts), plus what a
    resumed checkpoint had spent. It is known at the PowerSampler's log steps, from the sum over
    processes it makes there anyway: each log step plans the step at which the last window's J per
    step reaches the budget, and every process stops at that step (``trainer.should_stop``, at a step
    boundary) with no collective in between. With steady power a fit stops less than one step's
    energy past the budget; a validation loop or a change of power between log steps is corrected at
    the next log step. Lightning runs one more validation loop when a fit stops early (as it does for
    ``EarlyStopping``); ``ModelCheckpoint`` and the summary run as usual. The summary gets an
    ``energy budget`` section, and a line says at which step the budget stopped the fit.

    Logged metrics (through ``trainer.loggers``; energy of all processes):
        - ``energy/forecast_j`` (J): at log steps from ``forecast_after`` on, the fit's projected total,
          energy spent + the mean J per step since the first log step × the steps left.
        - ``efficiency/<monitor>_delta_per_kj`` (metric units per kJ): with ``monitor``, at each validation
          of fit from the second on, the improvement over the best value before it per kJ spent since the
          previous validation (negative when worse).

    Collectives: none per training step. With more than one process, one sum of one number at train
    start, train end and checkpoints, and with ``monitor`` one sum of three numbers per validation
    (the monitored value is averaged over processes, so they decide alike).

    Args:
        max_j: the budget in joules.
        max_kwh: the budget in kWh.
        max_gco2e: the budget in grams of CO2-equivalent, at ``carbon_intensity_g_per_kwh`` × ``pue``.
            Give exactly one of the three.
        carbon_intensity_g_per_kwh: gCO2e per kWh for ``max_gco2e`` (EfficiencyLogger's default, 475).
        pue: data-centre power usage effectiveness for ``max_gco2e`` (>= 1.0).
        forecast_after: when forecasts begin: a share of the fit's steps in (0, 1] (a float, of
            ``max_steps`` or what ``max_epochs`` makes) or a step count >= 1 (an int).
        on_forecast: ``"warn"`` (once, with the forecast and the budget), ``"stop"`` (at the log step
            whose forecast is over the budget) or ``"ignore"`` (log it only).
        monitor: a metric logged in validation (``"val_loss"``) to watch for diminishing returns; None: off.
        mode: ``"min"`` or ``"max"``: which way the monitored metric improves.
        min_delta_per_kj: the least improvement per kJ that counts as progress (>= 0; default 0 with
            ``monitor``). Needs ``monitor``.
        patience: validations in a row below ``min_delta_per_kj`` that stop the fit (>= 1).

    Raises:
        ValueError: none or several of ``max_j``/``max_kwh``/``max_gco2e``, a budget that is not a finite
            number > 0, an unknown ``on_forecast`` or ``mode``, a bad ``forecast_after`` or ``patience``,
            ``min_delta_per_kj`` without ``monitor``.
        MisconfigurationException: in ``setup``, when the Trainer has no ``PowerSampler`` (a ``RuntimeError``).

    Example::

        budget = EnergyBudget(max_kwh=0.5, monitor="val_loss", min_delta_per_kj=0.01)
        trainer = Trainer(callbacks=[PowerSampler(), budget])
    """

    def __init__(
        self,
        max_j: float | None = None,
        max_kwh: float | None = None,
        max_gco2e: float | None = None,
        carbon_intensity_g_per_kwh: float = M.DEFAULT_CARBON_INTENSITY_G_PER_KWH,
        pue: float = 1.0,
        forecast_after: float | int = 0.1,
        on_forecast: str = "warn",
        monitor: str | None = None,
        mode: str = "min",
        min_delta_per_kj: float | None = None,
        patience: int = 3,
    ) -> None:
        super().__init__()
        self.budget_j = budget_j(max_j, max_kwh, max_gco2e, carbon_intensity_g_per_kwh, pue)
        self.plan = BudgetPlan(self.budget_j, forecast_after, on_forecast)
        if min_delta_per_kj is not None and monitor is None:
            raise ValueError("`min_delta_per_kj` needs `monitor`, the metric whose improvement per kJ it bounds")
        self.monitor = check_name("monitor", monitor) if monitor is not None else None
        progress = ProgressPerKj(mode, 0.0 if min_delta_per_kj is None else min_delta_per_kj, patience)
        self.progress = progress if self.monitor is not None else None
        self.rate_key = f"efficiency/{self.monitor}_delta_per_kj" if self.monitor is not None else None
        #: ``{"step", "reason"}`` once the running (or last) fit is told to stop; None until then
        self.stopped: dict[str, Any] | None = None
        # every process's energy since the start of fit (restored included), last known
        self.spent_j = 0.0
        self._sampler: PowerSampler | None = None
        self._trainer: Trainer | None = None
        self._step: Callable[[], int] | None = None
        self._warn = WarnOnce()
        # this process's energy_now_j at the start of fit
        self._start_local_j = 0.0
        # every process's, summed at train start
        self._start_total_j = 0.0
        # from on_fit_start to on_train_end: checkpoints are read now
        self._in_fit = False
        # a checkpoint loaded after on_fit_start (FSDP, DeepSpeed)
        self._restored_late = False
        self._pending_state: dict | None = None
        self._seen_monitor = False

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._sampler = find_power_sampler(trainer)
        if self._sampler is None:
            raise MisconfiguredTrainer(
                "EnergyBudget needs a PowerSampler in the same Trainer: "
                "Trainer(callbacks=[PowerSampler(), EnergyBudget(max_kwh=1.0)])"
            )
        if stage == "fit" and not trainer.log_every_n_steps:
            raise MisconfiguredTrainer(
                "EnergyBudget decides at the PowerSampler's log steps, but `log_every_n_steps` is 0; set it >= 1"
            )
        self._trainer = trainer
        self._in_fit = False

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start_fit()

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start_training(trainer)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.plan.stops_at(self._step()):
            self._stop(trainer, self.plan.reason)

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.progress is not None and trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._check_progress(trainer)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._end_training(trainer)

    # ------------------------------------------------------------------ checkpoints
    @override
    def state_dict(self) -> dict[str, Any]:
        """The energy spent (every process's: a collective when the process group is up, as Lightning's
        checkpointing is), the forecast, the patience count and why the fit stopped, if it did."""
        if self._in_fit:
            self.spent_j = self._spent_now_j(self._trainer)
        return {
            "plan": self.plan.state_dict(self.spent_j, self.stopped["reason"] if self.stopped else None),
            "progress": self.progress.state_dict() if self.progress is not None else None,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending_state = dict(state_dict)
        # loaded after on_fit_start (FSDP, DeepSpeed): so was the PowerSampler's energy, which the
        # start of fit must then hold (taken again at train start, when every callback has loaded)
        self._restored_late = self._in_fit

    # ------------------------------------------------------------------ helpers
    def _start_fit(self) -> None:
        self._in_fit = True
        self._start_local_j = self._sampler.energy_now_j()
        self.stopped = None
        self._seen_monitor = False

    def _start_training(self, trainer: Trainer) -> None:
        if self._restored_late:
            self._start_local_j = self._sampler.energy_now_j()
            self._restored_late = False
        self._apply_state()
        self._start_total_j = reduce_sum(trainer, [self._start_local_j])[0]
        self.spent_j = self.plan.restored_j
        self.plan.start(trainer.global_step, trainer.estimated_stepping_batches)
        self._step = global_step_reader(trainer)
        self._sampler.add_log_step_listener(self._log_step)
        if not self._sampler.measuring:
            rank_zero_warn(
                "EnergyBudget: no sensor measures energy on any process, so the budget, the forecast and the "
                "progress per kJ cannot act in this fit: it runs to its own end"
            )
        if self.plan.stops_at(trainer.global_step) or (self.progress is not None and self.progress.exhausted):
            reason = self.plan.reason if self.plan.stop_step is not None else PLATEAU
            remedy = "raise `patience` or lower `min_delta_per_kj`" if reason == PLATEAU else "raise the budget"
            rank_zero_warn(
                f"EnergyBudget: not training: the checkpoint had spent {self.spent_j:.6g} J (budget "
                f"{self.budget_j:.6g} J) and stopped for the {reason}; {remedy} to go on"
            )
            self._stop(trainer, reason)

    def _apply_state(self) -> None:
        state = self._pending_state or {}
        self._pending_state = None
        self.plan.load_state_dict(state.get("plan"))
        if self.progress is not None:
            self.progress.load_state_dict(state.get("progress"))

    def _log_step(self, step: int, reduce: Reduce) -> Callable[[float], Mapping[str, float]]:
        """The PowerSampler's log-step listener (training thread). One process: its energy now is every
        process's. More: the figures wait for the window's sum, which the PowerSampler makes on the
        training thread before it calls the returned function (no collective of this callback's)."""
        if self._trainer.world_size == 1:
            metrics = self._at_log_step(step, self.plan.restored_j + self._sampler.energy_now_j() - self._start_total_j)
            return functools.partial(_figures, metrics)
        return functools.partial(self._after_window, step)

    def _after_window(self, step: int, energy_j: float) -> dict[str, float]:
        return self._at_log_step(step, self.plan.restored_j + self._sampler.logged_total_j - self._start_total_j)

    def _at_log_step(self, step: int, spent_j: float) -> dict[str, float]:
        self.spent_j = spent_j
        metrics = self.plan.log_step(step, spent_j)
        if self.plan.forecast_over and self.plan.on_forecast == "warn":
            self._warn(
                "forecast",
                f"EnergyBudget: the fit is forecast to use {self.plan.forecast_j:.6g} J (at step {step} of "
                f"{self.plan.total_steps:g}, {spent_j:.6g} J spent), over the {self.budget_j:.6g} J budget",
            )
        if self.plan.stops_at(step):
            self._stop(self._trainer, self.plan.reason)
        return metrics

    def _check_progress(self, trainer: Trainer) -> None:
        value = trainer.callback_metrics.get(self.monitor)
        seen = value is not None
        self._seen_monitor = self._seen_monitor or seen
        local = [self._sampler.energy_now_j() - self._start_local_j, float(value) if seen else 0.0, float(seen)]
        since_start_j, value_sum, n_seen = reduce_sum(trainer, local)
        if n_seen == 0:
            return
        self.spent_j = self.plan.restored_j + since_start_j
        rate = self.progress.update(value_sum / n_seen, self.spent_j)
        log_metrics(trainer, {self.rate_key: rate})
        if self.progress.exhausted:
            self._stop(trainer, PLATEAU)

    def _stop(self, trainer: Trainer, reason: str) -> None:
        trainer.should_stop = True
        if self.stopped is None:
            self.stopped = {"step": trainer.global_step, "reason": reason}

    def _spent_now_j(self, trainer: Trainer) -> float:
        """Every process's energy since the start of fit, restored included; with more than one process
        and no process group (after ``ddp_green``'s teardown) the last figure known."""
        local_j = self._sampler.energy_now_j() - self._start_local_j
        if trainer.world_size == 1:
            return self.plan.restored_j + local_j
        if distributed(trainer):
            return self.plan.restored_j + reduce_sum(trainer, [local_j])[0]
        return self.spent_j

    def _end_training(self, trainer: Trainer) -> None:
        self.spent_j = self._spent_now_j(trainer)
        self._in_fit = False
        # a best value restored from a checkpoint was seen by the fit's earlier part
        if self.progress is not None and not self._seen_monitor and math.isnan(self.progress.best):
            logged = ", ".join(sorted(trainer.callback_metrics)) or "none"
            rank_zero_warn(
                f"EnergyBudget: `monitor={self.monitor!r}` was never logged in a validation of this fit, so "
                f"progress per kJ was not checked; check the name. Metrics logged: {logged}"
            )
        if self.stopped is not None:
            rank_zero_info(
                f"EnergyBudget: stopped by the {self.stopped['reason']} at step {self.stopped['step']}: "
                f"{self.spent_j:.6g} J spent, {self.budget_j:.6g} J budget"
            )
        self._sampler.add_summary_section(SECTION, self._summary_rows(), section_id=rs.ENERGY_BUDGET)

    def _summary_rows(self) -> list[dict]:
        source = self._sampler.sources(all_processes=True)
        stopped = self.stopped or {}
        rows = [
            {"figure": "budget_j", "value": self.budget_j, "source": "setting"},
            {"figure": "spent_j", "value": self.spent_j, "source": source},
            {"figure": "forecast_j", "value": _or_none(self.plan.forecast_j), "source": source},
            {"figure": "stopped_at_step", "value": stopped.get("step"), "source": ""},
            {"figure": "stopped_by", "value": stopped.get("reason", "not stopped"), "source": ""},
        ]
        if self.progress is not None:
            rows.append({"figure": f"best_{self.monitor}", "value": _or_none(self.progress.best), "source": ""})
        return rows
