"""Energy carried between stages of one process is labelled ``carried``, never ``restored``: only a
checkpoint restores energy. Every clock is injected (a stage's seconds are its batches), so the
joules are exact: 100 W x 0.5 s = 50 J a batch."""

from __future__ import annotations

import json

import pytest
from helpers import FakeClock, SleepyModel, tiny_trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_green import EfficiencyLogger, PowerSampler
from lightning_green import compare as cmp
from lightning_green import run_summary as rs
from lightning_green import summary as S
from lightning_green.energy.session import EnergySession
from lightning_green.sensors import SimulatedSensor
from lightning_green.summary import sensor_rows

BATCH_J = 100.0 * 0.5


class StageClock(FakeClock):
    """:class:`helpers.FakeClock` that moves at validation and test batches too."""

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.t += self.batch_s

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.t += self.batch_s


def sampler(tmp_path, clock, print_summary=False):
    return PowerSampler(
        sensors=[SimulatedSensor(100.0, clock=clock)],
        interval_s=3600.0,
        summary_dir=str(tmp_path),
        print_summary=print_summary,
        report_picture=False,
        clock=clock,
    )


def figures(summary: dict) -> tuple:
    (sensor,) = summary["sensors"]
    return (
        summary["stage_energy_j"],
        summary["carried_j"],
        summary["restored_j"],
        summary["cumulative_energy_j"],
        sensor["stage_energy_j"],
        sensor["carried_j"],
        sensor["restored_j"],
        sensor["cumulative_energy_j"],
    )


def adds_up(summary: dict) -> None:
    assert summary["cumulative_energy_j"] == pytest.approx(
        summary["stage_energy_j"] + summary["carried_j"] + summary["restored_j"]
    )
    assert summary["stage_mean_power_w"] * summary["duration_s"] == pytest.approx(
        summary["stage_energy_j"]
    )  # J = W x s


def test_validate_then_fit_labels_the_validate_energy_carried_not_restored(tmp_path, capsys):
    clock = StageClock(batch_s=0.5)
    ps = sampler(tmp_path, clock, print_summary=True)
    trainer = tiny_trainer(max_steps=4, callbacks=[clock, ps], limit_val_batches=2)
    trainer.validate(SleepyModel(step_s=0.0), verbose=False)
    trainer.fit(SleepyModel(step_s=0.0))
    out = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    written = json.load(open(tmp_path / "energy_summary_fit.json"))
    for s in (ps.summary_by_stage["fit"], written):
        assert s["restored_j"] == 0.0 and s["sensors"][0]["restored_j"] == 0.0  # no checkpoint: nothing restored
        # fit: 4 batches (200 J); validate's 2 batches (100 J) carried, nothing restored
        assert figures(s) == pytest.approx((200.0, 100.0, 0.0, 300.0, 200.0, 100.0, 0.0, 300.0))
        adds_up(s)
    assert "duration, this stage: 2 s energy, this stage: 200 J [source: simulated]" in out
    assert "energy carried from earlier stages: 100 J [source: simulated]" in out
    assert "energy restored from checkpoint: 0 J [source: simulated]" in out
    # compare/show and the picture: the fit's own energy, not validate's too
    rows = {f.figure: f.value for f in cmp.figures(rs.load_summary(tmp_path / "energy_summary_fit.json"))}
    assert rows["energy, this stage"] == pytest.approx(200.0)
    assert rows["energy sim, this stage"] == pytest.approx(200.0)
    assert rows["mean power, this stage"] == pytest.approx(100.0)
    assert rows["energy carried from earlier stages"] == pytest.approx(100.0)


def test_fit_test_fit_carries_each_earlier_stage(tmp_path):
    clock = StageClock(batch_s=0.5)
    ps = sampler(tmp_path, clock)
    tiny_trainer(max_steps=4, callbacks=[clock, ps], limit_test_batches=3).fit(SleepyModel(step_s=0.0))
    trainer = tiny_trainer(max_steps=2, callbacks=[clock, ps], limit_test_batches=3)
    trainer.test(SleepyModel(step_s=0.0), verbose=False)
    test = json.load(open(tmp_path / "energy_summary_test.json"))
    assert test["restored_j"] == 0.0 and test["sensors"][0]["restored_j"] == 0.0
    assert figures(test) == pytest.approx((3 * BATCH_J, 200.0, 0.0, 350.0, 3 * BATCH_J, 200.0, 0.0, 350.0))
    trainer.fit(SleepyModel(step_s=0.0))
    fit = json.load(open(tmp_path / "energy_summary_fit.json"))
    assert fit["restored_j"] == 0.0 and fit["sensors"][0]["restored_j"] == 0.0
    assert figures(fit) == pytest.approx((100.0, 350.0, 0.0, 450.0, 100.0, 350.0, 0.0, 450.0))
    for s in (test, fit):
        adds_up(s)
    assert fit["stage_energy_j"] == pytest.approx(100.0) and test["stage_energy_j"] == pytest.approx(150.0)


def first_fit_with_checkpoint(tmp_path, clock, ps):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    tiny_trainer(max_steps=4, callbacks=[clock, ps, ckpt], enable_checkpointing=True).fit(SleepyModel(step_s=0.0))
    return tmp_path / "ckpt" / "epoch=0-step=4.ckpt"  # saved at step 4's end: 4 batches, 200 J


def test_a_checkpoint_resume_is_restored_not_carried(tmp_path, capsys):
    clock = StageClock(batch_s=0.5)
    path = first_fit_with_checkpoint(tmp_path / "first", clock, sampler(tmp_path / "first", clock))
    ps = sampler(tmp_path, clock, print_summary=True)  # a new process's sampler
    trainer = tiny_trainer(max_steps=6, callbacks=[clock, ps])
    trainer.fit(SleepyModel(step_s=0.0), ckpt_path=path)
    out = " ".join(capsys.readouterr().out.split())
    fit = json.load(open(tmp_path / "energy_summary_fit.json"))
    assert figures(fit) == pytest.approx((100.0, 0.0, 200.0, 300.0, 100.0, 0.0, 200.0, 300.0))
    adds_up(fit)
    assert "energy, this stage: 100 J [source: simulated]" in out
    assert "energy restored from checkpoint: 200 J [source: simulated]" in out
    rows = {f.figure: f.value for f in cmp.figures(fit)}
    assert rows["energy, this stage"] == pytest.approx(100.0)  # a resumed fit's own, apart from what it restored
    assert rows["energy restored from checkpoint"] == pytest.approx(200.0)
    assert rows["mean power, this stage"] == pytest.approx(100.0)  # its own joules over its own seconds
    # a test after the resumed fit: the fit's own energy is carried, the checkpoint's is still restored
    trainer.test(SleepyModel(step_s=0.0), verbose=False)
    test = json.load(open(tmp_path / "energy_summary_test.json"))
    assert figures(test)[:4] == pytest.approx((test["stage_energy_j"], 100.0, 200.0, 300.0 + test["stage_energy_j"]))


def test_resume_in_the_same_process_keeps_what_it_carried(tmp_path):
    """fit, then fit(ckpt_path) of a checkpoint of that fit, with the same sampler: the checkpoint's
    energy was measured by this process and is carried already; it is neither restored nor counted twice."""
    clock = StageClock(batch_s=0.5)
    ps = sampler(tmp_path, clock)
    path = first_fit_with_checkpoint(tmp_path, clock, ps)
    tiny_trainer(max_steps=8, callbacks=[clock, ps]).fit(SleepyModel(step_s=0.0), ckpt_path=path)
    assert figures(ps.summary_by_stage["fit"]) == pytest.approx((200.0, 200.0, 0.0, 400.0, 200.0, 200.0, 0.0, 400.0))


def test_testing_an_earlier_checkpoint_of_this_process_never_takes_energy_back(tmp_path):
    """fit 8 steps with a checkpoint at step 4, then test(ckpt_path=step 4) in the same process: the
    process has spent the fit's 400 J whatever checkpoint it tests; a new process restores the 200 J."""
    clock = StageClock(batch_s=0.5)
    ps = sampler(tmp_path, clock)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    trainer = tiny_trainer(max_steps=8, callbacks=[clock, ps, ckpt], enable_checkpointing=True, limit_test_batches=2)
    trainer.fit(SleepyModel(step_s=0.0))
    path = tmp_path / "ckpt" / "epoch=0-step=4.ckpt"
    trainer.test(SleepyModel(step_s=0.0), ckpt_path=path, verbose=False)
    test = ps.summary_by_stage["test"]
    assert figures(test)[:4] == pytest.approx((100.0, 400.0, 0.0, 500.0))  # 2 test batches; the fit carried
    adds_up(test)
    other = sampler(tmp_path / "other", clock)  # a new sampler, as in a new process: the checkpoint is restored
    tiny_trainer(callbacks=[clock, other], limit_test_batches=2).test(
        SleepyModel(step_s=0.0), ckpt_path=path, verbose=False
    )
    assert figures(other.summary_by_stage["test"])[:4] == pytest.approx((100.0, 0.0, 200.0, 300.0))


def test_a_checkpoint_loaded_by_validate_is_not_applied_to_a_later_fit_from_scratch(tmp_path):
    clock = StageClock(batch_s=0.5)
    first = [sampler(tmp_path / "first", clock), EfficiencyLogger()]
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    tiny_trainer(max_steps=4, callbacks=[clock, *first, ckpt], enable_checkpointing=True).fit(SleepyModel(step_s=0.0))
    path = tmp_path / "ckpt" / "epoch=0-step=4.ckpt"
    ps, eff = sampler(tmp_path, clock), EfficiencyLogger()
    trainer = tiny_trainer(max_steps=6, callbacks=[clock, ps, eff], limit_val_batches=2)
    trainer.validate(SleepyModel(step_s=0.0), ckpt_path=path, verbose=False)
    assert "train_energy_j" not in eff.results  # validate's own figures only
    trainer.fit(SleepyModel(step_s=0.0))  # from scratch: no ckpt_path
    # 6 batches of 1 sample at 50 J each: nothing of the checkpoint's 4 samples and 200 J
    assert eff.results["train_samples"] == 6 and eff.results["train_energy_j"] == pytest.approx(300.0)
    trainer.test(SleepyModel(step_s=0.0), verbose=False)  # each summary lists its own stage's figures
    efficiency = {
        stage: {r["figure"] for r in ps.summary_by_stage[stage]["sections"]["efficiency"]["rows"]}
        for stage in ("fit", "test")
    }
    assert "train_energy_j" in efficiency["fit"] and "test_epi_j" not in efficiency["fit"]
    assert "test_epi_j" in efficiency["test"] and not any(
        f.startswith("train_") or f.startswith("eer") for f in efficiency["test"]
    )
    assert "train_energy_j" in eff.results and "test_epi_j" in eff.results  # results keep every stage's


def test_session_keeps_restored_apart_from_carried():
    clock = FakeClock()
    session = EnergySession(interval_s=3600.0, clock=clock)
    session.start([SimulatedSensor(10.0, clock=clock)])
    clock.t += 3.0
    session.finish()  # 30 J, carried into the next stage
    session.start([SimulatedSensor(10.0, clock=clock)])
    clock.t += 1.0
    session.read_now()
    (row,) = sensor_rows(session.meter, session.restored_j())
    assert (row["stage_energy_j"], row["carried_j"], row["restored_j"], row["cumulative_energy_j"]) == pytest.approx(
        (10.0, 30.0, 0.0, 40.0)
    )
    session.restore({"sim": 100.0, "gone": 5.0, "__unattributed__": 1.0})  # replaces the carried 30 J
    clock.t += 1.0
    session.finish()
    (row,) = sensor_rows(session.meter, session.restored_j())
    assert (row["stage_energy_j"], row["carried_j"], row["restored_j"], row["cumulative_energy_j"]) == pytest.approx(
        (20.0, 0.0, 100.0, 120.0)
    )
    assert session.unattributed_j == pytest.approx(6.0)
    session.start([SimulatedSensor(10.0, clock=clock)])  # the stage after: the restored 100 J stays restored
    clock.t += 1.0
    session.finish()
    sensors = sensor_rows(session.meter, session.restored_j())
    assert (sensors[0]["carried_j"], sensors[0]["restored_j"], sensors[0]["cumulative_energy_j"]) == pytest.approx(
        (20.0, 100.0, 130.0)
    )
    summary = S.build_summary(
        stage="test",
        status="finished",
        started_at="",
        duration_s=1.0,
        rank=0,
        sensors=sensors,
        unattributed_j=6.0,
        cluster={},
        skipped=[],
        sections={},
        trace={},
    )
    assert (
        summary["stage_energy_j"],
        summary["carried_j"],
        summary["restored_j"],
        summary["cumulative_energy_j"],
    ) == pytest.approx((10.0, 20.0, 106.0, 136.0))


def test_an_older_summary_without_carried_j_shows_its_own_stage_and_cumulative(capsys):
    old = {
        "stage": "fit",
        "status": "finished",
        "duration_s": 2.0,
        "energy_j": 300.0,
        "energy_this_run_j": 200.0,
        "restored_j": 100.0,
        "sources": ["simulated"],
        "sensors": [{"name": "sim", "source": "simulated", "energy_j": 300.0, "energy_this_run_j": 200.0}],
    }
    S.render(old)
    out = " ".join(capsys.readouterr().out.split())
    assert "energy, this stage: 200 J" in out and "energy cumulative: 300 J" in out
    # the file did not say how much of the 100 J was carried and how much restored
    assert "energy carried from earlier stages: - J" in out and "energy restored from checkpoint: - J" in out
