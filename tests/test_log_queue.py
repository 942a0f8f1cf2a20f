"""LogQueue: per-step logger writes off the training thread for thread-safe loggers, in place for the rest."""

import math
import threading

import pytest
from conftest import sampler_threads
from helpers import FakeClock, SleepyModel, tiny_trainer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from lightning_green import EfficiencyLogger, PowerSampler
from lightning_green.log_queue import LogQueue, writes_thread_safe
from lightning_green.sensors import SimulatedSensor


class Recorder:
    """A logger that records ``(thread name, metrics, step)``; ``gate`` (an Event) holds each write."""

    def __init__(self, fail_on_step=None, gate=None):
        self.calls, self.fail_on_step, self.gate = [], fail_on_step, gate

    def log_metrics(self, metrics, step):
        if self.gate is not None:
            self.gate.wait()
        if step == self.fail_on_step:
            raise RuntimeError("disk full")
        self.calls.append((threading.current_thread().name, dict(metrics), step))


def background_for(*loggers):
    return lambda logger: any(logger is lg for lg in loggers)


def test_thread_safe_loggers_are_written_by_the_thread_in_order_at_stop():
    tb, csv = Recorder(), Recorder()
    q = LogQueue("T", thread_safe=background_for(tb), drain_every_s=3600.0)
    q.start([tb, csv])
    q.put({"a": 1.0, "nan": math.nan}, step=10)
    q.put({"a": 2.0}, step=20)
    q.put({"nan": math.nan}, step=25)  # nothing to log: no call on either side
    assert tb.calls == []  # queued: the thread drains only at stop here
    assert csv.calls == [("MainThread", {"a": 1.0}, 10), ("MainThread", {"a": 2.0}, 20)]  # in place, NaN left out
    q.stop()
    assert tb.calls == [("lightning_green-log:T", {"a": 1.0}, 10), ("lightning_green-log:T", {"a": 2.0}, 20)]
    assert not sampler_threads()


def test_before_start_and_after_stop_every_logger_is_written_in_place():
    tb = Recorder()
    q = LogQueue("T", thread_safe=background_for(tb))
    q.put({"a": 1.0}, step=1, loggers=[tb])
    q.start([tb])
    q.stop()
    q.put({"a": 2.0}, step=2, loggers=[tb])
    q.put({"nan": math.nan}, step=3, loggers=[tb])  # nothing left to log
    assert tb.calls == [("MainThread", {"a": 1.0}, 1), ("MainThread", {"a": 2.0}, 2)]


def test_not_global_zero_writes_in_place_without_a_thread():
    tb = Recorder()
    q = LogQueue("T", thread_safe=background_for(tb))
    q.start([tb], background=False)
    assert not sampler_threads()
    q.put({"a": 1.0}, step=5)
    assert tb.calls == [("MainThread", {"a": 1.0}, 5)]
    q.stop()


def test_call_runs_on_the_thread_after_queued_puts_or_now_when_a_logger_is_in_place():
    tb = Recorder()
    q = LogQueue("T", thread_safe=background_for(tb), drain_every_s=3600.0)
    q.start([tb])
    q.put({"a": 1.0}, step=1)
    q.call(lambda write: write({"trace": 5.0}, 7))
    assert tb.calls == []
    q.stop()
    assert [(m, s) for _, m, s in tb.calls] == [({"a": 1.0}, 1), ({"trace": 5.0}, 7)]
    assert {name for name, _, _ in tb.calls} == {"lightning_green-log:T"}

    csv = Recorder()
    q.start([tb, csv])
    q.call(lambda write: write({"trace": 6.0}, 8))  # a logger written in place: the work runs now, for both
    assert csv.calls == [("MainThread", {"trace": 6.0}, 8)]
    q.stop()
    assert tb.calls[-1][1:] == ({"trace": 6.0}, 8)


def test_a_raising_logger_is_reported_once_and_dropped_and_the_others_go_on():
    bad, good = Recorder(fail_on_step=2), Recorder()
    q = LogQueue("T", thread_safe=background_for(bad, good), drain_every_s=3600.0)
    q.start([bad, good])
    for step in (1, 2, 3, 4):
        q.put({"a": float(step)}, step=step)
    q.call(lambda write: 1 / 0)  # failing work is reported, later items still written
    q.put({"a": 5.0}, step=5)
    with pytest.warns(UserWarning) as said:
        q.stop()
    messages = [str(w.message) for w in said]
    assert sum("Recorder.log_metrics raised RuntimeError('disk full')" in m for m in messages) == 1
    assert sum("ZeroDivisionError" in m for m in messages) == 1
    assert [s for _, _, s in bad.calls] == [1]
    assert [s for _, _, s in good.calls] == [1, 2, 3, 4, 5]


def test_stop_returns_within_its_timeout_when_a_write_hangs():
    gate = threading.Event()
    stuck = Recorder(gate=gate)
    q = LogQueue("T", thread_safe=background_for(stuck), drain_every_s=0.0, stop_timeout_s=0.05)
    q.start([stuck])
    q.put({"a": 1.0}, step=1)
    with pytest.warns(UserWarning, match="did not return within 0.05 s"):
        q.stop()
    gate.set()  # release it: the abandoned daemon thread ends
    for t in sampler_threads():
        t.join(5)
    assert stuck.calls and not sampler_threads()


class Blocking:
    """A logger whose first write blocks until ``gate`` is set; ``entered`` says it is blocked."""

    def __init__(self):
        self.entered, self.gate, self.steps = threading.Event(), threading.Event(), []

    def log_metrics(self, metrics, step):
        self.entered.set()
        self.gate.wait()
        self.steps.append(step)


def test_a_thread_left_behind_drops_its_queue_and_never_writes_the_next_runs_loggers():
    stuck, fresh, ran = Blocking(), Recorder(), []
    q = LogQueue("T", thread_safe=lambda logger: True, drain_every_s=0.0, stop_timeout_s=0.05)
    q.start([stuck])
    q.put({"a": 1.0}, step=1)
    assert stuck.entered.wait(5)  # the thread is blocked in the first write
    q.put({"a": 2.0}, step=2)
    q.call(lambda write: ran.append("work"))
    with pytest.warns(UserWarning, match="dropped"):
        q.stop()
    q.start([fresh])  # the next run
    q.put({"b": 3.0}, step=3)
    stuck.gate.set()
    q.stop()
    for t in sampler_threads():
        t.join(5)
    assert stuck.steps == [1] and ran == []  # what was queued behind the hung write is dropped, not run later
    assert [s for _, _, s in fresh.calls] == [3]
    assert not sampler_threads()


def test_tensorboard_is_thread_safe_and_csv_is_not(tmp_path):
    assert writes_thread_safe(TensorBoardLogger(tmp_path))
    assert not writes_thread_safe(CSVLogger(tmp_path))


def test_fit_with_tensorboard_and_csv_logs_every_window_and_leaves_no_thread(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb, csv, clock = TensorBoardLogger(tmp_path, name="tb"), CSVLogger(tmp_path, name="csv"), FakeClock(batch_s=0.02)
    ps = PowerSampler(
        sensors=[SimulatedSensor(power_w=100.0, clock=clock)], interval_s=3600.0, print_summary=False, clock=clock
    )
    clock.reads = ps.session
    seen = []

    class Probe(EfficiencyLogger):  # the writer thread runs during fit
        def on_train_batch_end(self, trainer, *args):
            super().on_train_batch_end(trainer, *args)
            seen.append(sorted(t.name for t in sampler_threads() if t.name.startswith("lightning_green-log")))

    tiny_trainer(max_steps=30, log_every_n_steps=10, logger=[tb, csv], callbacks=[clock, ps, Probe()]).fit(
        SleepyModel(step_s=0.0)
    )
    assert seen[-1] == ["lightning_green-log:PowerSampler"]
    assert not sampler_threads()
    acc = EventAccumulator(tb.log_dir)
    acc.Reload()
    total = acc.Scalars("energy/total_j")
    assert [e.step for e in total] == [10, 20, 30]
    assert [e.value for e in total] == pytest.approx([100.0 * n * 0.02 for n in (10, 20, 30)])
    assert [e.step for e in acc.Scalars("efficiency/samples_per_j")] == [10, 20, 30]
    assert acc.Scalars("power_trace/sim_w")
    rows = open(csv.experiment.metrics_file_path).read()
    assert "energy/total_j" in rows and "efficiency/samples_per_j" in rows and "power_trace/sim_w" in rows


@pytest.mark.parametrize("failure", ["fail_at", "interrupt_at"])
def test_a_fit_that_fails_writes_what_was_queued_and_leaves_no_thread(tmp_path, failure):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb, clock = TensorBoardLogger(tmp_path, name="tb"), FakeClock(batch_s=0.02)
    ps = PowerSampler(
        sensors=[SimulatedSensor(power_w=100.0, clock=clock)], interval_s=3600.0, print_summary=False, clock=clock
    )
    clock.reads = ps.session
    trainer = tiny_trainer(max_steps=30, log_every_n_steps=5, logger=tb, callbacks=[clock, ps, EfficiencyLogger()])
    if failure == "fail_at":
        with pytest.raises(RuntimeError, match="boom"):
            trainer.fit(SleepyModel(step_s=0.0, fail_at=12))
    else:  # Lightning handles Ctrl+C itself, then exits
        with pytest.raises(SystemExit):
            trainer.fit(SleepyModel(step_s=0.0, interrupt_at=12))
    assert not sampler_threads()
    acc = EventAccumulator(tb.log_dir)
    acc.Reload()
    assert [e.step for e in acc.Scalars("energy/total_j")] == [5, 10]
    assert [e.step for e in acc.Scalars("efficiency/samples_per_j")] == [5, 10]
