import json
import os
import subprocess
import sys
from unittest.mock import Mock

import pytest
import torch
from conftest import sampler_threads
from fake_pynvml import FakeGpu
from helpers import FakeClock, SleepyModel, logged, tiny_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_green import EfficiencyLogger, NvmlSensor, PowerSampler
from lightning_green.sensors import Reading, Sensor, SimulatedSensor


def mock_logger():
    logger = Mock()
    logger.log_dir = None
    logger.save_dir = None
    return logger


def test_logs_energy_power_and_step_energy(tmp_path):
    # Simulated timestamps: every batch lasts exactly 20 ms on the sensor's clock, so the energy
    # arithmetic is exact however busy the machine is (the sampler thread never reads on its own).
    logger, clock = mock_logger(), FakeClock(batch_s=0.02)
    ps = PowerSampler(
        sensors=[SimulatedSensor(100.0, clock=clock)],
        interval_s=3600.0,
        summary_dir=str(tmp_path),
        print_summary=False,
        clock=clock,
    )
    clock.reads = ps.session  # a reading at every batch end: trace points, and windows that end on a reading
    trainer = tiny_trainer(max_steps=20, log_every_n_steps=5, logger=logger, callbacks=[clock, ps])
    trainer.fit(SleepyModel(step_s=0.0))
    totals = logged(logger, "energy/total_j")
    assert [s for s, _ in totals] == [5, 10, 15, 20]  # step = optimizer steps done
    assert [total for _, total in totals] == [pytest.approx(100.0 * 0.02 * step) for step in (5, 10, 15, 20)]
    assert [w for _, w in logged(logger, "power/sim_w")] == [pytest.approx(100.0)] * 4
    assert [v for _, v in logged(logger, "energy/step_j")] == [pytest.approx(100.0 * 0.02)] * 4  # 20 ms of 100 W
    assert [v for _, v in logged(logger, "energy/sim_j")] == [v for _, v in totals]
    trace = logged(logger, "power_trace/sim_w")
    assert trace and all(v == pytest.approx(100.0) for _, v in trace)
    # ms since the first reading, on the simulated clock: one point per batch end but the last
    assert [s for s, _ in trace] == list(range(20, 20 * 20, 20))
    assert len(trace) <= 4 * ps.trace_points
    assert not sampler_threads()


def test_summary_json_in_log_dir(tmp_path):
    logger, clock = TensorBoardLogger(tmp_path), FakeClock(batch_s=0.01)
    sensors = [
        SimulatedSensor(50.0, name="a", clock=clock),
        SimulatedSensor(25.0, name="b", host_level=True, domain="cpu", clock=clock),
    ]
    ps = PowerSampler(sensors=sensors, interval_s=3600.0, print_summary=False, clock=clock)
    clock.reads = ps.session
    tiny_trainer(max_steps=10, logger=logger, callbacks=[clock, ps]).fit(SleepyModel(step_s=0.0))
    path = os.path.join(logger.log_dir, "energy_summary_fit.json")
    data = json.load(open(path))
    assert data["stage"] == "fit" and data["status"] == "finished"
    by_name = {s["name"]: s for s in data["sensors"]}
    assert by_name["a"]["source"] == "simulated"
    assert by_name["a"]["stage_energy_j"] == pytest.approx(50.0 * 10 * 0.01)
    assert by_name["b"]["stage_energy_j"] == pytest.approx(25.0 * 10 * 0.01)
    assert by_name["a"]["stage_mean_power_w"] == pytest.approx(50.0)
    assert by_name["a"]["peak_power_w"] == pytest.approx(50.0)
    assert data["cumulative_energy_j"] == pytest.approx(by_name["a"]["stage_energy_j"] + by_name["b"]["stage_energy_j"])
    assert data["cluster"]["world_size"] == 1
    assert data["cluster"]["total_j"] == pytest.approx(data["cumulative_energy_j"])
    assert data["trace"]["a"] and data["partial"] == []


def test_tensorboard_event_file(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger, clock = TensorBoardLogger(tmp_path, name="tb"), FakeClock(batch_s=0.02)
    ps = PowerSampler(
        sensors=[SimulatedSensor(power_w=100.0, clock=clock)], interval_s=3600.0, print_summary=False, clock=clock
    )
    clock.reads = ps.session
    tiny_trainer(max_steps=20, log_every_n_steps=10, logger=logger, callbacks=[clock, ps]).fit(SleepyModel(step_s=0.0))
    acc = EventAccumulator(logger.log_dir)
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {
        "energy/total_j",
        "energy/sim_j",
        "energy/step_j",
        "power/sim_w",
        "energy/epoch_j",
        "power_trace/sim_w",
    } <= tags
    last = acc.Scalars("energy/total_j")[-1]
    assert last.step == 20
    assert last.value == pytest.approx(100.0 * 20 * 0.02)
    trace = acc.Scalars("power_trace/sim_w")
    assert len(trace) >= 5 and all(e.value == pytest.approx(100.0) for e in trace)
    assert [e.step for e in trace] == sorted(e.step for e in trace)  # milliseconds since start


class Exploding(Sensor):
    source, kind, name = "simulated", "power", "flaky"

    def __init__(self, after):
        self.n, self.after = 0, after

    def read(self):
        self.n += 1
        if self.n > self.after:
            raise OSError("device vanished")
        return Reading(__import__("time").monotonic(), 10.0, "power")


def test_failing_sensor_does_not_stop_training(tmp_path):
    ps = PowerSampler(
        sensors=[SimulatedSensor(100.0), Exploding(after=3)],
        interval_s=0.01,
        summary_dir=str(tmp_path),
        print_summary=False,
    )
    trainer = tiny_trainer(max_steps=20, callbacks=[ps])
    trainer.fit(SleepyModel(step_s=0.01))
    assert trainer.global_step == 20
    assert ps.summary["partial"] == [
        "flaky: dropped (OSError: device vanished); figures up to its last good reading + at most one interval"
    ]
    assert ps.summary["sensors"][0]["partial"] is False


def test_gpu_lost_mid_run_with_fake_nvml(fake_nvml, tmp_path):
    fake_nvml(gpus=[FakeGpu(uuid="GPU-a", power_w=300.0, lost_after_reads=4)])
    ps = PowerSampler(
        sensors=[NvmlSensor(0), SimulatedSensor(10.0)], interval_s=0.01, summary_dir=str(tmp_path), print_summary=False
    )
    trainer = tiny_trainer(max_steps=15, callbacks=[ps])
    trainer.fit(SleepyModel(step_s=0.01))
    assert trainer.global_step == 15
    gpu = next(s for s in ps.summary["sensors"] if s["name"] == "gpu0")
    assert gpu["source"] == "counter" and "GPU_IS_LOST" in gpu["failed"]
    assert any(p.startswith("gpu0:") for p in ps.summary["partial"])
    assert gpu["stage_energy_j"] > 0  # what was read before the loss is kept


def test_polled_fallback_in_a_run(fake_nvml, tmp_path):
    fake_nvml(gpus=[FakeGpu(uuid="GPU-a", power_w=200.0, counter=False)])
    ps = PowerSampler(sensors=[NvmlSensor(0)], interval_s=0.01, summary_dir=str(tmp_path), print_summary=False)
    tiny_trainer(max_steps=10, callbacks=[ps]).fit(SleepyModel(step_s=0.01))
    gpu = ps.summary["sensors"][0]
    assert gpu["source"] == "polled" and gpu["stage_mean_power_w"] == pytest.approx(200.0, rel=0.01)


def test_nan_and_negative_readings_are_gaps(tmp_path):
    values = iter([10.0, float("nan"), -3.0] + [10.0] * 10_000)

    class Noisy(Sensor):
        source, kind, name = "simulated", "power", "noisy"

        def read(self):
            return Reading(__import__("time").monotonic(), next(values), "power")

    ps = PowerSampler(sensors=[Noisy()], interval_s=0.01, summary_dir=str(tmp_path), print_summary=False)
    tiny_trainer(max_steps=10, callbacks=[ps]).fit(SleepyModel(step_s=0.01))
    s = ps.summary["sensors"][0]
    assert s["gaps"] == 2 and s["partial"] and s["stage_energy_j"] == pytest.approx(10.0 * s["duration_s"], rel=0.01)
    (partial,) = ps.summary["partial"]
    assert (
        partial.startswith("noisy: 2 readings rejected; ")
        and "s of gaps bridged by interpolated power; last: " in partial
    )


def test_no_thread_after_exception(tmp_path):
    ps = PowerSampler(sensors=[SimulatedSensor(1.0)], interval_s=0.01, summary_dir=str(tmp_path), print_summary=False)
    with pytest.raises(RuntimeError, match="boom"):
        tiny_trainer(max_steps=10, callbacks=[ps]).fit(SleepyModel(fail_at=3))
    assert not sampler_threads()
    assert ps.summary["status"] == "interrupted (RuntimeError)"


def test_no_thread_after_keyboard_interrupt(tmp_path):
    ps = PowerSampler(sensors=[SimulatedSensor(1.0)], interval_s=0.01, summary_dir=str(tmp_path), print_summary=False)
    with pytest.raises(SystemExit):  # Lightning turns Ctrl+C into a graceful shutdown and sys.exit(1)
        tiny_trainer(max_steps=10, callbacks=[ps]).fit(SleepyModel(interrupt_at=3))
    assert not sampler_threads()
    assert ps.summary["status"].startswith("interrupted")


def test_runs_in_validate_test_predict(tmp_path):
    ps = PowerSampler(sensors=[SimulatedSensor(1.0)], interval_s=0.01, summary_dir=str(tmp_path), print_summary=False)
    trainer = tiny_trainer(callbacks=[ps], limit_val_batches=2, limit_test_batches=2, limit_predict_batches=2)
    model = SleepyModel()
    for run in (trainer.validate, trainer.test, trainer.predict):
        run(model)
        assert ps.summary["stage"] == run.__name__ and not sampler_threads()
    assert os.path.exists(tmp_path / "energy_summary_test.json")
    assert not os.path.exists(tmp_path / "energy_summary_validate.json")


def test_resume_continues_total(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=10, save_top_k=-1)
    clock1 = FakeClock(0.1)
    ps1 = PowerSampler(
        sensors=[SimulatedSensor(100.0, clock=clock1)],
        interval_s=3600.0,
        summary_dir=str(tmp_path),
        print_summary=False,
        clock=clock1,
    )
    clock1.reads = ps1.session
    trainer1 = tiny_trainer(max_steps=10, callbacks=[clock1, ps1, ckpt], enable_checkpointing=True)
    trainer1.fit(SleepyModel(step_s=0.0))
    state = torch.load(tmp_path / "epoch=0-step=10.ckpt", weights_only=False)["callbacks"]
    saved = next(v for k, v in state.items() if k.startswith("PowerSampler"))
    # saved after step 10: ten batches of 0.1 simulated seconds at 100 W
    assert saved["total_j"] == pytest.approx(100.0)

    logger = mock_logger()
    clock2 = FakeClock(0.1)
    ps2 = PowerSampler(
        sensors=[SimulatedSensor(100.0, clock=clock2)],
        interval_s=3600.0,
        summary_dir=str(tmp_path),
        print_summary=False,
        clock=clock2,
    )
    clock2.reads = ps2.session
    trainer = tiny_trainer(max_steps=20, log_every_n_steps=5, callbacks=[clock2, ps2], logger=logger)
    trainer.fit(SleepyModel(step_s=0.0), ckpt_path=tmp_path / "epoch=0-step=10.ckpt")
    s = ps2.summary
    assert s["restored_j"] == pytest.approx(100.0)
    # as an uninterrupted run: ten more batches of 0.1 s at 100 W on top of what was restored
    assert s["cumulative_energy_j"] == pytest.approx(200.0)
    assert [v for _, v in logged(logger, "energy/total_j")] == pytest.approx([150.0, 200.0])


def test_efficiency_needs_power_sampler():
    with pytest.raises(RuntimeError, match="needs a PowerSampler"):
        tiny_trainer(callbacks=[EfficiencyLogger()]).fit(SleepyModel())


def test_efficiency_metrics(tmp_path):
    logger = mock_logger()
    ps = PowerSampler(sensors=[SimulatedSensor(100.0)], interval_s=0.01, summary_dir=str(tmp_path), print_summary=False)
    eff = EfficiencyLogger(carbon_intensity_g_per_kwh=500.0, pue=1.5, tokens_per_batch="numel")
    trainer = tiny_trainer(
        max_steps=10,
        log_every_n_steps=5,
        limit_val_batches=3,
        val_check_interval=10,
        callbacks=[ps, eff],
        logger=logger,
    )
    model = SleepyModel(step_s=0.01)
    trainer.fit(model)
    r = eff.results
    assert r["n_params"] == 66
    assert r["train_samples"] == 10  # BoringModel batches are [1, 32]
    assert r["eer_j_per_param"] == pytest.approx(r["train_energy_j"] / 66)
    assert r["tokens_per_j"] == pytest.approx(10 * 32 / r["train_energy_j"])
    assert r["validate_samples"] == 3
    assert r["validate_epi_j"] == pytest.approx(r["validate_energy_j"] / 3)
    assert r["validate_epi_j_per_token"] == pytest.approx(r["validate_energy_j"] / (3 * 32))
    # validation energy is not training energy
    assert r["train_energy_j"] + r["validate_energy_j"] <= ps.energy_now_j() + 1e-6
    carbon = logged(logger, "carbon/gco2e")[-1][1]
    total = logged(logger, "energy/total_j")[-1][1]
    assert carbon == pytest.approx(total / 3.6e6 * 1.5 * 500.0, rel=0.05)
    assert logged(logger, "efficiency/epi_j") and logged(logger, "efficiency/epi_j_per_token")
    assert "efficiency" in ps.summary["sections"]


@pytest.mark.parametrize(
    "kwargs, arg",
    [
        ({"interval_s": 0}, "interval_s"),
        ({"interval_s": -1.0}, "interval_s"),
        ({"sensors": "gpu"}, "allowed: auto, nvml, rapl, estimate"),
        ({"sensors": []}, "sensors"),
        ({"sensors": [object()]}, "not a lightning_green.sensors.Sensor"),
        ({"sensors": [SimulatedSensor(1.0), SimulatedSensor(2.0)]}, "two sensors named"),
        ({"trace_points": 0}, "trace_points"),
    ],
)
def test_power_sampler_bad_input(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        PowerSampler(**kwargs)


@pytest.mark.parametrize(
    "kwargs, arg",
    [
        ({"carbon_intensity_g_per_kwh": -1.0}, "carbon_intensity_g_per_kwh"),
        ({"pue": 0.9}, "pue"),
        ({"tokens_per_batch": "words"}, "tokens_per_batch"),
    ],
)
def test_efficiency_bad_input(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        EfficiencyLogger(**kwargs)


def test_lightning_cli_yaml(tmp_path):
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.demos.boring_classes import BoringModel

    config = tmp_path / "config.yaml"
    config.write_text(
        """
trainer:
  max_steps: 3
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  callbacks:
    - class_path: lightning_green.PowerSampler
      init_args:
        sensors: estimate
        interval_s: 0.05
        print_summary: false
    - class_path: lightning_green.EfficiencyLogger
      init_args:
        carbon_intensity_g_per_kwh: 100.0
        pue: 1.2
"""
    )
    cli = LightningCLI(
        BoringModel,
        args=["--config", str(config), f"--trainer.default_root_dir={tmp_path}"],
        run=False,
        save_config_callback=None,
    )
    ps, eff = cli.trainer.callbacks[:2]
    assert isinstance(ps, PowerSampler) and ps.interval_s == 0.05
    assert isinstance(eff, EfficiencyLogger) and (eff.carbon_intensity_g_per_kwh, eff.pue) == (100.0, 1.2)
    cli.trainer.fit(cli.model)
    assert ps.summary["sources"] == ["estimate"]


def test_import_needs_no_pynvml_torchao_psutil():
    # torch.cuda imports pynvml on its own, so block the three modules: importing lightning_green
    # must not need them (they load where they are used)
    code = (
        "import sys\n"
        "for m in ('pynvml', 'torchao', 'psutil'): sys.modules[m] = None\n"
        "import lightning_green\n"
        "print(lightning_green.PowerSampler.__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "PowerSampler"


def test_measure_block_energy(tmp_path):

    from lightning.pytorch import Callback

    got = {}

    class Probe(Callback):
        def on_train_end(self, trainer, pl_module):
            with ps.measure() as m:
                clock.t += 0.2  # a block of 200 ms on the simulated clock
            got["m"] = m

    clock = FakeClock(batch_s=0.01)
    ps = PowerSampler(
        sensors=[SimulatedSensor(50.0, clock=clock)],
        interval_s=3600.0,
        summary_dir=str(tmp_path),
        print_summary=False,
        clock=clock,
    )
    tiny_trainer(max_steps=2, callbacks=[clock, ps, Probe()]).fit(SleepyModel(step_s=0.0))
    m = got["m"]
    assert m.duration_s == pytest.approx(0.2)
    assert m.energy_j == pytest.approx(50.0 * 0.2)
    assert m.sources == ["simulated"] and m.power_w == pytest.approx(50.0)
    with pytest.raises(RuntimeError, match="running sampler"):
        with ps.measure():
            pass


def test_summary_table_names_sources_and_partial(tmp_path, capsys):
    ps = PowerSampler(sensors=[SimulatedSensor(100.0), Exploding(after=2)], interval_s=0.01, summary_dir=str(tmp_path))
    tiny_trainer(max_steps=8, callbacks=[ps]).fit(SleepyModel(step_s=0.01))
    out = capsys.readouterr().out
    assert "simulated" in out and "flaky" in out and "failed" in out
    assert (
        "partial figures: flaky: dropped (OSError: device vanished); figures up to its last good reading + at most "
        "one interval" in out
    )
    assert "[source: simulated]" in out


def test_accumulation_counts_optimizer_steps(tmp_path):
    logger, clock = mock_logger(), FakeClock(batch_s=0.01)
    sensor = SimulatedSensor(100.0, clock=clock)
    ps = PowerSampler(
        sensors=[sensor], interval_s=3600.0, phases=True, summary_dir=str(tmp_path), print_summary=False, clock=clock
    )
    eff = EfficiencyLogger()
    tiny_trainer(
        max_steps=3, accumulate_grad_batches=2, log_every_n_steps=1, logger=logger, callbacks=[clock, ps, eff]
    ).fit(SleepyModel(step_s=0.0))
    assert [s for s, _ in logged(logger, "energy/step_j")] == [1, 2, 3]  # no extra "step 0" for the first micro-batch
    step_j = [v for _, v in logged(logger, "energy/step_j")]
    assert step_j == [pytest.approx(100.0 * 2 * 0.01)] * 3  # two 10 ms micro-batches at 100 W per optimizer step
    assert eff.results["train_samples"] == 6


def test_step_energy_excludes_validation(tmp_path):
    logger, clock = mock_logger(), FakeClock(batch_s=0.01)

    class SlowVal(SleepyModel):
        def validation_step(self, batch, batch_idx):
            clock.t += 0.05
            return super().validation_step(batch, batch_idx)

    ps = PowerSampler(
        sensors=[SimulatedSensor(100.0, clock=clock)],
        interval_s=3600.0,
        summary_dir=str(tmp_path),
        print_summary=False,
        clock=clock,
    )
    tiny_trainer(
        max_steps=8,
        log_every_n_steps=4,
        limit_val_batches=4,
        val_check_interval=2,
        logger=logger,
        callbacks=[clock, ps, EfficiencyLogger()],
    ).fit(SlowVal(step_s=0.0))
    # a step is 10 ms at 100 W (1 J); the 4 validation batches of 50 ms every 2 steps (20 J) are not step energy
    assert [v for _, v in logged(logger, "energy/step_j")] == [pytest.approx(1.0)] * 2
    # logged at the end of step 8, before that step's validation: 8 steps and 3 validations
    assert [v for _, v in logged(logger, "energy/total_j")][-1] == pytest.approx(100.0 * (8 * 0.01 + 3 * 4 * 0.05))


def test_efficiency_resume_keeps_training_energy(tmp_path):
    ckpt, clock = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=5, save_top_k=-1), FakeClock(batch_s=0.02)

    def sampler():
        return PowerSampler(
            sensors=[SimulatedSensor(100.0, clock=clock)],
            interval_s=3600.0,
            summary_dir=str(tmp_path),
            print_summary=False,
            clock=clock,
        )

    eff1, eff2 = EfficiencyLogger(), EfficiencyLogger()
    tiny_trainer(max_steps=5, callbacks=[clock, sampler(), eff1, ckpt], enable_checkpointing=True).fit(
        SleepyModel(step_s=0.0)
    )
    tiny_trainer(max_steps=10, callbacks=[clock, sampler(), eff2]).fit(
        SleepyModel(step_s=0.0), ckpt_path=tmp_path / "epoch=0-step=5.ckpt"
    )
    assert eff2.results["train_samples"] == 10
    assert eff1.results["train_energy_j"] == pytest.approx(100.0 * 5 * 0.02)  # 5 steps of 20 ms at 100 W
    assert eff2.results["train_energy_j"] == pytest.approx(100.0 * 10 * 0.02)  # the first 5 steps are kept
