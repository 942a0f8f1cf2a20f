"""What a user trial found (issue 22): a stopped fit lost its efficiency figures, a run without a
sensor logged zeros as if measured, and two PowerSamplers in one Trainer met a generic Lightning
error. Simulated sensors on an injected clock: every figure is exact arithmetic."""

from __future__ import annotations

import json
import os
import signal
import warnings
from unittest.mock import Mock

import pytest
from helpers import FakeClock, SleepyModel, tiny_trainer
from lightning.pytorch import Callback

from lightning_green import EfficiencyLogger, PowerSampler
from lightning_green.callbacks.stage_summaries import NO_SENSOR_NOTE
from lightning_green.errors import MisconfiguredTrainer
from lightning_green.sensors import SimulatedSensor

WATTS = 100.0
BATCH_S = 0.5
#: BoringModel: one Linear(32, 2), batches of one sample
N_PARAMS = 66


def mock_logger():
    logger = Mock()
    logger.log_dir = None
    logger.save_dir = None
    return logger


def logged_keys(logger):
    keys = set()
    for call in logger.log_metrics.call_args_list:
        metrics = call.kwargs.get("metrics", call.args[0] if call.args else {})
        keys.update(metrics)
    return keys


def efficiency_of(summary):
    return {row["figure"]: row for row in summary["sections"]["efficiency"]["rows"]}


@pytest.mark.parametrize("efficiency_first", [False, True], ids=["sampler_first", "efficiency_first"])
def test_an_interrupted_fit_keeps_the_efficiency_figures_of_the_steps_that_ran(tmp_path, efficiency_first):
    # Ctrl+C in training_step at step 15: Lightning skips on_train_end, calls on_exception on the
    # callbacks in list order, then exits
    clock = FakeClock(batch_s=BATCH_S)
    ps = PowerSampler(
        sensors=[SimulatedSensor(WATTS, clock=clock)],
        interval_s=3600.0,
        print_summary=False,
        summary_dir=str(tmp_path),
        report_picture=False,
        clock=clock,
    )
    clock.reads = ps.session
    eff = EfficiencyLogger(carbon_intensity_g_per_kwh=360.0)
    callbacks = [clock, eff, ps] if efficiency_first else [clock, ps, eff]
    with pytest.raises(SystemExit):
        tiny_trainer(default_root_dir=tmp_path, max_steps=50, log_every_n_steps=50, callbacks=callbacks).fit(
            SleepyModel(0.0, interrupt_at=15)
        )
    written = json.loads((tmp_path / "energy_summary_fit.json").read_text())
    assert written["status"] == "interrupted (KeyboardInterrupt)"
    # 16 batches started (the 16th raised in its training step), each 0.5 s at 100 W: 800 J
    train_j = WATTS * BATCH_S * 16
    rows = efficiency_of(written)
    assert rows["train_energy_j"]["value"] == pytest.approx(train_j)
    assert rows["train_samples"]["value"] == 16
    assert rows["eer_j_per_param"]["value"] == pytest.approx(train_j / N_PARAMS)
    assert rows["samples_per_j"]["value"] == pytest.approx(16 / train_j)
    assert rows["carbon_gco2e"]["value"] == pytest.approx(train_j / 3.6e6 * 360.0)
    assert all(row["complete"] is False for row in rows.values() if row["source"] != "setting")
    assert rows["train_energy_j"]["scope"] == "all processes"
    assert eff.fit_stop is not None and eff.fit_stop.step == 15
    assert eff.results["train_energy_j"] == pytest.approx(train_j)


def test_a_sigterm_keeps_the_figures_too(tmp_path):
    class Sigterm(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            # Lightning's handler notes the signal; its loop raises SIGTERMException after this batch
            if trainer.global_step == 5:
                os.kill(os.getpid(), signal.SIGTERM)

    clock = FakeClock(batch_s=BATCH_S)
    ps = PowerSampler(
        sensors=[SimulatedSensor(WATTS, clock=clock)], interval_s=3600.0, print_summary=False, clock=clock
    )
    clock.reads = ps.session
    with pytest.raises(SystemExit):
        tiny_trainer(default_root_dir=tmp_path, max_steps=50, callbacks=[clock, ps, EfficiencyLogger(), Sigterm()]).fit(
            SleepyModel(0.0)
        )
    summary = ps.summary_by_stage["fit"]
    assert summary["status"] == "interrupted (SIGTERMException)"
    rows = efficiency_of(summary)
    assert rows["train_samples"]["value"] == 5
    assert rows["train_energy_j"]["value"] == pytest.approx(WATTS * BATCH_S * 5)
    assert rows["train_energy_j"]["complete"] is False


def test_a_finished_fit_has_complete_figures(tmp_path):
    clock = FakeClock(batch_s=BATCH_S)
    ps = PowerSampler(
        sensors=[SimulatedSensor(WATTS, clock=clock)], interval_s=3600.0, print_summary=False, clock=clock
    )
    eff = EfficiencyLogger()
    tiny_trainer(default_root_dir=tmp_path, max_steps=4, callbacks=[clock, ps, eff]).fit(SleepyModel(0.0))
    rows = efficiency_of(ps.summary_by_stage["fit"])
    assert "complete" not in rows["train_energy_j"]
    assert rows["train_energy_j"]["value"] == pytest.approx(WATTS * BATCH_S * 4)
    assert eff.fit_stop is None


def test_an_exception_after_training_ended_leaves_the_figures_complete(tmp_path):
    class FailsAtTestStart(SleepyModel):
        def on_test_start(self):
            raise RuntimeError("boom")

    clock = FakeClock(batch_s=BATCH_S)
    ps = PowerSampler(
        sensors=[SimulatedSensor(WATTS, clock=clock)], interval_s=3600.0, print_summary=False, clock=clock
    )
    eff = EfficiencyLogger()
    trainer = tiny_trainer(default_root_dir=tmp_path, max_steps=4, callbacks=[clock, ps, eff])
    model = FailsAtTestStart(0.0)
    trainer.fit(model)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.test(model, verbose=False)
    assert eff.fit_stop is None
    assert "complete" not in efficiency_of(ps.summary_by_stage["fit"])["train_energy_j"]


def test_no_sensor_logs_no_figure_warns_once_and_the_summary_says_so(tmp_path):
    # sensors="rapl" on a machine without powercap: an empty sysfs root
    ps = PowerSampler(
        sensors="rapl", rapl_root=str(tmp_path / "no_powercap"), print_summary=False, summary_dir=str(tmp_path)
    )
    logger = mock_logger()
    trainer = tiny_trainer(
        default_root_dir=tmp_path,
        max_steps=6,
        log_every_n_steps=2,
        logger=logger,
        callbacks=[ps, EfficiencyLogger(targets={"x": 1.0})],
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(SleepyModel(0.0))
        trainer.test(SleepyModel(0.0), verbose=False)
    said = [str(w.message) for w in caught if "no sensor" in str(w.message)]
    assert len(said) == 1 and "no energy is measured" in said[0]
    measured = ("energy/", "power/", "power_trace/", "efficiency/", "carbon/")
    assert [k for k in logged_keys(logger) if k.startswith(measured)] == []
    assert ps.measuring is False
    for stage in ("fit", "test"):
        written = json.loads((tmp_path / f"energy_summary_{stage}.json").read_text())
        assert written["no_sensor"] is True
        assert written["partial"][0] == NO_SENSOR_NOTE
        assert "efficiency" not in written["sections"] and "targets" not in written["sections"]


def test_a_run_with_a_sensor_says_no_sensor_false(tmp_path):
    ps = PowerSampler(sensors=[SimulatedSensor(WATTS)], interval_s=0.01, print_summary=False)
    tiny_trainer(default_root_dir=tmp_path, max_steps=2, callbacks=[ps]).fit(SleepyModel(0.0))
    assert ps.measuring is True
    assert ps.summary["no_sensor"] is False
    assert NO_SENSOR_NOTE not in ps.summary["partial"]


@pytest.mark.parametrize(
    "second", [{"sensors": [SimulatedSensor(1.0)]}, {"sensors": [SimulatedSensor(2.0, name="other")]}]
)
def test_two_power_samplers_in_one_trainer_get_one_clear_error(tmp_path, second):
    first = PowerSampler(sensors=[SimulatedSensor(1.0)], print_summary=False)
    # Lightning's construction-time check of stateful callbacks does not pre-empt ours
    trainer = tiny_trainer(
        default_root_dir=tmp_path, max_steps=2, callbacks=[first, PowerSampler(print_summary=False, **second)]
    )
    with pytest.raises(MisconfiguredTrainer, match=r"2 PowerSampler callbacks; it takes one"):
        trainer.fit(SleepyModel(0.0))


def test_a_rank_without_a_sensor_still_measures_with_the_others(tmp_path):
    # two ranks, one host-level sensor: rank 1 reads none, yet energy is measured, so both ranks log
    # (their collectives must match) and the summary does not say "no sensor"
    ps = PowerSampler(
        sensors=[SimulatedSensor(10.0, name="host_sim", host_level=True, domain="cpu")],
        interval_s=0.02,
        summary_dir=str(tmp_path),
        print_summary=False,
        report_picture=False,
    )
    trainer = tiny_trainer(
        default_root_dir=tmp_path,
        max_steps=6,
        log_every_n_steps=2,
        devices=2,
        strategy="ddp_spawn",
        callbacks=[ps, EfficiencyLogger()],
    )
    trainer.fit(SleepyModel(step_s=0.0))
    written = json.loads((tmp_path / "energy_summary_fit.json").read_text())
    assert written["no_sensor"] is False
    assert efficiency_of(written)["train_samples"]["value"] == 6 * 2
