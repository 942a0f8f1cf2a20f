import threading
import time

import pytest

from lightning_green.energy import DownsampledTrace, EnergyMeter, Sampler
from lightning_green.sensors import Reading, Sensor, SimulatedSensor


def power_meter(**kw):
    m = EnergyMeter(**kw)
    m.add_channel({"name": "p", "source": "simulated", "kind": "power"})
    return m


def test_trapezoid_with_edges_between_readings():
    m = power_meter()
    for t, w in [(0.0, 100.0), (1.0, 200.0), (2.0, 200.0)]:
        m.record("p", Reading(t, w, "power"))
    assert m.energy_between(0.0, 2.0) == pytest.approx(150.0 + 200.0)
    # power is linear between readings: 0.5 s into the ramp it is 150 W -> (100 + 150) / 2 * 0.5
    assert m.energy_between(0.0, 0.5) == pytest.approx(62.5)
    assert m.energy_between(0.5, 1.5) == pytest.approx(87.5 + 100.0)


def test_counter_by_difference_and_backwards_is_a_gap():
    m = EnergyMeter()
    m.add_channel({"name": "c", "source": "counter", "kind": "energy"})
    assert m.record("c", Reading(0.0, 5000.0, "energy"))
    assert m.record("c", Reading(1.0, 5300.0, "energy"))
    assert not m.record("c", Reading(2.0, 5100.0, "energy"))  # decreasing
    assert m.record("c", Reading(3.0, 5500.0, "energy"))
    s = m.stats("c")
    assert s["energy_j"] == pytest.approx(500.0)
    assert s["gaps"] == 1 and s["partial"]
    assert m.energy_between(0.5, 1.0) == pytest.approx(150.0)


@pytest.mark.parametrize("bad", [float("nan"), -1.0, float("inf")])
def test_bad_readings_rejected(bad):
    m = power_meter()
    m.record("p", Reading(0.0, 10.0, "power"))
    assert not m.record("p", Reading(1.0, bad, "power"))
    m.record("p", Reading(2.0, 10.0, "power"))
    assert m.stats("p")["energy_j"] == pytest.approx(20.0)
    assert m.stats("p")["gaps"] >= 1


def test_time_not_moving_forward_is_a_gap():
    m = power_meter()
    m.record("p", Reading(1.0, 10.0, "power"))
    assert not m.record("p", Reading(1.0, 10.0, "power"))
    assert m.stats("p")["gaps"] == 1


def test_extrapolation_is_bounded():
    m = power_meter(extrapolate_s=0.1)
    m.record("p", Reading(0.0, 100.0, "power"))
    m.record("p", Reading(1.0, 100.0, "power"))
    assert m.energy_at("p", 1.05) == pytest.approx(105.0)
    assert m.energy_at("p", 5.0) == pytest.approx(110.0)  # at most 0.1 s past the newest reading


def test_failed_sensor_stops_at_last_reading():
    m = power_meter()
    m.record("p", Reading(0.0, 100.0, "power"))
    m.record("p", Reading(1.0, 100.0, "power"))
    m.mark_failed("p", "SensorLost: gone")
    assert m.energy_at("p", 3.0) == pytest.approx(100.0)
    assert m.stats("p")["failed"] == "SensorLost: gone"


def test_history_and_trace_are_bounded():
    m = power_meter(history=64, trace_points=16)
    for i in range(10_000):
        m.record("p", Reading(float(i), 100.0, "power"))
    ch = m._channels["p"]
    assert len(ch.t) == 64
    assert len(m.trace("p")) <= 17
    assert m.stats("p")["energy_j"] == pytest.approx(100.0 * 9999)  # cumulative survives the window


def test_downsampled_trace_averages_buckets():
    trace = DownsampledTrace(max_points=8)
    for i in range(100):
        trace.add(float(i), 2.0 * i)  # power proportional to time: bucket means keep p == 2 t
    pts = trace.as_list()
    assert 4 <= len(pts) <= 9
    assert all(p == pytest.approx(2.0 * t) for t, p in pts)
    weights = [n for _, _, n in trace._points] + ([trace.pending_samples] if trace.pending_samples else [])
    assert sum(weights) == 100
    assert sum(w * t for w, (t, _) in zip(weights, pts, strict=False)) / 100 == pytest.approx(
        49.5
    )  # no sample lost or counted twice


def test_offsets_restore_cumulative():
    m = power_meter()
    m.set_offsets({"p": 1000.0, "unknown": 5.0})
    m.record("p", Reading(0.0, 10.0, "power"))
    m.record("p", Reading(1.0, 10.0, "power"))
    assert m.stats("p")["energy_j"] == pytest.approx(1010.0)
    assert m.total_at(1.0) == pytest.approx(1010.0)


def test_duplicate_names_refused():
    m = power_meter()
    with pytest.raises(ValueError, match="unique"):
        m.add_channel({"name": "p", "source": "simulated", "kind": "power"})


# ---------------------------------------------------------------- sampler
class Exploding(Sensor):
    source, kind, name = "simulated", "power", "boom"

    def __init__(self, after: int):
        self.n, self.after = 0, after

    def read(self):
        self.n += 1
        if self.n > self.after:
            raise RuntimeError("sensor exploded")
        return Reading(time.monotonic(), 50.0, "power")


class Scripted(Sensor):
    source, kind, name = "simulated", "power", "scripted"

    def __init__(self, values):
        self.values = list(values)

    def read(self):
        value = self.values.pop(0) if self.values else 10.0
        return Reading(time.monotonic(), value, "power")


def test_sampler_drops_failing_sensor_and_keeps_others(caplog):
    meter = EnergyMeter()
    good = SimulatedSensor(100.0, name="good")
    sampler = Sampler([good, Exploding(after=2)], meter, interval_s=0.01)
    sampler.start()
    time.sleep(0.15)
    sampler.stop()
    assert not sampler.alive
    assert meter.stats("boom")["failed"] == "RuntimeError: sensor exploded"
    assert meter.stats("good")["failed"] is None
    assert meter.stats("good")["energy_j"] == pytest.approx(100.0 * meter.stats("good")["duration_s"])
    assert sum("boom" in r.message for r in caplog.records) == 1  # reported once


def test_sampler_counts_nan_and_negative_as_gaps():
    meter = EnergyMeter()
    sampler = Sampler([Scripted([10.0, float("nan"), -5.0, 10.0])], meter, interval_s=0.01)
    sampler.start()
    time.sleep(0.1)
    sampler.stop()
    stats = meter.stats("scripted")
    assert stats["gaps"] == 2 and stats["partial"]
    assert stats["energy_j"] == pytest.approx(10.0 * stats["duration_s"])


def test_sampler_thread_named_daemon_and_joined():
    sampler = Sampler([SimulatedSensor(1.0)], EnergyMeter(), interval_s=0.01)
    sampler.start()
    threads = [t for t in threading.enumerate() if t.name == "lightning_green-sampler"]
    assert len(threads) == 1 and threads[0].daemon
    sampler.stop()
    sampler.stop()
    assert not any(t.name == "lightning_green-sampler" for t in threading.enumerate())


@pytest.mark.parametrize("interval", [0, -0.1, float("nan"), "fast"])
def test_sampler_bad_interval(interval):
    with pytest.raises(ValueError, match="interval_s"):
        Sampler([], EnergyMeter(), interval_s=interval)


def test_counter_peak_ignores_short_intervals():
    m = EnergyMeter()
    m.add_channel({"name": "c", "source": "counter", "kind": "energy"})
    # a 300 W counter that updates every 100 ms, read at 0, 0.1, 0.11 (an extra read just after a tick), 0.2, 0.3
    for t, joules in [(0.0, 0.0), (0.1, 30.0), (0.11, 30.0), (0.2, 60.0), (0.3, 90.0)]:
        m.record("c", Reading(t, joules, "energy"))
    assert m.stats("c")["peak_power_w"] == pytest.approx(300.0)
    assert all(p == pytest.approx(300.0) for _, p in m.trace("c"))


class Hanging(Sensor):
    source, kind, name = "simulated", "power", "hangs"

    def __init__(self):
        self.calls = 0
        self.release = threading.Event()

    def read(self):
        self.calls += 1
        if self.calls > 1:
            self.release.wait(30)
        return Reading(time.monotonic(), 1.0, "power")


def test_stop_returns_when_a_read_hangs():
    sensor = Hanging()
    sampler = Sampler([sensor], EnergyMeter(), interval_s=0.01, stop_timeout_s=0.2)
    sampler.start()
    time.sleep(0.1)  # the thread is now stuck in read()
    t = time.monotonic()
    sampler.stop()
    assert time.monotonic() - t < 1.0
    assert sampler.sample_once(timeout_s=0.05) is False  # the stuck read still holds the lock
    sensor.release.set()


def test_energy_now_without_the_lock_equals_the_history_rule_through_offsets_and_drops():
    """``energy_at`` at or after the newest reading reads a snapshot without the lock; it must give what
    the history gives (``energy_between`` from the first reading, plus the offset) after every change."""
    m = EnergyMeter(extrapolate_s=0.5)
    m.add_channel({"name": "p", "source": "simulated", "kind": "power"})
    m.add_channel({"name": "c", "source": "counter", "kind": "energy"})
    offsets = {"p": 0.0, "c": 0.0}

    def check(t):
        for name in ("p", "c"):
            expected = m.energy_between(0.0, t, [name]) + offsets[name]
            assert m.energy_at(name, t) == pytest.approx(expected, abs=1e-9), (name, t)
        assert m.total_at(t) == pytest.approx(
            sum(m.energy_between(0.0, t, [n]) for n in ("p", "c")) + sum(offsets.values())
        )

    for i, (w, j) in enumerate([(100.0, 0.0), (150.0, 120.0), (90.0, 260.0), (200.0, 300.0)]):
        m.record("p", Reading(float(i), w, "power"))
        m.record("c", Reading(float(i), 1000.0 + j, "energy"))
        check(float(i)), check(i + 0.2), check(i + 3.0)  # at the reading, extrapolated, capped
    offsets.update(p=40.0, c=7.5)
    m.set_offsets(offsets)
    check(3.0), check(3.4)
    m.mark_failed("p", "gone")
    check(3.4), check(9.0)  # a dropped sensor stops at its last reading
    m.record("c", Reading(4.0, 1350.0, "energy"))
    check(3.5), check(4.25)  # between readings (the history, under the lock) and after the newest
    assert m.energy_at("c", 4.25) == pytest.approx(7.5 + 350.0 + 50.0 * 0.25)


# ------------------------------------------------------- a failing sensor never takes energy back
def nondecreasing(values):
    return all(b >= a for a, b in zip(values, values[1:], strict=False))


def test_rejected_readings_then_a_drop_keep_the_energy_now_gave():
    """1000 W read every 0.1 s, unusable from t = 0.5 on, dropped after six bad reads: the tail that
    "now" extrapolated (one interval, 100 J) stays; the energy never goes back to the bare 400 J."""
    m = power_meter(extrapolate_s=0.1)
    seen = []

    def at(t, readings=None):
        seen.append(m.energy_at("p", t, readings))
        return seen[-1]

    for i in range(5):
        assert m.record("p", Reading(i / 10, 1000.0, "power"))
    assert at(0.4) == pytest.approx(400.0)
    assert at(0.45) == pytest.approx(450.0)
    before = m.newest()  # a log step's copy taken before the failures
    assert at(0.5) == pytest.approx(500.0) and at(0.55) == pytest.approx(500.0)  # the cap: one interval
    for i in range(5, 10):  # rejected readings: the first failed attempt (t = 0.5) freezes 500 J
        assert m.submit("p", Reading(i / 10, float("nan"), "power"), t_s=i / 10) is not None
        assert at(i / 10) == pytest.approx(500.0) and at(i / 10 + 0.05) == pytest.approx(500.0)
    assert m.energy_at("p", 0.45) == pytest.approx(450.0)  # before the failed attempt: the tail as it was
    assert m.energy_at("p", 0.6, before) == pytest.approx(500.0)  # the old copy still answers as then
    m.mark_failed("p", "6 unusable reads in a row", t_s=1.0)
    assert at(1.0) == pytest.approx(500.0) and at(60.0) == pytest.approx(500.0)  # dropped: not back to 400 J
    assert at(60.0, m.newest()) == pytest.approx(500.0)  # a log step's copy after the drop
    assert m.energy_between(0.0, 60.0) == pytest.approx(500.0)  # the history rule agrees (under the lock)
    assert m.total_at(60.0) == pytest.approx(500.0)
    s = m.stats("p")
    assert s["energy_j"] == pytest.approx(500.0) and s["energy_this_run_j"] == pytest.approx(
        500.0
    )  # what the summary shows
    assert s["duration_s"] == pytest.approx(0.5) and s["mean_power_w"] == pytest.approx(1000.0)
    assert s["rejected"] == 5 and s["failed"] and s["partial"]
    assert nondecreasing(seen), seen
    assert not m.record("p", Reading(2.0, 1000.0, "power"))  # dropped: nothing more comes in
    assert m.energy_at("p", 60.0) == pytest.approx(500.0)


@pytest.mark.parametrize("fail", ["nan reading", "none with a time", "transient"])
def test_an_early_failed_attempt_freezes_a_shorter_tail(fail):
    """A read that fails half an interval after the good one keeps half an interval of tail, through
    the later failures and the drop; a counter is offset like any other figure."""
    m = power_meter(extrapolate_s=0.1)
    m.set_offsets({"p": 7.0})
    for i in range(5):
        m.record("p", Reading(i / 10, 1000.0, "power"))
    seen = [m.energy_at("p", 0.42), m.energy_at("p", 0.45)]
    if fail == "nan reading":
        assert m.submit("p", Reading(0.45, float("nan"), "power")) is not None  # its own time
    elif fail == "none with a time":
        assert m.submit("p", None, t_s=0.45) is not None
    else:
        m.note_transient("p", "NVML UNKNOWN", t_s=0.45)
    seen += [m.energy_at("p", 0.45), m.energy_at("p", 0.5), m.energy_at("p", 3.0)]
    m.note_transient("p", "NVML UNKNOWN", t_s=0.7)  # a later failure does not move the freeze
    m.mark_failed("p", "GPU_IS_LOST", t_s=0.9)
    seen += [m.energy_at("p", 0.9), m.energy_at("p", 60.0)]
    assert seen == pytest.approx([7.0 + 420.0] + [7.0 + 450.0] * 6)
    assert m.stats("p")["energy_j"] == pytest.approx(457.0)


def test_a_transient_error_then_a_good_reading_is_bridged():
    m = power_meter(extrapolate_s=0.5)
    m.add_channel({"name": "c", "source": "counter", "kind": "energy"})
    for t in (0.0, 1.0):
        m.record("p", Reading(t, 100.0, "power"))
        m.record("c", Reading(t, 5000.0 + 100.0 * t, "energy"))
    assert m.energy_at("p", 1.2) == pytest.approx(120.0) and m.energy_at("c", 1.2) == pytest.approx(120.0)
    m.note_transient("p", "NVML TIMEOUT", t_s=1.2)
    m.note_transient("c", "EIO", t_s=1.2)
    for name in ("p", "c"):  # failing: frozen where the failed read was made
        assert m.energy_at(name, 1.2) == pytest.approx(120.0)
        assert m.energy_at(name, 3.0) == pytest.approx(120.0)
        assert m.energy_at(name, 3.0, m.newest()) == pytest.approx(120.0)
        assert m.stats(name)["energy_j"] == pytest.approx(120.0)
    m.record("p", Reading(2.0, 300.0, "power"))
    m.record("c", Reading(2.0, 5000.0 + 300.0, "energy"))
    # bridged: trapezoid across the gap for power, counter difference (linear) for the counter
    assert m.energy_at("p", 1.5) == pytest.approx(100.0 + 0.5 * (100.0 + 200.0) / 2)
    assert m.energy_at("c", 1.5) == pytest.approx(200.0)
    for name, joules, watts in (("p", 300.0, 300.0), ("c", 300.0, 200.0)):
        assert m.energy_at(name, 2.0) == pytest.approx(joules)
        assert m.energy_at(name, 2.3) == pytest.approx(joules + watts * 0.3)  # extrapolating again
        assert m.energy_at(name, 9.0) == pytest.approx(joules + watts * 0.5)
        s = m.stats(name)
        assert (
            s["energy_j"] == pytest.approx(joules) and s["gap_s"] == pytest.approx(1.0) and s["transient_errors"] == 1
        )
