import re
import time
from pathlib import Path

import pytest
from fake_pynvml import FakeGpu

from lightning_green.sensors import (
    CpuEstimateSensor,
    NvmlSensor,
    RaplSensor,
    Reading,
    Sensor,
    SensorLost,
    SensorPermissionError,
    SensorUnavailable,
    SimulatedSensor,
)
from lightning_green.sensors.auto import build_sensors, check_distinct_names
from lightning_green.sensors.base import validate_sensor


# ---------------------------------------------------------------- NVML
def test_nvml_library_not_found_is_unavailable(fake_nvml):
    fake_nvml(library_found=False)
    with pytest.raises(SensorUnavailable, match="LIBRARY_NOT_FOUND"):
        NvmlSensor(0)


def test_nvml_counter_reads_joules(fake_nvml):
    fake_nvml(gpus=[FakeGpu(uuid="GPU-a", power_w=250.0)])
    sensor = NvmlSensor(0)
    assert (sensor.source, sensor.kind, sensor.name) == ("counter", "energy", "gpu0")
    first = sensor.read()
    time.sleep(0.2)
    second = sensor.read()
    power = (second.value - first.value) / (second.t_s - first.t_s)
    assert power == pytest.approx(250.0, rel=0.05)
    assert first.value > 123_000  # mJ since driver load, converted to J


def test_nvml_without_counter_falls_back_to_polled(fake_nvml):
    fake_nvml(gpus=[FakeGpu(uuid="GPU-a", power_w=312.5, counter=False)])
    sensor = NvmlSensor(0)
    assert (sensor.source, sensor.kind) == ("polled", "power")
    assert sensor.read().value == pytest.approx(312.5)


def test_nvml_gpu_lost_raises_sensor_lost(fake_nvml):
    fake_nvml(gpus=[FakeGpu(uuid="GPU-a", lost_after_reads=2)])
    sensor = NvmlSensor(0)  # the probe is read 1
    sensor.read()
    with pytest.raises(SensorLost, match="GPU_IS_LOST"):
        sensor.read()


def test_nvml_respects_cuda_visible_devices(fake_nvml, monkeypatch):
    fake_nvml(
        gpus=[FakeGpu(uuid="GPU-a", power_w=100.0, counter=False), FakeGpu(uuid="GPU-b", power_w=200.0, counter=False)]
    )
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert NvmlSensor(0).read().value == pytest.approx(200.0)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-a")
    assert NvmlSensor(0).read().value == pytest.approx(100.0)
    with pytest.raises(SensorUnavailable, match="not visible"):
        NvmlSensor(1)


def test_nvml_mig_reads_parent_and_says_so(fake_nvml):
    parent = FakeGpu(uuid="GPU-p", power_w=400.0, counter=False)
    fake_nvml(gpus=[FakeGpu(uuid="MIG-1", mig_parent=parent)])
    sensor = NvmlSensor(0)
    assert sensor.read().value == pytest.approx(400.0)
    assert "MIG" in sensor.note


def test_nvml_close_balances_init(fake_nvml):
    fake = fake_nvml()
    sensor = NvmlSensor(0)
    assert fake.init_count == 1
    sensor.close()
    sensor.close()
    assert fake.init_count == 0


# ---------------------------------------------------------------- RAPL
def _zone(root: Path, dirname: str, name: str, energy_uj: int, max_uj: int = 1000) -> Path:
    zone = root / dirname
    zone.mkdir(parents=True)
    (zone / "name").write_text(name + "\n")
    (zone / "energy_uj").write_text(f"{energy_uj}\n")
    (zone / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return zone


def test_rapl_discovers_package_and_dram(tmp_path):
    _zone(tmp_path, "intel-rapl:0", "package-0", 10)
    _zone(tmp_path, "intel-rapl:0/intel-rapl:0:0", "core", 5)
    _zone(tmp_path, "intel-rapl:0/intel-rapl:0:2", "dram", 7)
    sensors = RaplSensor.discover(tmp_path)
    assert sorted((s.name, s.domain) for s in sensors) == [("rapl_dram-0", "dram"), ("rapl_package-0", "cpu")]
    assert all(s.host_level and s.source == "rapl" for s in sensors)


def test_rapl_unwraps_counter(tmp_path):
    zone = _zone(tmp_path, "intel-rapl:0", "package-0", 900, max_uj=999)
    sensor = RaplSensor(zone)
    first = sensor.read().value
    (zone / "energy_uj").write_text("100\n")  # passed 999 and restarted: 100 more uJ + 100
    second = sensor.read().value
    assert (second - first) * 1e6 == pytest.approx(200.0)


def test_rapl_unreadable_file_gives_reason(tmp_path, monkeypatch):
    zone = _zone(tmp_path, "intel-rapl:0", "package-0", 1)
    real = Path.read_text

    def deny(self, *args, **kwargs):
        if self.name == "energy_uj":
            raise PermissionError(13, "Permission denied")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", deny)
    with pytest.raises(SensorPermissionError, match="root-only"):
        RaplSensor(zone)
    with pytest.raises(SensorPermissionError, match="chmod"):
        RaplSensor.discover(tmp_path)


def test_rapl_missing_root(tmp_path):
    with pytest.raises(SensorUnavailable, match="does not exist"):
        RaplSensor.discover(tmp_path / "nope")


# ---------------------------------------------------------------- estimate, simulated
def test_estimate_follows_its_model(monkeypatch):
    sensor = CpuEstimateSensor(max_w=50.0, idle_w=10.0)
    assert sensor.source == "estimate"
    busy = {"v": sensor._last}

    def fake_busy_total():
        return busy["v"]

    monkeypatch.setattr(sensor, "_busy_total", fake_busy_total)
    b0, t0 = sensor._last
    busy["v"] = (b0 + 3.0, t0 + 4.0)  # 75 % busy since the last reading
    assert sensor.read().value == pytest.approx(10.0 + 40.0 * 0.75)
    busy["v"] = (b0 + 3.0, t0 + 8.0)  # idle since
    assert sensor.read().value == pytest.approx(10.0)


@pytest.mark.parametrize(
    "kwargs, arg",
    [({"max_w": -1.0}, "max_w"), ({"idle_w": float("nan")}, "idle_w"), ({"max_w": 5.0, "idle_w": 6.0}, "idle_w")],
)
def test_estimate_bad_input(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        CpuEstimateSensor(**kwargs)


def test_simulated_power_function_of_time():
    clock = iter([10.0, 11.0, 12.5])
    sensor = SimulatedSensor(power_w=lambda t: 100.0 + 10.0 * t, clock=lambda: next(clock))
    assert [sensor.read().value for _ in range(3)] == [100.0, 110.0, 125.0]


@pytest.mark.parametrize("power", [-1.0, float("inf"), "100"])
def test_simulated_bad_power(power):
    with pytest.raises(ValueError, match="power_w"):
        SimulatedSensor(power_w=power)


# ---------------------------------------------------------------- auto
def test_auto_on_a_cpu_machine_falls_back_to_estimate(fake_nvml, tmp_path):
    fake_nvml(library_found=False)
    sensors, skipped = build_sensors(["auto"], gpu_indices=[0], host_level=True, rapl_root=str(tmp_path / "none"))
    assert [s.source for s in sensors] == ["estimate"]
    assert any(r.startswith("nvml:") and "LIBRARY_NOT_FOUND" in r for r in skipped)
    assert any(r.startswith("rapl:") for r in skipped)
    assert any("estimate" in r for r in skipped)


def test_auto_prefers_rapl_over_estimate(tmp_path, fake_nvml):
    fake_nvml(gpus=[FakeGpu(uuid="GPU-a")])
    _zone(tmp_path, "intel-rapl:0", "package-0", 10)
    sensors, _ = build_sensors(["auto"], gpu_indices=[0], host_level=True, rapl_root=str(tmp_path))
    assert [s.source for s in sensors] == ["counter", "rapl"]


def test_auto_not_host_level_reads_gpus_only(tmp_path, fake_nvml):
    fake_nvml(gpus=[FakeGpu(uuid="GPU-a")])
    sensors, skipped = build_sensors(["auto"], gpu_indices=[0], host_level=False, rapl_root=str(tmp_path))
    assert [s.name for s in sensors] == ["gpu0"]
    assert any("local rank 0" in r for r in skipped)


def test_unknown_sensor_name():
    with pytest.raises(ValueError, match="allowed: auto, nvml, rapl, estimate"):
        build_sensors(["nvidia"])


def test_mig_instances_share_a_key_and_one_rank_counts_it(fake_nvml, monkeypatch):
    from lightning_green.callbacks.power import shared_owners

    parent = FakeGpu(uuid="GPU-p", power_w=400.0, counter=False)
    fake_nvml(
        gpus=[FakeGpu(uuid="MIG-1", mig_parent=parent), FakeGpu(uuid="MIG-2", mig_parent=parent), FakeGpu(uuid="GPU-q")]
    )
    keys = [NvmlSensor(i).shared_key for i in range(3)]
    assert keys == ["GPU-p", "GPU-p", "GPU-q"]
    # ranks 0 and 1 train on the two MIG slices, rank 2 on its own GPU
    owners = shared_owners([[keys[0]], [keys[1]], [keys[2]]])
    assert owners == {"GPU-p": 0, "GPU-q": 2}


# ---------------------------------------------------------------- custom sensors are checked where they are built
class Custom(Sensor):
    """A user's sensor: ``fields`` become its attributes in ``__init__``."""

    kind = "power"

    def __init__(self, **fields):
        for key, value in fields.items():
            setattr(self, key, value)

    def read(self):
        return Reading(0.0, 1.0, "power")


def test_custom_sensor_with_an_undocumented_source_fails_at_construction():
    with pytest.raises(ValueError) as caught:
        Custom(name="wall_meter", source="measured")
    assert str(caught.value) == (
        "sensor 'wall_meter' (Custom) has `source` 'measured': it must be one of counter, polled, rapl, estimate,"
        " simulated"
    )


@pytest.mark.parametrize(
    ("fields", "error", "message"),
    [
        ({"source": "polled"}, TypeError, "sensor class Custom sets no `name`: give it a non-empty string"),
        ({"name": "", "source": "polled"}, TypeError, "sensor class Custom has `name` '': it must be a non-empty"),
        ({"name": "m"}, TypeError, "sensor 'm' (Custom) sets no `source`: set it to one of counter, polled, rapl"),
        ({"name": "m", "source": "polled", "kind": "watts"}, ValueError, "has `kind` 'watts': it must be one of en"),
        ({"name": "m", "source": "polled", "domain": "psu"}, ValueError, "`domain` 'psu': it must be one of gpu, cpu"),
        ({"name": "m", "source": "rapl", "host_level": 1}, TypeError, "`host_level` 1: it must be True or False"),
    ],
)
def test_custom_sensor_fields_are_checked_at_construction(fields, error, message):
    with pytest.raises(error, match=re.escape(message)):
        Custom(**fields)


def test_validate_sensor_checks_a_sensor_changed_after_construction():
    sensor = Custom(name="m", source="polled")
    assert validate_sensor(sensor) is sensor
    sensor.source = "guess"
    with pytest.raises(ValueError, match=re.escape("sensor 'm' (Custom) has `source` 'guess'")):
        validate_sensor(sensor)
    with pytest.raises(TypeError, match="expected a lightning_green.sensors.Sensor, got 'gpu0'"):
        validate_sensor("gpu0")


def test_a_sensor_may_not_take_the_name_a_listed_sensor_name_builds():
    clash = SimulatedSensor(10.0, name="cpu_estimate")
    with pytest.raises(ValueError) as caught:
        check_distinct_names(["estimate", clash])
    assert str(caught.value) == (
        "`sensors` holds SimulatedSensor(name='cpu_estimate', source='simulated') and 'estimate', which builds a"
        " sensor named cpu_estimate: two sensors would be named 'cpu_estimate'; give SimulatedSensor another `name`"
        " or drop 'estimate'"
    )
    assert CpuEstimateSensor().name == "cpu_estimate"  # the name the message promises
    with pytest.raises(ValueError, match="'auto', which builds a sensor named gpu<index>"):
        check_distinct_names(["auto", SimulatedSensor(10.0, name="gpu0")])
    with pytest.raises(ValueError, match="'rapl', which builds a sensor named rapl_<zone>"):
        check_distinct_names(["rapl", SimulatedSensor(10.0, name="rapl_dram-0")])
    with pytest.raises(ValueError, match="two sensors named 'sim'"):
        check_distinct_names([SimulatedSensor(1.0), SimulatedSensor(2.0)])
    check_distinct_names(["rapl", SimulatedSensor(10.0, name="gpu0"), SimulatedSensor(1.0, name="cpu")])
