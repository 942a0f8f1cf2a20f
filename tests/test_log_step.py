"""A training log step: the window ends on the training thread, its figures are built where they can be.

For a single process without phases or a progress bar, the figures of a logging window (PowerSampler's
and its listeners', EfficiencyLogger's among them) are built on the log thread from what the log step
noted; otherwise in place. Either way they are the same, exact on injected clocks.
"""

import functools
import threading

import pytest
from conftest import sampler_threads
from helpers import FakeClock, SleepyModel, tiny_trainer
from lightning.pytorch import Callback
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_green import EfficiencyLogger, PowerSampler
from lightning_green.energy.loops import TrainingLog
from lightning_green.energy.session import EnergySession, LogWindow
from lightning_green.log_queue import LogQueue
from lightning_green.sensors import SimulatedSensor

WATTS, BATCH_S = 100.0, 0.02


class RecordingTensorBoard(TensorBoardLogger):
    """A TensorBoardLogger (so written by the log thread) that records ``(thread, metrics, step)``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def log_metrics(self, metrics, step=None):
        self.calls.append((threading.current_thread().name, dict(metrics), step))

    def values(self, key):
        return [(step, metrics[key]) for _, metrics, step in self.calls if key in metrics]


def fit_recording(tmp_path, monkeypatch, max_steps=25, **ps_kwargs):
    clock = FakeClock(batch_s=BATCH_S)
    ps = PowerSampler(
        sensors=[SimulatedSensor(WATTS, clock=clock)], interval_s=3600.0, print_summary=False, clock=clock, **ps_kwargs
    )
    # a reading at every batch end: newer readings arrive after each log step
    clock.reads = ps.session
    built_on = []
    close = TrainingLog.close

    def spy(train_log, end):
        built_on.append(threading.current_thread().name)
        return close(train_log, end)

    monkeypatch.setattr(TrainingLog, "close", spy)
    logger = RecordingTensorBoard(tmp_path)
    tiny_trainer(
        max_steps=max_steps, log_every_n_steps=10, logger=logger, callbacks=[clock, ps, EfficiencyLogger()]
    ).fit(SleepyModel(step_s=0.0))
    return ps, logger, built_on


@pytest.mark.parametrize("progress_bar", [False, True], ids=["off_thread", "in_place"])
def test_window_figures_are_exact_whether_built_on_the_log_thread_or_in_place(tmp_path, monkeypatch, progress_bar):
    ps, logger, built_on = fit_recording(tmp_path, monkeypatch, progress_bar=progress_bar)
    thread = "lightning_green-log:PowerSampler"
    # steps 10 and 20 (in place for the progress bar), then the last, partial window at 25 (no progress bar there)
    assert built_on == ["MainThread" if progress_bar else thread] * 2 + [thread]
    assert logger.values("energy/total_j") == [(s, pytest.approx(WATTS * BATCH_S * s)) for s in (10, 20, 25)]
    assert logger.values("energy/step_j") == [(s, pytest.approx(WATTS * BATCH_S)) for s in (10, 20, 25)]
    assert logger.values("power/sim_w") == [(s, pytest.approx(WATTS)) for s in (10, 20, 25)]
    # EfficiencyLogger logs at the log steps only: BoringModel's batches hold 1 sample
    assert logger.values("efficiency/samples_per_j") == [
        (s, pytest.approx(10 / (WATTS * BATCH_S * 10))) for s in (10, 20)
    ]
    n_params = sum(p.numel() for p in SleepyModel().parameters())
    assert logger.values("efficiency/eer_j_per_param") == [
        (s, pytest.approx(WATTS * BATCH_S * s / n_params)) for s in (10, 20)
    ]
    assert not sampler_threads()


def test_a_window_ended_on_a_log_step_keeps_its_moment_when_built_later():
    clock = FakeClock(batch_s=0.0)
    # the thread never reads, the test does; a history of 2 readings: the end's moment is soon out of it
    session = EnergySession(interval_s=3600.0, history=2, clock=clock)
    session.start([SimulatedSensor(WATTS, clock=clock)])
    window = LogWindow(session)
    window.reset()
    clock.t += 2.0
    session.read_now()
    end = window.end(steps=4)
    # the training thread goes on before the figures are built: a newer reading, a validation loop
    clock.t += 3.0
    session.read_now()
    window.validation_started()
    clock.t += 1.0
    session.read_now()
    window.validation_ended()
    metrics = window.close(list, end)
    assert metrics["energy/total_j"] == pytest.approx(200.0)  # at the end, not at the newest reading (600 J)
    assert metrics["energy/step_j"] == pytest.approx(200.0 / 4)
    assert metrics["power/sim_w"] == pytest.approx(WATTS)
    rest = window.close(
        list, window.end(steps=5)
    )  # the next window: 5 steps and the validation second, which is not step energy
    assert rest["energy/total_j"] == pytest.approx(600.0)
    assert rest["energy/step_j"] == pytest.approx(300.0 / 5)
    session.finish()


def test_figures_are_built_off_the_training_thread_only_for_one_process_without_phases():
    session = EnergySession(interval_s=3600.0, clock=FakeClock(batch_s=0.0))
    session.start([SimulatedSensor(WATTS, clock=session.clock)])
    cases = {(None, 1): True, (None, 2): False, ("host", 1): False}
    for (phase_timing, world_size), expected in cases.items():
        training = TrainingLog(session, trace_points=4, phase_timing=phase_timing)
        training.start(every=10, global_step=0, world_size=world_size)
        assert training.closes_off_thread is expected, (phase_timing, world_size)
    session.finish()


class ListensAtTrainStart(Callback):
    """Adds a listener to the PowerSampler at each train start, as the docs say, twice (once counts)."""

    def __init__(self, ps):
        self.ps, self.steps = ps, []

    def on_train_start(self, trainer, pl_module):
        self.ps.add_log_step_listener(self.listener)
        self.ps.add_log_step_listener(self.listener)

    def listener(self, step, reduce):
        self.steps.append(step)
        return lambda energy_j: {"mine/energy_j": energy_j}


def test_a_log_step_listener_is_called_once_per_log_step_and_forgotten_by_the_next_stage(tmp_path):
    clock = FakeClock(batch_s=BATCH_S)
    ps = PowerSampler(
        sensors=[SimulatedSensor(WATTS, clock=clock)], interval_s=3600.0, print_summary=False, clock=clock
    )
    clock.reads = ps.session
    listens = ListensAtTrainStart(ps)
    logger = RecordingTensorBoard(tmp_path)
    tiny_trainer(max_steps=25, log_every_n_steps=10, logger=logger, callbacks=[clock, ps, listens]).fit(
        SleepyModel(step_s=0.0)
    )
    assert listens.steps == [10, 20]  # log steps only: not the last, partial window
    assert logger.values("mine/energy_j") == [
        (10, pytest.approx(WATTS * BATCH_S * 10)),
        (20, pytest.approx(WATTS * BATCH_S * 20)),
    ]
    # the same PowerSampler in a new Trainer without the listener's callback: nothing of it is logged
    again = RecordingTensorBoard(tmp_path, name="again")
    tiny_trainer(max_steps=20, log_every_n_steps=10, logger=again, callbacks=[clock, ps]).fit(SleepyModel(step_s=0.0))
    assert listens.steps == [10, 20] and not again.values("mine/energy_j")
    assert [step for step, _ in again.values("energy/total_j")] == [10, 20]


class ValidationClock(FakeClock):
    """The FakeClock, moving ``val_s`` at each validation batch too: validation loops spend energy."""

    def __init__(self, batch_s, val_s):
        super().__init__(batch_s)
        self.val_s = val_s

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.t += self.val_s


def test_efficiency_figures_built_after_the_fit_use_the_counts_of_their_log_step(tmp_path, monkeypatch):
    """Validation inside fit every 5 steps, and the log thread drains only at the end of training: each
    window's figures must come from the samples and validation energy noted at its log step."""
    val_s, val_batches = 0.01, 2
    clock = ValidationClock(batch_s=BATCH_S, val_s=val_s)
    # nothing is built before LogQueue.stop at train end
    monkeypatch.setattr(LogQueue, "__init__", functools.partialmethod(LogQueue.__init__, drain_every_s=3600.0))
    ps = PowerSampler(
        sensors=[SimulatedSensor(WATTS, clock=clock)], interval_s=3600.0, print_summary=False, clock=clock
    )
    clock.reads = ps.session
    logger = RecordingTensorBoard(tmp_path)
    trainer = tiny_trainer(
        max_steps=20,
        log_every_n_steps=10,
        logger=logger,
        callbacks=[clock, ps, EfficiencyLogger()],
        val_check_interval=5,
        limit_val_batches=val_batches,
    )
    trainer.fit(SleepyModel(step_s=0.0))
    val_j = WATTS * val_s * val_batches  # one validation loop
    # at step 10 one validation ran (after step 5; the one after step 10 comes after its log step), at 20 three
    assert logger.values("energy/total_j") == [
        (10, pytest.approx(WATTS * BATCH_S * 10 + val_j)),
        (20, pytest.approx(WATTS * BATCH_S * 20 + 3 * val_j)),
    ]
    assert logger.values("energy/step_j") == [(s, pytest.approx(WATTS * BATCH_S)) for s in (10, 20)]
    assert logger.values("efficiency/samples_per_j") == [
        (s, pytest.approx(10 / (WATTS * BATCH_S * 10))) for s in (10, 20)
    ]
    n_params = sum(p.numel() for p in SleepyModel().parameters())
    assert logger.values("efficiency/eer_j_per_param") == [
        (s, pytest.approx(WATTS * BATCH_S * s / n_params)) for s in (10, 20)
    ]
