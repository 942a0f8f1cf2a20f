"""FabricEnergy on a plain Fabric loop: logged figures, evaluation blocks, the summary, threads, and
the same figures as the Trainer's PowerSampler on the same simulated sensor and steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from unittest.mock import Mock

import pytest
import torch
from conftest import sampler_threads
from helpers import FakeClock, logged, tiny_trainer
from lightning.fabric import Fabric
from lightning.fabric.loggers import CSVLogger

from lightning_green import PowerSampler
from lightning_green.energy.rates import RateWindow
from lightning_green.fabric import FabricEnergy, measuring
from lightning_green.sensors import SimulatedSensor

WATTS, BATCH_S, STEPS, EVERY = 100.0, 0.02, 6, 2
HERE = os.path.dirname(os.path.abspath(__file__))


def recording_logger() -> Mock:
    logger = Mock()
    logger.log_dir = None
    return logger


def fabric_run(energy: FabricEnergy, clock: FakeClock, steps: int = STEPS, loggers=(), finish: bool = True) -> Fabric:
    """A plain Fabric loop on nn.Linear: the clock moves ``batch_s`` per step, a reading at each step's end."""
    torch.manual_seed(0)
    fabric = Fabric(accelerator="cpu", devices=1, callbacks=[energy], loggers=list(loggers))
    model = torch.nn.Linear(8, 1)
    model, optimizer = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    x = torch.randn(4, 8)
    for step in range(1, steps + 1):
        clock.t += clock.batch_s
        fabric.backward(model(x).pow(2).mean())
        optimizer.step()
        optimizer.zero_grad()
        if step < steps:  # the last step's reading is finish()'s own
            clock.reads.read_now()
    if finish:
        energy.finish()
    return fabric


def simulated(clock: FakeClock, **kwargs) -> FabricEnergy:
    energy = FabricEnergy(
        sensors=[SimulatedSensor(WATTS, clock=clock)],
        interval_s=3600.0,
        log_every_n_steps=EVERY,
        print_summary=False,
        clock=clock,
        **kwargs,
    )
    clock.reads = energy.session
    return energy


def test_fabric_loop_logs_energy_and_rates(tmp_path):
    clock = FakeClock(batch_s=BATCH_S)
    energy = simulated(clock, tokens_per_step=32, summary_dir=str(tmp_path))
    logger = recording_logger()
    fabric_run(energy, clock, loggers=[logger])
    assert logged(logger, "energy/total_j") == [
        (s, pytest.approx(WATTS * BATCH_S * s, rel=1e-9)) for s in range(EVERY, STEPS + 1, EVERY)
    ]
    assert [v for _, v in logged(logger, "energy/step_j")] == [pytest.approx(WATTS * BATCH_S, rel=1e-9)] * 3
    assert [v for _, v in logged(logger, "efficiency/tokens_per_j")] == [pytest.approx(32 / (WATTS * BATCH_S))] * 3
    assert logged(logger, "efficiency/samples_per_j") == []  # never counted: no rate
    assert [v for _, v in logged(logger, "efficiency/eer_j_per_param")] == [
        pytest.approx(WATTS * BATCH_S * s / 9)
        for s in (2, 4, 6)  # Linear(8, 1): 9 parameters
    ]
    summary = json.loads((tmp_path / "energy_summary_fit.json").read_text())
    assert summary["stage"] == "fit" and summary["status"] == "finished"
    assert summary["stage_energy_j"] == pytest.approx(WATTS * BATCH_S * STEPS, rel=1e-9)
    assert summary["sources"] == ["simulated"]
    rows = {r["figure"]: r for r in summary["sections"]["efficiency"]["rows"]}
    assert rows["train_tokens"]["value"] == 32 * STEPS
    assert rows["tokens_per_j"]["value"] == pytest.approx(32 * STEPS / (WATTS * BATCH_S * STEPS))
    assert rows["tokens_per_j"]["source"] == "simulated"
    assert not sampler_threads()
    assert energy.finish() is energy.summary  # a second call changes nothing


def test_evaluation_blocks_are_not_step_energy(tmp_path):
    clock = FakeClock(batch_s=BATCH_S)
    energy = simulated(clock, samples_per_step=4, summary_dir=str(tmp_path))
    logger = recording_logger()
    fabric = fabric_run(energy, clock, steps=EVERY, loggers=[logger], finish=False)
    with energy.measure_evaluation() as m:
        clock.t += 1.0  # an evaluation of 1 s inside the next window
    energy.add(samples=4)
    assert m.energy_j == pytest.approx(WATTS * 1.0)
    assert measuring(fabric) is energy
    for _ in range(EVERY):  # the optimizer steps of the next window, called as Fabric calls them
        clock.t += BATCH_S
        energy.on_after_optimizer_step(strategy=fabric.strategy, optimizer=None)
    energy.finish()
    step_j = logged(logger, "energy/step_j")
    assert step_j[-1] == (2 * EVERY, pytest.approx(WATTS * BATCH_S))  # the 1 s of evaluation left out
    samples_per_j = logged(logger, "efficiency/samples_per_j")
    assert samples_per_j[-1][1] == pytest.approx((EVERY * 4 + 4) / (EVERY * WATTS * BATCH_S))
    assert energy.results["train_energy_j"] == pytest.approx(WATTS * BATCH_S * 2 * EVERY)
    assert energy.summary["stage_energy_j"] == pytest.approx(WATTS * (BATCH_S * 2 * EVERY + 1.0))
    assert [r["loop"] for r in energy.summary["timeline"]] == ["train", "validation", "train"]
    assert measuring(fabric) is None


def test_fabric_and_trainer_give_the_same_energy(tmp_path):
    """Same simulated sensor, same clock steps: the same logged figures and summary, exactly."""
    fabric_clock = FakeClock(batch_s=BATCH_S)
    energy = simulated(fabric_clock, summary_dir=str(tmp_path / "fabric"))
    fabric_logger = recording_logger()
    fabric_run(energy, fabric_clock, loggers=[fabric_logger])

    clock = FakeClock(batch_s=BATCH_S)
    ps = PowerSampler(
        sensors=[SimulatedSensor(WATTS, clock=clock)],
        interval_s=3600.0,
        print_summary=False,
        clock=clock,
        log_trace=False,
        summary_dir=str(tmp_path / "trainer"),
    )
    clock.reads = ps.session
    trainer_logger = recording_logger()
    trainer = tiny_trainer(
        max_steps=STEPS,
        log_every_n_steps=EVERY,
        callbacks=[ps, clock],
        logger=trainer_logger,
        limit_train_batches=STEPS,
    )
    from lightning.pytorch.demos.boring_classes import BoringModel

    trainer.fit(BoringModel())
    for key in ("energy/total_j", "energy/step_j", "energy/sim_j", "power/sim_w"):
        fabric_figures, trainer_figures = logged(fabric_logger, key), logged(trainer_logger, key)
        assert [s for s, _ in fabric_figures] == [s for s, _ in trainer_figures] == [2, 4, 6], key
        for (_, a), (_, b) in zip(fabric_figures, trainer_figures, strict=True):
            assert a == pytest.approx(b, rel=1e-12), key
    assert energy.summary["stage_energy_j"] == pytest.approx(ps.summary["stage_energy_j"], rel=1e-12)
    assert energy.summary["stage_energy_j"] == pytest.approx(WATTS * BATCH_S * STEPS, rel=1e-9)


def test_csv_logger_gets_the_figures(tmp_path):
    clock = FakeClock(batch_s=BATCH_S)
    energy = simulated(clock)
    fabric_run(energy, clock, loggers=[CSVLogger(str(tmp_path), name="run")])
    text = (tmp_path / "run" / "version_0" / "metrics.csv").read_text()
    assert "energy/total_j" in text.splitlines()[0]
    assert (tmp_path / "run" / "version_0" / "energy_summary_fit.json").is_file()  # beside the logger's files


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="log_every_n_steps"):
        FabricEnergy(log_every_n_steps=0)
    with pytest.raises(ValueError, match="tokens_per_step"):
        FabricEnergy(tokens_per_step=-1)
    with pytest.raises(ValueError, match="sensors"):
        FabricEnergy(sensors="gpu")
    with pytest.raises(ValueError, match="samples"):
        FabricEnergy().add(samples=-3)


def test_steps_after_finish_log_nothing(tmp_path):
    clock = FakeClock(batch_s=BATCH_S)
    energy = simulated(clock, summary_dir=str(tmp_path))
    logger = recording_logger()
    fabric = fabric_run(energy, clock, steps=EVERY, loggers=[logger])
    calls = len(logger.log_metrics.call_args_list)
    for _ in range(4):
        energy.on_after_optimizer_step(strategy=fabric.strategy, optimizer=None)
    assert len(logger.log_metrics.call_args_list) == calls
    with pytest.raises(RuntimeError, match="running sampler"):
        with energy.measure_evaluation():
            pass


def test_rate_window_plain_calls():
    rates = RateWindow(samples_per_step=2)
    rates.n_params = 10
    rates.begin(energy_j=5.0)
    rates.steps = 3
    rates.add(tokens=7)
    finish = rates.listener(3, list)
    assert finish(25.0) == {
        "carbon/gco2e": pytest.approx(25.0 / 3.6e6 * 475.0),
        "efficiency/eer_j_per_param": 2.0,
        "efficiency/samples_per_j": 6 / 20.0,
        "efficiency/tokens_per_j": 7 / 20.0,
    }
    assert rates.totals(25.0, list)["train_samples"] == 6


def test_summary_written_at_exit_when_nobody_finishes(tmp_path):
    """No finish(): the summary is written at interpreter exit and no thread is left to stop exit."""
    script = os.path.join(HERE, "ddp_scripts", "fabric_loop.py")
    out = subprocess.run(
        [sys.executable, script, str(tmp_path), "--no-finish"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "energy_summary_fit.json").read_text())
    assert summary["status"] == "finished at exit (finish() not called)"
    assert summary["stage_energy_j"] == pytest.approx(WATTS * BATCH_S * STEPS, rel=1e-9)


def test_two_processes_sum_energy_counting_host_sensors_once(tmp_path):
    """Fabric(strategy="ddp", devices=2) on CPU: a per-process and a host-level sensor; the host one is
    read by local rank 0 only, the figures are summed at log steps and gathered at finish."""
    script = os.path.join(HERE, "ddp_scripts", "fabric_loop.py")
    out = subprocess.run([sys.executable, script, str(tmp_path), "--ddp"], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    host_w, device_w = 50.0, WATTS
    window_s = BATCH_S * STEPS
    for r in ranks:
        total = dict(map(tuple, r["logged"]["energy/total_j"]))
        assert total == {s: pytest.approx((host_w + 2 * device_w) * BATCH_S * s, rel=1e-9) for s in (2, 4, 6)}
        step_j = [v for _, v in r["logged"]["energy/step_j"]]
        assert step_j == [pytest.approx((host_w + 2 * device_w) * BATCH_S, rel=1e-9)] * 3
    assert sorted(ranks[0]["sensors"]) == ["dev", "host"] and ranks[1]["sensors"] == ["dev"]
    summary = json.loads((tmp_path / "energy_summary_fit.json").read_text())
    assert summary["cluster"]["world_size"] == 2
    assert summary["cluster"]["stage_total_j"] == pytest.approx((host_w + 2 * device_w) * window_s, rel=1e-9)
    assert summary["cluster"]["imbalance"] == pytest.approx(1.0)
    rows = {r["figure"]: r["value"] for r in summary["sections"]["efficiency"]["rows"]}
    assert rows["train_tokens"] == 2 * 16 * STEPS


def test_logged_keys_are_in_the_readme_table(tmp_path):
    from test_readme import FABRIC, documented_keys, normalise

    clock = FakeClock(batch_s=BATCH_S)
    energy = simulated(clock, samples_per_step=4, tokens_per_step=32, summary_dir=str(tmp_path))
    logger = recording_logger()
    fabric_run(energy, clock, loggers=[logger])
    logged = {
        normalise(k) for call in logger.log_metrics.call_args_list for k in call.args[0] or call.kwargs["metrics"]
    }
    assert logged == {
        "energy/total_j",
        "energy/step_j",
        "energy/<sensor>_j",
        "power/<sensor>_w",
        "power_trace/<sensor>_w",
        "efficiency/eer_j_per_param",
        "efficiency/samples_per_j",
        "efficiency/tokens_per_j",
        "carbon/gco2e",
    }
    assert logged == documented_keys(FABRIC)


def test_setup_module_is_measured_from_the_first_optimizer_step(tmp_path):
    """``fabric.setup_module`` + ``setup_optimizers`` (LitGPT's LoRA scripts) fire no setup hook: the
    first optimizer step starts the measurement, and the summary is written (no logger is reachable)."""
    clock = FakeClock(batch_s=BATCH_S)
    energy = simulated(clock, summary_dir=str(tmp_path))
    fabric = Fabric(accelerator="cpu", devices=1, callbacks=[energy])
    model = fabric.setup_module(torch.nn.Linear(8, 1))
    optimizer = fabric.setup_optimizers(torch.optim.SGD(model.parameters(), lr=0.1))
    assert not energy.started
    for _ in range(1 + STEPS):
        fabric.backward(model(torch.ones(2, 8)).sum())
        optimizer.step()
        optimizer.zero_grad()
        clock.t += BATCH_S
    assert energy.started and measuring(fabric) is energy and energy.steps == 1 + STEPS
    energy.finish()
    summary = json.loads((tmp_path / "energy_summary_fit.json").read_text())
    # from the end of the first step (the clock then) to finish(), 1 + STEPS moves of the clock later
    assert summary["stage_energy_j"] == pytest.approx(WATTS * BATCH_S * (1 + STEPS), rel=1e-9)
    assert not sampler_threads()


class CpuStrategy:
    root_device = torch.device("cpu")


class TwoProcessFabric:
    """Rank 0 of a 2-process Fabric whose process group is gone (as at interpreter exit)."""

    world_size, global_rank, local_rank, node_rank, is_global_zero = 2, 0, 0, 0, True

    def __init__(self, loggers):
        self.loggers = loggers
        self.device = torch.device("cpu")
        self.strategy = CpuStrategy()

    def all_reduce(self, tensor, reduce_op):
        raise AssertionError("no collective at exit")


def test_at_exit_of_several_processes_no_collective_and_said_so(tmp_path):
    clock = FakeClock(batch_s=BATCH_S)
    energy = simulated(clock, summary_dir=str(tmp_path))
    logger = recording_logger()
    energy.on_after_setup(TwoProcessFabric([logger]), torch.nn.Linear(8, 1))
    for _ in range(EVERY + 1):  # the last step is in a window no log step closed
        clock.t += BATCH_S
        energy.on_after_optimizer_step(strategy=None, optimizer=None)
        if logger.log_metrics.call_args_list:
            break
    logger.log_metrics.reset_mock()
    clock.t += BATCH_S
    energy.on_after_optimizer_step(strategy=None, optimizer=None)
    energy._at_exit()  # what atexit calls when nobody called finish()
    assert logged(logger, "energy/total_j") == []  # the partial window would need the other rank's sum
    summary = json.loads((tmp_path / "energy_summary_fit.json").read_text())
    assert summary["status"] == "finished at exit (finish() not called); rank 0's figures only, of 2 processes"
    assert summary["cluster"]["world_size"] == 1
    assert summary["stage_energy_j"] == pytest.approx(WATTS * BATCH_S * (EVERY + 1), rel=1e-9)
    assert not sampler_threads()
