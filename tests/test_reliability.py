"""Faults and bad input around the sensors, the sampler and the meter (issue 11).

Energies are asserted on simulated timestamps (each sensor stamps readings with a FakeClock), never on
wall time. Hanging sensors block on an Event that the test releases. Waiting for the sampler's threads
to make progress polls a condition (wall time bounds the wait only, never an asserted figure).
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest
from conftest import sampler_threads
from fake_pynvml import NVML_ERROR_TIMEOUT, NVML_ERROR_UNKNOWN, FakeGpu, NVMLError
from helpers import FakeClock, SleepyModel, tiny_trainer

from lightning_green import PowerSampler
from lightning_green.energy import EnergyMeter, Sampler
from lightning_green.energy.sampler import TRIES_IN_A_ROW
from lightning_green.sensors import (
    CpuEstimateSensor,
    NvmlSensor,
    RaplSensor,
    Reading,
    Sensor,
    SensorError,
    SensorLost,
    SensorPermissionError,
    SensorTransientError,
    SensorUnavailable,
    SimulatedSensor,
)
from lightning_green.sensors.auto import build_sensors
from lightning_green.sensors.nvml import nvml_errors


def far_clock() -> float:
    """The sampler's clock in tests whose sensors run on a FakeClock: far past their readings, so a
    failed read keeps the whole tail "now" gave (one interval at the last good power)."""
    return 1e9


class Hangs(Sensor):
    """``power_w`` watts on a FakeClock; from read number ``hang_from`` on, read() blocks until released."""

    source, kind = "simulated", "power"

    def __init__(self, name: str = "hangs", hang_from: int = 1, power_w: float = 50.0) -> None:
        self.name, self.hang_from, self.power_w = name, hang_from, power_w
        self.calls = 0
        self.clock = FakeClock(tick_s=0.01)
        self.entered = threading.Event()
        self.release = threading.Event()

    def read(self) -> Reading:
        self.calls += 1
        if self.calls >= self.hang_from:
            self.entered.set()
            self.release.wait(120)  # released by the test; the bound only keeps a failing test from hanging
        return Reading(self.clock(), self.power_w, "power")


class Returns(Sensor):
    """Returns ``script`` items in turn (Reading stands for a good 10 W reading), then ``after`` forever."""

    source, kind = "simulated", "power"

    def __init__(self, name: str, script: list, after: object = Reading) -> None:
        self.name, self.script, self.after = name, list(script), after
        self.clock = FakeClock(tick_s=0.01)

    def read(self):
        item = self.script.pop(0) if self.script else self.after
        return Reading(self.clock(), 10.0, "power") if item is Reading else item


def wait_until(predicate, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "the sampler made no progress"
        time.sleep(0.005)


def our_threads() -> list[str]:
    return sorted(t.name for t in sampler_threads())


def release_and_join(sensor: Hangs) -> None:
    sensor.release.set()
    for thread in sampler_threads():
        thread.join(30)
    assert not sampler_threads()


# ---------------------------------------------------------------- 1. a hung sensor holds up only itself
def test_hung_sensor_holds_up_only_itself(caplog):
    meter = EnergyMeter()
    good = SimulatedSensor(100.0, name="good", clock=FakeClock(tick_s=0.01))
    hung = Hangs(hang_from=4)  # three good readings first: 50 W over 0.02 simulated seconds
    sampler = Sampler([good, hung], meter, interval_s=0.01, read_timeout_s=0.2, stop_timeout_s=1.0, clock=far_clock)
    try:
        sampler.start()
        assert hung.entered.wait(30)
        wait_until(lambda: meter.stats("hangs")["hung"])  # marked mid-run, not only at stop
        assert sampler.active_names == ["good"]
        n = meter.stats("good")["samples"]
        wait_until(lambda: meter.stats("good")["samples"] >= n + 20)  # the other sensor keeps its cadence
        sampler.stop()
        assert sampler.abandoned == ["hangs"]
        assert our_threads() == ["lightning_green-sampler:hangs"]  # only the abandoned daemon is left
        s = meter.stats("hangs")
        assert s["hung"] and s["abandoned"] and s["partial"] and s["failed"].startswith("hung: read() has not returned")
        # kept up to its last good reading, plus the tail "now" had when it was dropped (one interval at 50 W)
        assert s["energy_j"] == pytest.approx(50.0 * 0.02 + 50.0 * meter.extrapolate_s)
        g = meter.stats("good")
        assert g["failed"] is None and not g["partial"]
        assert g["energy_j"] == pytest.approx(100.0 * 0.01 * (g["samples"] - 1))  # every tick read
    finally:
        release_and_join(hung)
    assert meter.stats("hangs")["samples"] == 3  # its late reading was not used
    assert sum("'hangs'" in r.message and "dropped" in r.message for r in caplog.records) == 1


def test_a_caller_does_not_wait_on_a_read_already_late():
    meter = EnergyMeter()
    good = SimulatedSensor(100.0, name="good", clock=FakeClock(tick_s=0.01))
    hung = Hangs(hang_from=2)
    sampler = Sampler([good, hung], meter, interval_s=0.01, read_timeout_s=60.0, stop_timeout_s=1.0)
    try:
        sampler.start()
        assert hung.entered.wait(30)
        time.sleep(0.05)  # the hung read is now older than one interval (a lower bound: load only lengthens it)
        n = meter.stats("good")["samples"]
        t0 = time.monotonic()
        assert sampler.sample_once(timeout_s=30.0) is False  # not every sensor answered...
        assert time.monotonic() - t0 < 20.0  # ...and the call did not wait out its 30 s for the late one
        assert meter.stats("good")["samples"] > n  # the healthy sensor was read for the caller
        sampler.stop()
    finally:
        release_and_join(hung)


def test_read_that_hangs_at_stop_is_abandoned_within_the_stop_timeout():
    meter = EnergyMeter()
    hung = Hangs(hang_from=3)
    sampler = Sampler([hung], meter, interval_s=0.01, read_timeout_s=60.0, stop_timeout_s=0.3, clock=far_clock)
    try:
        sampler.start()
        assert hung.entered.wait(30)
        t = time.monotonic()
        sampler.stop()
        assert time.monotonic() - t < 10.0  # bounded by stop_timeout_s (generous for a busy machine)
        s = meter.stats("hangs")
        assert sampler.abandoned == ["hangs"] and s["hung"] and s["abandoned"] and "at stop" in s["failed"]
        assert s["energy_j"] == pytest.approx(50.0 * 0.01 + 50.0 * meter.extrapolate_s)  # with the tail "now" gave
        assert sampler.sample_once(0.01) is False  # not running
    finally:
        release_and_join(hung)


def test_no_thread_after_stop_and_restart():
    meter = EnergyMeter()
    sampler = Sampler(
        [
            SimulatedSensor(10.0, name="a", clock=FakeClock(tick_s=0.01)),
            SimulatedSensor(20.0, name="b", clock=FakeClock(tick_s=0.01)),
        ],
        meter,
        interval_s=0.01,
    )
    sampler.start()
    assert our_threads() == ["lightning_green-sampler", "lightning_green-sampler:a", "lightning_green-sampler:b"]
    assert all(t.daemon for t in sampler_threads())
    sampler.stop()
    assert not sampler_threads() and sampler.abandoned == []
    n = meter.stats("a")["samples"]
    sampler.start()
    assert sampler.sample_once(10.0) is True
    assert meter.stats("a")["samples"] >= n + 2  # start's first reading and the one asked for
    sampler.stop()
    assert not sampler_threads()


# ---------------------------------------------------------------- 2. a first read that hangs
def test_first_read_that_hangs_does_not_block_start(caplog):
    meter = EnergyMeter()
    hung = Hangs(hang_from=1)
    good = SimulatedSensor(100.0, name="good", clock=FakeClock(tick_s=0.01))
    sampler = Sampler([good, hung], meter, interval_s=0.01, start_timeout_s=0.1, read_timeout_s=0.3)
    try:
        starter = threading.Thread(target=sampler.start)
        starter.start()
        starter.join(30)
        assert not starter.is_alive()  # start() returned although a first read never does
        assert meter.stats("good")["samples"] >= 1
        assert any("'hangs'" in r.message and "no first reading" in r.message for r in caplog.records)
        wait_until(lambda: meter.stats("hangs")["hung"])
        sampler.stop()
        assert sampler.abandoned == ["hangs"] and meter.stats("hangs")["samples"] == 0
    finally:
        release_and_join(hung)


def test_training_goes_on_beside_a_sensor_whose_first_read_hangs(tmp_path):
    hung = Hangs(hang_from=1)
    ps = PowerSampler(
        sensors=[SimulatedSensor(100.0), hung], interval_s=0.01, summary_dir=str(tmp_path), print_summary=False
    )
    trainer = tiny_trainer(max_steps=5, callbacks=[ps])
    try:
        trainer.fit(SleepyModel(step_s=0.01))
        assert trainer.global_step == 5
        by_name = {s["name"]: s for s in ps.summary["sensors"]}
        assert by_name["hangs"]["hung"] and by_name["hangs"]["abandoned"] and by_name["hangs"]["failed"]
        assert by_name["sim"]["cumulative_energy_j"] > 0 and not by_name["sim"]["partial"]
        assert our_threads() == ["lightning_green-sampler:hangs"]
    finally:
        release_and_join(hung)


# ---------------------------------------------------------------- 3. a read that returns a non-reading
def test_reading_none_mid_run_drops_only_that_sensor(caplog):
    meter = EnergyMeter()
    bad = Returns("bad", [Reading] * 3, after=None)
    good = SimulatedSensor(100.0, name="good", clock=FakeClock(tick_s=0.01))
    sampler = Sampler([bad, good], meter, interval_s=0.01, clock=far_clock)
    sampler.start()
    wait_until(lambda: meter.stats("bad")["failed"] is not None)
    n = meter.stats("good")["samples"]
    wait_until(lambda: meter.stats("good")["samples"] >= n + 5)
    sampler.stop()  # the final read does not raise
    s = meter.stats("bad")
    assert s["rejected"] == TRIES_IN_A_ROW and s["gaps"] == TRIES_IN_A_ROW
    assert f"{TRIES_IN_A_ROW} unusable reads in a row" in s["failed"] and "returned None" in s["failed"]
    assert s["energy_j"] == pytest.approx(
        10.0 * 0.02 + 10.0 * meter.extrapolate_s
    )  # its three good readings and the tail
    assert meter.stats("good")["failed"] is None
    warned = [r.message for r in caplog.records if "'bad'" in r.message]
    assert len(warned) == 2 and "returned None" in warned[0] and "dropped" in warned[1]  # once, then the drop


@pytest.mark.parametrize("first", [None, 42.0, "12 W", Reading(0.0, 5.0, "energy")])
def test_first_read_not_a_reading_is_rejected_not_raised(first):
    meter = EnergyMeter()
    sensor = Returns("odd", [first], after=Reading)
    sampler = Sampler([sensor], meter, interval_s=0.01)
    sampler.start()  # no exception in setup
    wait_until(lambda: meter.stats("odd")["samples"] >= 5)
    sampler.stop()
    s = meter.stats("odd")
    assert s["rejected"] == 1 and s["failed"] is None and s["partial"]
    assert s["energy_j"] == pytest.approx(10.0 * 0.01 * (s["samples"] - 1))


def test_meter_record_never_raises():
    m = EnergyMeter()
    m.add_channel({"name": "p", "source": "simulated", "kind": "power"})
    assert m.record("p", Reading(0.0, 10.0, "power"))
    assert not m.record("p", None)
    assert not m.record("p", 3.5)
    assert not m.record("p", Reading(1.0, "10", "power"))
    assert not m.record("p", Reading(None, 10.0, "power"))
    assert not m.record("nobody", Reading(1.0, 10.0, "power"))
    assert m.submit("p", None) == "read() returned None (NoneType), not a Reading"
    assert m.record("p", Reading(2.0, 10.0, "power"))
    s = m.stats("p")
    assert s["rejected"] == 5 and s["energy_j"] == pytest.approx(20.0) and s["gap_s"] == pytest.approx(2.0)
    m.mark_failed("p", "gone")
    assert not m.record("p", Reading(3.0, 10.0, "power"))  # a dropped sensor takes no more readings
    assert m.stats("p")["energy_j"] == pytest.approx(20.0)


def test_training_goes_on_with_a_sensor_that_returns_none(tmp_path):
    ps = PowerSampler(
        sensors=[SimulatedSensor(100.0), Returns("none", [], after=None)],
        interval_s=0.01,
        summary_dir=str(tmp_path),
        print_summary=False,
    )
    trainer = tiny_trainer(max_steps=10, callbacks=[ps])
    trainer.fit(SleepyModel(step_s=0.01))
    assert trainer.global_step == 10 and not sampler_threads()
    s = next(s for s in ps.summary["sensors"] if s["name"] == "none")
    assert s["rejected"] >= 1 and s["partial"] and "returned None" in s["last_problem"]  # dropped or not yet: timing


# ---------------------------------------------------------------- 4. transient NVML errors are retried
def run_until(sensor: Sensor, meter: EnergyMeter, condition) -> None:
    sampler = Sampler([sensor], meter, interval_s=0.01, clock=far_clock)
    sampler.start()
    wait_until(condition)
    sampler.stop()
    assert not sampler_threads()


@pytest.mark.parametrize("code", [NVML_ERROR_UNKNOWN, NVML_ERROR_TIMEOUT])
def test_one_transient_nvml_error_loses_no_energy(fake_nvml, code):
    clock = FakeClock(tick_s=0.05)  # a read takes three ticks: 0.15 simulated seconds between readings
    fake_nvml(gpus=[FakeGpu(uuid="GPU-a", power_w=300.0, errors_at={4: code}, clock=clock)])  # read 1 is the probe
    meter = EnergyMeter()
    run_until(NvmlSensor(0, clock=clock), meter, lambda: meter.stats("gpu0")["samples"] >= 10)
    s = meter.stats("gpu0")
    assert s["failed"] is None and s["transient_errors"] == 1 and s["gaps"] == 1 and s["rejected"] == 0
    assert (
        s["gap_s"] == pytest.approx(0.2) and s["gap_bridge"] == "counter difference"
    )  # 0.15 s + the failed read's tick
    assert s["energy_j"] == pytest.approx(300.0 * s["duration_s"], abs=0.002)  # bridged by the counter: nothing lost


def test_polled_gpu_bridges_a_transient_error_with_neighbouring_power(fake_nvml):
    clock = FakeClock(tick_s=0.05)
    fake_nvml(
        gpus=[FakeGpu(uuid="GPU-a", power_w=200.0, counter=False, errors_at={3: NVML_ERROR_UNKNOWN}, clock=clock)]
    )
    meter = EnergyMeter()
    run_until(NvmlSensor(0, clock=clock), meter, lambda: meter.stats("gpu0")["samples"] >= 10)
    s = meter.stats("gpu0")
    assert s["source"] == "polled" and s["failed"] is None and s["transient_errors"] == 1
    assert s["gap_bridge"] == "interpolated power" and s["gap_s"] > 0
    assert s["energy_j"] == pytest.approx(200.0 * s["duration_s"])


def test_a_gpu_that_keeps_failing_transiently_is_dropped(fake_nvml):
    clock = FakeClock(tick_s=0.05)
    fake_nvml(
        gpus=[
            FakeGpu(
                uuid="GPU-a", power_w=300.0, errors_at={n: NVML_ERROR_UNKNOWN for n in range(4, 10_000)}, clock=clock
            )
        ]
    )
    meter = EnergyMeter()
    run_until(NvmlSensor(0, clock=clock), meter, lambda: meter.stats("gpu0")["failed"] is not None)
    s = meter.stats("gpu0")
    assert f"{TRIES_IN_A_ROW} unusable reads in a row" in s["failed"] and "NVML UNKNOWN" in s["failed"]
    assert s["transient_errors"] == TRIES_IN_A_ROW and not s["hung"]
    assert s["energy_j"] == pytest.approx(
        300.0 * (0.15 + meter.extrapolate_s), abs=0.002
    )  # two good readings and the tail


@pytest.mark.parametrize(
    "code, cls, transient",
    [
        (999, SensorTransientError, True),
        (10, SensorTransientError, True),
        (15, SensorLost, False),
        (3, SensorUnavailable, False),
        (4, SensorPermissionError, False),
        (12, SensorUnavailable, False),
        (1, SensorError, False),
    ],
)
def test_nvml_errors_sorts_transient_from_permanent(fake_nvml, code, cls, transient):
    fake_nvml()
    with pytest.raises(cls) as info:
        with nvml_errors("reading gpu0"):
            raise NVMLError(code)
    assert isinstance(info.value, SensorTransientError) == transient
    assert "reading gpu0" in str(info.value)


def test_permanent_nvml_error_still_drops_at_once(fake_nvml):
    clock = FakeClock(tick_s=0.05)
    fake_nvml(gpus=[FakeGpu(uuid="GPU-a", lost_after_reads=3, clock=clock)])
    meter = EnergyMeter()
    run_until(NvmlSensor(0, clock=clock), meter, lambda: meter.stats("gpu0")["failed"] is not None)
    s = meter.stats("gpu0")
    assert "GPU_IS_LOST" in s["failed"] and s["transient_errors"] == 0


# ---------------------------------------------------------------- 5. counter resets
def test_counter_reset_keeps_energy_before_and_after():
    m = EnergyMeter()
    m.add_channel({"name": "c", "source": "counter", "kind": "energy"})
    # 100 W, read every second; the counter restarts from 0 at t = 2.7 (a driver reload)
    for t, joules in [(0.0, 1000.0), (1.0, 1100.0), (2.0, 1200.0), (3.0, 30.0), (4.0, 130.0), (5.0, 230.0)]:
        assert m.record("c", Reading(t, joules, "energy"))
    s = m.stats("c")
    assert s["energy_j"] == pytest.approx(500.0)  # 200 before, 100 bridged at the power before the reset, 200 after
    assert s["resets"] == 1 and s["gap_s"] == pytest.approx(1.0) and s["partial"] and s["failed"] is None
    assert s["rejected"] == 0 and "reset" in s["last_problem"]
    assert m.energy_between(3.0, 5.0) == pytest.approx(200.0)


def test_nvml_counter_reset_mid_run(fake_nvml):
    clock = FakeClock(tick_s=0.05)
    fake_nvml(gpus=[FakeGpu(uuid="GPU-a", power_w=300.0, reset_at_read=6, clock=clock)])
    meter = EnergyMeter()
    run_until(NvmlSensor(0, clock=clock), meter, lambda: meter.stats("gpu0")["samples"] >= 15)
    s = meter.stats("gpu0")
    assert s["resets"] == 1 and s["rejected"] == 0 and s["failed"] is None
    assert s["energy_j"] == pytest.approx(300.0 * s["duration_s"], abs=0.01)


def _zone(root: Path, dirname: str, name: str, energy_uj, max_uj: int = 999_999_999) -> Path:
    zone = root / dirname
    zone.mkdir(parents=True)
    (zone / "name").write_text(name + "\n")
    if energy_uj is not None:
        (zone / "energy_uj").write_text(f"{energy_uj}\n")
    (zone / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return zone


def test_rapl_tells_a_wrap_from_a_reset(tmp_path):
    zone = _zone(tmp_path, "intel-rapl:0", "package-0", 100_000_000)
    sensor = RaplSensor(zone, clock=FakeClock(tick_s=1.0))
    m = EnergyMeter()
    m.add_channel(sensor.describe())
    # 100 W: +100 J a second; a reset to 50 J, then a wrap past 1000 J
    for uj in (100_000_000, 200_000_000, 50_000_000, 150_000_000, 950_000_000, 50_000_000):
        (zone / "energy_uj").write_text(f"{uj}\n")
        m.record(sensor.name, sensor.read())
    s = m.stats(sensor.name)
    assert s["resets"] == 1 and s["rejected"] == 0
    # 100 + 100 (bridged) + 100 + 800 + 100 (the wrap: 1000 J lap)
    assert s["energy_j"] == pytest.approx(1200.0)


# ---------------------------------------------------------------- 6. RAPL: keep every readable zone
def test_rapl_keeps_readable_zones_and_names_each_unreadable_one(tmp_path):
    _zone(tmp_path, "intel-rapl:0", "package-0", 10)
    _zone(tmp_path, "intel-rapl:0/intel-rapl:0:2", "dram", None)  # no energy_uj
    _zone(tmp_path, "intel-rapl:1", "package-1", "garbage")
    found, problems = RaplSensor.scan(tmp_path)
    assert [s.name for s in found] == ["rapl_package-0"]
    reasons = sorted(str(p) for p in problems)
    assert len(reasons) == 2
    assert any("intel-rapl:1" in r and "'garbage'" in r for r in reasons)
    assert any("intel-rapl:0:2" in r and "does not exist" in r for r in reasons)
    assert [s.name for s in RaplSensor.discover(tmp_path)] == ["rapl_package-0"]
    sensors, skipped = build_sensors(["rapl"], host_level=True, rapl_root=str(tmp_path))
    assert [s.name for s in sensors] == ["rapl_package-0"]
    assert sum(r.startswith("rapl: zone ") for r in skipped) == 2


def test_rapl_with_no_readable_zone_gives_every_reason(tmp_path):
    _zone(tmp_path, "intel-rapl:0", "package-0", None)
    _zone(tmp_path, "intel-rapl:1", "package-1", "x")
    with pytest.raises(SensorError) as info:
        RaplSensor.discover(tmp_path)
    assert "intel-rapl:0" in str(info.value) and "intel-rapl:1" in str(info.value)


def test_rapl_io_error_is_transient_and_bridged(tmp_path, monkeypatch):
    zone = _zone(tmp_path, "intel-rapl:0", "package-0", 0)
    sensor = RaplSensor(zone, clock=FakeClock(tick_s=0.1))
    real, reads = Path.read_text, {"n": 0, "failing": {1}}

    def flaky(self, *args, **kwargs):  # +10 J per read of energy_uj; EIO on the reads in "failing"
        if self.name != "energy_uj":
            return real(self, *args, **kwargs)
        reads["n"] += 1
        if reads["n"] in reads["failing"]:
            raise OSError(5, "Input/output error")
        return f"{reads['n'] * 10_000_000}\n"

    monkeypatch.setattr(Path, "read_text", flaky)
    with pytest.raises(SensorTransientError, match="Input/output"):
        sensor.read()
    reads.update(n=0, failing={3})
    meter = EnergyMeter()
    run_until(sensor, meter, lambda: meter.stats(sensor.name)["samples"] >= 5)
    s = meter.stats(sensor.name)
    assert s["failed"] is None and s["transient_errors"] == 1 and s["gap_s"] == pytest.approx(0.1)
    assert s["energy_j"] == pytest.approx(10.0 * s["samples"])  # the counter difference covers the failed read too


# ---------------------------------------------------------------- user callables and arguments
@pytest.mark.parametrize("returned, shown", [(None, "None"), ("100", "'100'"), ([1.0], "[1.0]")])
def test_power_w_returning_a_wrong_type_names_the_argument(returned, shown):
    sensor = SimulatedSensor(power_w=lambda t: returned, name="cb")
    with pytest.raises(SensorError, match=rf"`power_w` returned {__import__('re').escape(shown)}"):
        sensor.read()
    meter = EnergyMeter()
    sampler = Sampler([sensor, SimulatedSensor(1.0, name="ok")], meter, interval_s=0.01)
    sampler.start()  # never raises into setup
    sampler.stop()
    assert "`power_w` returned" in meter.stats("cb")["failed"] and meter.stats("ok")["failed"] is None


def test_power_w_that_raises_names_the_argument():
    sensor = SimulatedSensor(power_w=lambda t: 1 / 0)
    with pytest.raises(SensorError, match="`power_w` raised ZeroDivisionError"):
        sensor.read()


@pytest.mark.parametrize(
    "make, arg",
    [
        (lambda: SimulatedSensor(name=""), "name"),
        (lambda: SimulatedSensor(host_level="yes"), "host_level"),
        (lambda: SimulatedSensor(domain="disk"), "domain"),
        (lambda: SimulatedSensor(clock=5.0), "clock"),
        (lambda: CpuEstimateSensor(name=3), "name"),
        (lambda: RaplSensor(42), "zone_dir"),
        (lambda: EnergyMeter(history="big"), "history"),
        (lambda: EnergyMeter(history=1), "history"),
        (lambda: EnergyMeter(trace_points=2.5), "trace_points"),
        (lambda: EnergyMeter(extrapolate_s=-1), "extrapolate_s"),
        (lambda: Sampler([SimulatedSensor(1.0)], EnergyMeter(), stop_timeout_s=0), "stop_timeout_s"),
        (lambda: Sampler([SimulatedSensor(1.0)], EnergyMeter(), read_timeout_s=float("inf")), "read_timeout_s"),
        (lambda: Sampler([SimulatedSensor(1.0)], EnergyMeter(), start_timeout_s=-1), "start_timeout_s"),
        (lambda: Sampler([SimulatedSensor(1.0)], EnergyMeter(), thread_name=""), "thread_name"),
        (lambda: Sampler([SimulatedSensor(1.0)], meter={}), "meter"),
        (lambda: Sampler([1.0], EnergyMeter()), "sensors"),
        (lambda: Sampler([SimulatedSensor(1.0), SimulatedSensor(2.0)], EnergyMeter()), "sensors"),
        (lambda: build_sensors("auto"), "names"),
        (lambda: build_sensors(["nvml"], gpu_indices=[-1]), "gpu_indices"),
        (lambda: build_sensors(["nvml"], host_level=1), "host_level"),
    ],
)
def test_constructor_arguments_are_checked(make, arg):
    expected = (
        TypeError if arg == "host_level" else ValueError
    )  # a flag of the wrong type is a TypeError, as everywhere
    with pytest.raises(expected, match=f"`{arg}`"):
        make()


@pytest.mark.parametrize(
    "kwargs, arg", [({"use_counter": "no"}, "use_counter"), ({"name": ""}, "name"), ({"clock": 1}, "clock")]
)
def test_nvml_sensor_arguments_are_checked(fake_nvml, kwargs, arg):
    fake = fake_nvml()
    with pytest.raises(TypeError if arg == "use_counter" else ValueError, match=f"`{arg}`"):
        NvmlSensor(0, **kwargs)
    assert fake.init_count == 0


def test_stats_name_what_the_summary_needs():
    m = EnergyMeter()
    m.add_channel({"name": "p", "source": "simulated", "kind": "power"})
    m.record("p", Reading(0.0, 10.0, "power"))
    m.note_transient("p", "NVML UNKNOWN while reading p")
    m.record("p", Reading(1.0, 10.0, "power"))
    s = m.stats("p")
    assert {
        k: s[k]
        for k in ("gaps", "rejected", "transient_errors", "gap_s", "resets", "failed", "hung", "abandoned", "partial")
    } == {
        "gaps": 1,
        "rejected": 0,
        "transient_errors": 1,
        "gap_s": 1.0,
        "resets": 0,
        "failed": None,
        "hung": False,
        "abandoned": False,
        "partial": True,
    }
    assert s["last_problem"] == "NVML UNKNOWN while reading p" and s["energy_j"] == pytest.approx(10.0)


def test_log_warnings_name_the_sensor(caplog):
    caplog.set_level(logging.WARNING, logger="lightning_green")
    meter = EnergyMeter()
    sampler = Sampler(
        [Returns("nan", [Reading, Reading(5.0, float("nan"), "power")], after=Reading)], meter, interval_s=0.01
    )
    sampler.start()
    wait_until(lambda: meter.stats("nan")["samples"] >= 3)
    sampler.stop()
    assert any("'nan'" in r.message and "unusable reading" in r.message and "nan" in r.message for r in caplog.records)
