"""``PowerSampler(progress_bar=True)``: energy so far and power in Lightning's progress bar, TQDM or Rich."""

from __future__ import annotations

import pytest
from helpers import FakeClock, SleepyModel, tiny_trainer
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

from lightning_green import PowerSampler
from lightning_green.sensors import SimulatedSensor


def fit_with_bar(tmp_path, bar, enabled: bool):
    clock = FakeClock(0.01)
    ps = PowerSampler(
        sensors=[SimulatedSensor(200.0, clock=clock)],
        interval_s=3600.0,
        print_summary=False,
        summary_dir=str(tmp_path),
        progress_bar=enabled,
        clock=clock,
    )
    clock.reads = ps.session
    model = SleepyModel(step_s=0.0)
    trainer = tiny_trainer(max_steps=8, log_every_n_steps=4, enable_progress_bar=True, callbacks=[clock, ps, bar])
    trainer.fit(model)
    return trainer, model, ps


@pytest.mark.parametrize("bar", [TQDMProgressBar, RichProgressBar], ids=["tqdm", "rich"])
def test_energy_and_power_in_the_progress_bar_when_enabled(tmp_path, bar):
    trainer, model, ps = fit_with_bar(tmp_path, bar(), enabled=True)
    shown = trainer.progress_bar_callback.get_metrics(trainer, model)
    assert {"energy_kj", "power_w"} <= shown.keys()
    assert trainer.progress_bar_metrics["energy_kj"] == pytest.approx(float(shown["energy_kj"]))
    # the last logging window's figures: energy so far at step 8 (8 batches of 0.01 s at 200 W) and the
    # window's power
    assert trainer.progress_bar_metrics["energy_kj"] == pytest.approx(8 * 0.01 * 200.0 / 1000.0)
    assert trainer.progress_bar_metrics["power_w"] == pytest.approx(200.0)


@pytest.mark.parametrize("bar", [TQDMProgressBar, RichProgressBar], ids=["tqdm", "rich"])
def test_nothing_in_the_progress_bar_by_default(tmp_path, bar):
    trainer, model, _ = fit_with_bar(tmp_path, bar(), enabled=False)
    shown = trainer.progress_bar_callback.get_metrics(trainer, model)
    assert not {"energy_kj", "power_w"} & shown.keys()
    assert not {"energy_kj", "power_w"} & trainer.progress_bar_metrics.keys()


def test_progress_bar_argument_is_checked():
    with pytest.raises(TypeError, match="`progress_bar` must be True or False"):
        PowerSampler(progress_bar="yes")
