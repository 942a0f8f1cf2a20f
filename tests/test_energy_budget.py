"""EnergyBudget: plain calls of its Trainer-free parts, then fits on a 100 W simulated sensor and a clock
that moves only at batch starts (10 ms per training batch), so every figure is exact arithmetic."""

import json
import math
import warnings
from unittest.mock import Mock

import pytest
import torch
from helpers import FakeClock, logged, tiny_trainer
from lightning.pytorch import Callback
from lightning.pytorch.demos.boring_classes import BoringModel, RandomDataset
from torch.utils.data import DataLoader

from lightning_green import EnergyBudget, PowerSampler
from lightning_green.energy.budget import BUDGET, FORECAST, PLATEAU, BudgetPlan, ProgressPerKj, budget_j
from lightning_green.errors import MisconfiguredTrainer
from lightning_green.sensors import SimulatedSensor

STEP_S, VAL_S = 0.01, 0.01  # simulated seconds per training batch and per validation batch
WATTS = 100.0  # so 1 J per training step and per validation batch


class LongEpochs(BoringModel):
    """BoringModel with 2000 batches per epoch (no epoch end inside these fits) and a scripted ``val_loss``."""

    def __init__(self, val_loss=None):
        super().__init__()
        self.val_loss = val_loss

    def train_dataloader(self):
        return DataLoader(RandomDataset(32, 4000), batch_size=2)

    def validation_step(self, batch, batch_idx):
        if self.val_loss is not None:
            self.log("val_loss", self.val_loss(self.global_step), sync_dist=True)
        return super().validation_step(batch, batch_idx)


def mock_logger():
    logger = Mock()
    logger.log_dir = logger.save_dir = None
    return logger


def fit(tmp_path, budget, max_steps=2000, val_every=None, ckpt_path=None, model=None, power_w=WATTS, **kwargs):
    clock, logger = FakeClock(STEP_S, val_s=VAL_S), mock_logger()
    ps = PowerSampler(
        sensors=[SimulatedSensor(power_w, clock=clock)],
        interval_s=3600.0,
        summary_dir=str(tmp_path),
        print_summary=False,
        report_picture=False,
        clock=clock,
    )
    val = (
        {}
        if val_every is None
        else dict(val_check_interval=val_every, check_val_every_n_epoch=None, limit_val_batches=1)
    )
    trainer = tiny_trainer(
        max_steps=max_steps,
        log_every_n_steps=10,
        logger=logger,
        callbacks=[clock, ps, budget],
        default_root_dir=str(tmp_path),
        **val,
        **kwargs,
    )
    trainer.fit(model or LongEpochs(), ckpt_path=ckpt_path)
    return trainer, ps, logger


def summary_rows(ps):
    return {r["figure"]: r["value"] for r in ps.summary_by_stage["fit"]["sections"]["energy_budget"]["rows"]}


# ---------------------------------------------------------------------------- plain calls


def test_budget_in_joules_from_each_unit():
    assert budget_j(max_j=500) == 500.0
    assert budget_j(max_kwh=0.5) == 0.5 * 3.6e6
    # 95 g at 475 g/kWh and PUE 1.25: 0.16 kWh
    assert budget_j(max_gco2e=95.0, carbon_intensity_g_per_kwh=475.0, pue=1.25) == pytest.approx(0.16 * 3.6e6)


def test_plan_stops_on_the_step_the_window_rate_reaches_the_budget():
    plan = BudgetPlan(budget_j=100.0, forecast_after=1000)
    plan.start(step=0, total_steps=1000)
    plan.log_step(10, 20.0)  # 2 J per step: 80 J left is 40 steps
    assert (plan.stop_step, plan.reason) == (50, BUDGET)
    assert not plan.stops_at(49) and plan.stops_at(50)
    plan.log_step(20, 30.0)  # power halved: 70 J at 1 J per step
    assert plan.stop_step == 90
    plan.log_step(30, 101.0)  # a validation spent a lot: reached already
    assert plan.stop_step == 30


def test_plan_forecast_is_the_mean_rate_since_the_first_log_step_times_the_steps_left():
    plan = BudgetPlan(budget_j=1e6, forecast_after=0.2, on_forecast="stop")
    plan.start(step=0, total_steps=100)
    assert plan.log_step(10, 15.0) == {}  # the first log step: start-up, no rate yet
    assert plan.log_step(19, 24.0) == {}  # before 20 % of the fit
    assert plan.log_step(20, 25.0) == {"energy/forecast_j": 25.0 + 1.0 * 80}
    assert plan.reason == BUDGET  # a plan for the far budget, no forecast stop
    plan.budget_j = 100.0
    plan.log_step(30, 35.0)  # 35 + 70: over the budget
    assert (plan.stop_step, plan.reason, plan.forecast_over) == (30, FORECAST, True)
    unknown = BudgetPlan(budget_j=100.0, forecast_after=5)
    unknown.start(step=0, total_steps=math.inf)  # max_steps=-1 over an iterable dataset: no forecast
    assert unknown.log_step(10, 10.0) == unknown.log_step(20, 20.0) == {}


def test_plan_goes_on_from_a_checkpoint():
    spent = BudgetPlan(budget_j=100.0)
    spent.load_state_dict(BudgetPlan(budget_j=100.0).state_dict(spent_j=100.0))
    spent.start(step=70, total_steps=1000)
    assert (spent.stop_step, spent.reason) == (70, BUDGET)
    spent.load_state_dict(BudgetPlan(budget_j=100.0).state_dict(spent_j=99.99999, stopped_for=BUDGET))
    spent.start(step=70, total_steps=1000)
    assert (spent.stop_step, spent.reason) == (70, BUDGET)
    raised = BudgetPlan(budget_j=150.0)
    raised.load_state_dict({"spent_j": 100.0, "budget_j": 100.0, "forecast_j": math.nan, "stopped_for": BUDGET})
    raised.start(step=70, total_steps=1000)
    assert raised.stop_step is None
    raised.log_step(80, 110.0)  # 1 J per step since the resume
    assert raised.stop_step == 120


def test_progress_per_kj_counts_validations_below_the_rate_in_a_row():
    progress = ProgressPerKj("min", min_delta_per_kj=1.0, patience=2)
    assert math.isnan(progress.update(3.0, 0.0))
    assert progress.update(2.0, 500.0) == pytest.approx(2.0)  # 1.0 better over 0.5 kJ
    assert progress.update(1.9, 1000.0) == pytest.approx(0.2) and progress.wait == 1
    assert progress.update(1.0, 1500.0) == pytest.approx(1.8) and progress.wait == 0  # progress again
    assert progress.update(1.2, 2000.0) == pytest.approx(-0.4) and not progress.exhausted  # worse: below the rate
    progress.update(1.1, 2500.0)  # better than 1.2 but not than the best, 1.0
    assert progress.exhausted and progress.best == 1.0
    up = ProgressPerKj("max", min_delta_per_kj=0.0, patience=1)
    up.update(0.5, 0.0)
    assert up.update(0.6, 2000.0) == pytest.approx(0.05) and not up.exhausted


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "exactly one of `max_j`, `max_kwh` or `max_gco2e`, got none"),
        ({"max_j": 1.0, "max_kwh": 1.0}, "exactly one.*got max_j, max_kwh"),
        ({"max_j": 0.0}, "`max_j` must be a number > 0"),
        ({"max_kwh": float("inf")}, "`max_kwh` must be"),
        ({"max_gco2e": -1.0}, "`max_gco2e` must be"),
        ({"max_gco2e": 1.0, "carbon_intensity_g_per_kwh": 0.0}, "`max_gco2e` needs `carbon_intensity_g_per_kwh` > 0"),
        ({"max_j": 1.0, "on_forecast": "abort"}, "unknown `on_forecast` 'abort'; allowed: warn, stop, ignore"),
        ({"max_j": 1.0, "min_delta_per_kj": 0.1}, "`min_delta_per_kj` needs `monitor`"),
        ({"max_j": 1.0, "forecast_after": 1.5}, "`forecast_after` must be a share"),
        ({"max_j": 1.0, "forecast_after": 0}, "`forecast_after` must be an integer >= 1"),
        ({"max_j": 1.0, "monitor": "val_loss", "mode": "up"}, "unknown `mode` 'up'"),
        ({"max_j": 1.0, "monitor": "val_loss", "patience": 0}, "`patience` must be an integer >= 1"),
    ],
)
def test_bad_input_names_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EnergyBudget(**kwargs)


def test_no_power_sampler_fails_in_setup():
    with pytest.raises(MisconfiguredTrainer, match="EnergyBudget needs a PowerSampler"):
        tiny_trainer(callbacks=[EnergyBudget(max_j=1.0)]).fit(BoringModel())


# ---------------------------------------------------------------------------- fits


def test_stops_at_the_budget_with_less_than_a_step_past_it(tmp_path):
    budget = EnergyBudget(max_j=1000.0, on_forecast="ignore")
    trainer, ps, _ = fit(tmp_path, budget)
    rows = summary_rows(ps)
    # 1 J per step: the plan made at log step 10 stops at step 1000
    assert trainer.global_step == 1000
    assert rows["stopped_at_step"] == trainer.global_step and rows["stopped_by"] == BUDGET
    overshoot_j = rows["spent_j"] - 1000.0
    assert abs(overshoot_j) <= 1e-6  # the goal: <= one window (10 J) and <= 1 % of the budget (10 J)
    assert rows["spent_j"] == pytest.approx(ps.summary_by_stage["fit"]["cluster"]["total_j"], rel=1e-9)


def test_forecast_at_a_fifth_of_the_fit_is_within_two_percent(tmp_path):
    budget = EnergyBudget(max_j=1e6, forecast_after=0.2)
    trainer, ps, logger = fit(tmp_path, budget, max_steps=500, val_every=50)
    forecasts = dict(logged(logger, "energy/forecast_j"))
    assert min(forecasts) == 100  # from 20 % of 500 steps on
    actual_j = summary_rows(ps)["spent_j"]
    assert actual_j == pytest.approx(500 + 10)  # 500 steps, 10 validations of one batch
    # at step 100: 100 steps and the validation after step 50 spent; 91 J over the 90 steps since step 10
    assert forecasts[100] == pytest.approx(101 + 91 / 90 * 400)
    assert abs(forecasts[100] / actual_j - 1) <= 0.02  # 505.4 J against 510 J: 0.9 %
    assert trainer.global_step == 500 and budget.stopped is None


def test_forecast_over_the_budget_warns_once_or_stops(tmp_path):
    with pytest.warns(UserWarning, match=r"forecast to use 500 J \(at step 20 of 500.*over the 400 J budget"):
        trainer, _, _ = fit(tmp_path, EnergyBudget(max_j=400.0, forecast_after=20), max_steps=500)
    assert trainer.global_step == 400  # a warning only: the budget itself stops the fit
    trainer, _, _ = fit(tmp_path, EnergyBudget(max_j=400.0, forecast_after=20, on_forecast="stop"), max_steps=500)
    assert trainer.global_step == 20


def plateau_loss(step):
    """Down 0.01 per step until step 100, flat after it."""
    return 3.0 - 0.01 * min(step, 100)


def test_diminishing_returns_stop_within_patience_validations_of_the_plateau(tmp_path):
    budget = EnergyBudget(max_j=1e6, monitor="val_loss", min_delta_per_kj=1.0, patience=3)
    trainer, ps, logger = fit(tmp_path, budget, val_every=20, model=LongEpochs(plateau_loss))
    rates = dict(logged(logger, "efficiency/val_loss_delta_per_kj"))
    # 20 steps and one validation batch between validations: 21 J; 0.2 better before the plateau
    assert rates[40] == pytest.approx(0.2 / 0.021) and rates[100] == pytest.approx(0.2 / 0.021)
    assert rates[120] == rates[140] == rates[160] == 0.0
    # the validations after steps 120, 140 and 160 see no progress: the third stops the fit
    assert trainer.global_step == 160 and budget.stopped == {"step": 160, "reason": PLATEAU}
    assert summary_rows(ps)["stopped_by"] == PLATEAU


def test_resume_after_a_plateau_stop_keeps_the_patience_count(tmp_path):
    first = EnergyBudget(max_j=1e6, monitor="val_loss", min_delta_per_kj=1.0, patience=3)
    trainer, _, _ = fit(tmp_path, first, val_every=20, model=LongEpochs(plateau_loss))
    assert trainer.global_step == 160
    ckpt = str(tmp_path / "plateau.ckpt")
    trainer.save_checkpoint(ckpt)
    same = EnergyBudget(max_j=1e6, monitor="val_loss", min_delta_per_kj=1.0, patience=3)
    with pytest.warns(UserWarning, match="stopped for the diminishing returns; raise `patience`") as record:
        again, _, _ = fit(tmp_path, same, val_every=20, model=LongEpochs(plateau_loss), ckpt_path=ckpt)
    assert not [w for w in record if "never logged" in str(w.message)]  # it was, before the checkpoint
    assert again.global_step == 160 and same.progress.wait == 3
    longer = EnergyBudget(max_j=1e6, monitor="val_loss", min_delta_per_kj=1.0, patience=4)
    more, _, _ = fit(tmp_path, longer, val_every=20, model=LongEpochs(plateau_loss), ckpt_path=ckpt)
    assert more.global_step == 180 and longer.stopped == {"step": 180, "reason": PLATEAU}  # one more flat validation


def test_a_monitor_never_logged_warns_once(tmp_path):
    with pytest.warns(UserWarning, match="`monitor='val_acc'` was never logged") as record:
        fit(
            tmp_path,
            EnergyBudget(max_j=1e6, monitor="val_acc"),
            max_steps=40,
            val_every=10,
            model=LongEpochs(plateau_loss),
        )
    assert len([w for w in record if "never logged" in str(w.message)]) == 1


def test_resume_after_a_budget_stop_trains_no_step_unless_the_budget_is_raised(tmp_path):
    trainer, _, _ = fit(tmp_path, EnergyBudget(max_j=100.0))
    assert trainer.global_step == 100
    ckpt = str(tmp_path / "stopped.ckpt")
    trainer.save_checkpoint(ckpt)
    with pytest.warns(
        UserWarning,
        match=r"not training: the checkpoint had spent 100 J \(budget 100 J\) and stopped for the energy budget",
    ):
        again, ps, _ = fit(tmp_path, EnergyBudget(max_j=100.0), ckpt_path=ckpt)
    assert again.global_step == 100  # 0 steps trained
    assert summary_rows(ps)["stopped_by"] == BUDGET
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        raised, ps, _ = fit(tmp_path, EnergyBudget(max_j=150.0), ckpt_path=ckpt)
    assert not [w for w in record if "EnergyBudget" in str(w.message)]  # no "not training" now
    assert raised.global_step == 150 and summary_rows(ps)["spent_j"] == pytest.approx(150.0)


# ---------------------------------------------------------------------------- two processes


def power_by_rank(t_s):
    """100 W on rank 0, 150 W on rank 1: the ranks' own energy differs, the cluster's is the same on each."""
    return WATTS + 50.0 * torch.distributed.get_rank()


class RankLoss(LongEpochs):
    """Without ``sync_dist``: rank 0's val_loss is flat (alone it would stop at its first rate, after
    step 60), rank 1's falls 0.01 per step; their mean improves 0.005 per step."""

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", 3.0 - 0.01 * self.global_step * self.global_rank)
        return BoringModel.validation_step(self, batch, batch_idx)


class CountCollectives(Callback):
    """Counts the strategy's collectives per training step and per validation (last in the callbacks:
    after the others' hooks) and writes them, with how the rank stopped, to ``rank<r>.json``."""

    NAMES = ("reduce", "all_gather", "broadcast", "barrier", "reduce_boolean_decision")

    def __init__(self, folder):
        self.folder, self.calls, self.mark = folder, 0, 0
        self.per_step, self.per_validation = {}, {}

    def setup(self, trainer, pl_module, stage):
        for name in self.NAMES:
            setattr(trainer.strategy, name, self._counted(getattr(trainer.strategy, name)))

    def _counted(self, fn):
        def counted(*args, **kwargs):
            self.calls += 1
            return fn(*args, **kwargs)

        return counted

    def _take(self):
        taken, self.mark = self.calls - self.mark, self.calls
        return taken

    def on_train_start(self, trainer, pl_module):
        self._take()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.per_step[trainer.global_step] = self._take()

    def on_validation_end(self, trainer, pl_module):
        self.per_validation[trainer.global_step] = self._take()

    def on_train_end(self, trainer, pl_module):
        [budget] = [cb for cb in trainer.callbacks if isinstance(cb, EnergyBudget)]
        out = {"step": trainer.global_step, "per_step": self.per_step, "per_validation": self.per_validation}
        out.update(stopped=budget.stopped, spent_j=budget.spent_j)
        (self.folder / f"rank{trainer.global_rank}.json").write_text(json.dumps(out))


@pytest.mark.parametrize("strategy", ["ddp_spawn", "ddp_green_spawn"])
def test_two_processes_stop_on_the_same_step_with_no_collective_added_per_step(tmp_path, strategy):
    clock = FakeClock(STEP_S, val_s=VAL_S)
    ps = PowerSampler(
        sensors=[SimulatedSensor(power_by_rank, clock=clock)],
        interval_s=3600.0,
        summary_dir=str(tmp_path),
        print_summary=False,
        report_picture=False,
        clock=clock,
    )
    budget = EnergyBudget(max_j=250.0, monitor="val_loss", min_delta_per_kj=1.0, patience=1)
    trainer = tiny_trainer(
        max_steps=1000,
        devices=2,
        strategy=strategy,
        log_every_n_steps=10,
        val_check_interval=30,
        check_val_every_n_epoch=None,
        limit_val_batches=1,
        callbacks=[clock, ps, budget, CountCollectives(tmp_path)],
    )
    trainer.fit(RankLoss())
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # 2.5 J per step and per validation batch for the two; the mean val_loss improves 0.15 per 77.5 J
    # (1.9 per kJ): the budget stops both ranks, on the same step, not rank 0's flat loss after step 60
    # at log step 90, 230 J spent (90 steps, the validations after 30 and 60): 20 J left is 8 steps
    assert ranks[0]["step"] == ranks[1]["step"] == 98
    assert ranks[0]["stopped"] == ranks[1]["stopped"] == {"step": 98, "reason": BUDGET}
    # 98 steps and 3 validations make 252.5 J at the stop; Lightning validates once more when a fit stops early
    assert ranks[0]["spent_j"] == ranks[1]["spent_j"] == pytest.approx(98 * 2.5 + 4 * 2.5)
    for rank in ranks:
        # per step the PowerSampler's one sum per log step, nothing else: the budget adds no collective
        assert rank["per_step"] == {str(s): int(s % 10 == 0) for s in range(1, 99)}
        # per validation the budget's one sum (monitored value and energy)
        assert rank["per_validation"] == {"30": 1, "60": 1, "90": 1, "98": 1}


def test_without_a_sensor_the_budget_says_it_cannot_act(tmp_path):
    ps = PowerSampler(
        sensors="rapl", rapl_root=str(tmp_path / "no_powercap"), print_summary=False, report_picture=False
    )
    budget = EnergyBudget(max_j=1.0)
    trainer = tiny_trainer(max_steps=6, log_every_n_steps=2, default_root_dir=tmp_path, callbacks=[ps, budget])
    with pytest.warns(UserWarning, match="EnergyBudget: no sensor measures energy"):
        trainer.fit(BoringModel())
    # nothing measured: the fit is not stopped by a budget it cannot see
    assert trainer.global_step == 6 and ps.summary["no_sensor"]
