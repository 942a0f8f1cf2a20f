import time
from unittest.mock import Mock

import pytest
import torch
from helpers import FakeClock, logged, tiny_trainer
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader, Dataset

from lightning_green import PowerSampler
from lightning_green.energy import EnergyMeter
from lightning_green.energy.phases import PhaseAccumulator, split_out, step_intervals
from lightning_green.sensors import Reading, SimulatedSensor


def test_split_out():
    outside, inside = split_out((0.0, 10.0), [(2.0, 3.0), (8.0, 12.0)])
    assert outside == [(0.0, 2.0), (3.0, 8.0)]
    assert inside == [(2.0, 3.0), (8.0, 10.0)]


def test_step_intervals_rule():
    edges = {
        "prev_end": [0.0],
        "batch_start": [1.0],
        "zero_grad": [3.0],
        "backward_start": [3.5],
        "backward_end": [6.0],
        "optimizer_start": [6.5],
        "batch_end": [8.0],
    }
    got = step_intervals(edges, comm_s=1.0)
    assert got == [
        ("data", 0.0, 1.0),
        ("compute", 1.0, 3.0),
        ("optimizer", 3.0, 3.5),
        ("compute", 3.5, 5.0),
        ("comm", 5.0, 6.0),
        ("other", 6.0, 6.5),
        ("optimizer", 6.5, 8.0),
    ]
    assert sum(b - a for _, a, b in got) == pytest.approx(8.0)  # phases tile the step


def test_step_intervals_with_accumulation():
    edges = {
        "prev_end": [0.0],
        "batch_start": [1.0, 4.0],
        "backward_start": [2.0, 5.0],
        "backward_end": [3.0, 6.0],
        "optimizer_start": [6.0],
        "batch_end": [3.2, 7.0],
    }
    got = step_intervals(edges)
    assert ("data", 3.0, 4.0) in got
    assert sum(b - a for p, a, b in got if p == "compute") == pytest.approx(4.0)
    assert sum(b - a for _, a, b in got) == pytest.approx(7.0)


def test_accumulator_energy_by_time():
    meter = EnergyMeter()
    meter.add_channel({"name": "p", "source": "simulated", "kind": "power"})
    meter.record("p", Reading(0.0, 100.0, "power"))
    meter.record("p", Reading(10.0, 300.0, "power"))  # a ramp: 100 W -> 300 W
    acc = PhaseAccumulator()
    acc.add([("data", 0.0, 5.0), ("compute", 5.0, 10.0)])
    acc.resolve(meter, until_s=6.0)  # only what ended by 6 s
    assert len(acc.pending) == 1
    acc.resolve(meter)
    seconds, joules = acc.pop_window()
    assert seconds["data"] == 5.0 and joules["data"] == pytest.approx(750.0)
    assert joules["compute"] == pytest.approx(1250.0)
    assert acc.pop_window()[0]["data"] == 0.0  # the window was reset
    rows = acc.rows(None, "not measurable on this hardware: no RAPL dram zone")
    assert rows[0]["energy_share_pct"] == pytest.approx(37.5)
    assert rows[-1]["energy_j"] is None and "not measurable" in rows[-1]["note"]


class SlowData(Dataset):
    def __init__(self, sleep_s, sleep=time.sleep):
        self.sleep_s, self.sleep = sleep_s, sleep

    def __len__(self):
        return 1000

    def __getitem__(self, i):
        self.sleep(self.sleep_s)
        return torch.randn(8)


class SleepyOptimizer(torch.optim.SGD):
    def __init__(self, params, sleep_s, sleep=time.sleep):
        super().__init__(params, lr=0.01)
        self.sleep_s, self.sleep = sleep_s, sleep

    def step(self, closure=None):
        loss = closure() if closure is not None else None
        self.sleep(self.sleep_s)
        super().step()
        return loss


class Phased(LightningModule):
    def __init__(self, data_s, compute_s, opt_s, sleep=time.sleep):
        super().__init__()
        self.layer = torch.nn.Linear(8, 1)
        self.data_s, self.compute_s, self.opt_s, self.sleep = data_s, compute_s, opt_s, sleep

    def training_step(self, batch, batch_idx):
        self.sleep(self.compute_s)
        return self.layer(batch).sum()

    def train_dataloader(self):
        return DataLoader(SlowData(self.data_s, self.sleep), batch_size=1)

    def configure_optimizers(self):
        return SleepyOptimizer(self.parameters(), self.opt_s, self.sleep)


def test_overflow_keeps_time():
    acc = PhaseAccumulator(max_pending=2)
    acc.add([("data", 0.0, 1.0), ("compute", 1.0, 3.0), ("optimizer", 3.0, 4.0)])
    assert acc.unattributed_s == 1.0 and acc.total_s["data"] == 1.0 and len(acc.pending) == 2


def test_known_sleeps_give_the_split(tmp_path):
    # Simulated time: data, compute and the optimizer step each move the clock by a known amount, and
    # nothing else does, so each phase's seconds and joules are exact (no race with a busy machine).
    logger, clock = Mock(), FakeClock()
    logger.log_dir = logger.save_dir = None
    ps = PowerSampler(
        sensors=[SimulatedSensor(100.0, clock=clock)],
        interval_s=3600.0,
        phases=True,
        summary_dir=str(tmp_path),
        print_summary=False,
        clock=clock,
    )
    tiny_trainer(max_steps=12, log_every_n_steps=4, callbacks=[ps], logger=logger).fit(
        Phased(0.02, 0.04, 0.03, sleep=clock.sleep)
    )
    rows = {r["phase"]: r for r in ps.summary["sections"]["phases"]["rows"]}
    for phase, seconds in {"data": 0.02, "compute": 0.04, "optimizer": 0.03, "comm": 0.0, "other": 0.0}.items():
        assert rows[phase]["seconds"] == pytest.approx(12 * seconds, abs=1e-9), (phase, rows)
        assert rows[phase]["energy_j"] == pytest.approx(100.0 * 12 * seconds, abs=1e-6), (phase, rows)
    assert rows["data"]["energy_share_pct"] == pytest.approx(100 * 0.02 / 0.09)
    assert "not measurable" in rows["memory (dram)"]["note"]
    assert [v for _, v in logged(logger, "energy/phase/data_j")] == [pytest.approx(100.0 * 4 * 0.02)] * 3
    assert [v for _, v in logged(logger, "time/phase/compute_s")] == [pytest.approx(4 * 0.04)] * 3


def test_dram_zone_reported_as_memory(tmp_path):
    clock = FakeClock()
    dram = SimulatedSensor(5.0, name="rapl_dram-0", host_level=True, domain="dram", clock=clock)
    ps = PowerSampler(
        sensors=[SimulatedSensor(100.0, clock=clock), dram],
        interval_s=3600.0,
        phases=True,
        summary_dir=str(tmp_path),
        print_summary=False,
        clock=clock,
    )
    tiny_trainer(max_steps=4, callbacks=[ps]).fit(Phased(0.0, 0.01, 0.0, sleep=clock.sleep))
    row = ps.summary["sections"]["phases"]["rows"][-1]
    assert row["energy_j"] == pytest.approx(5.0 * 4 * 0.01) and ps.summary["sensors"][1]["duration_s"] == pytest.approx(
        4 * 0.01
    )
    assert "rapl_dram-0" in row["note"]


def test_phase_timing_validation():
    with pytest.raises(ValueError, match="phase_timing.*allowed: host, cuda_events, sync"):
        PowerSampler(phases=True, phase_timing="events")
    ps = PowerSampler(sensors=[SimulatedSensor(1.0)], phases=True, phase_timing="cuda_events", print_summary=False)
    with pytest.raises(MisconfigurationException, match="needs a CUDA device"):
        tiny_trainer(callbacks=[ps]).fit(Phased(0.0, 0.0, 0.0))


def test_summary_tables_name_the_source(tmp_path):
    from lightning_green import EfficiencyLogger

    ps = PowerSampler(
        sensors=[SimulatedSensor(100.0)], interval_s=0.02, phases=True, summary_dir=str(tmp_path), print_summary=False
    )
    tiny_trainer(max_steps=4, callbacks=[ps, EfficiencyLogger()]).fit(Phased(0.0, 0.01, 0.0))
    phases = ps.summary["sections"]["phases"]["rows"]
    assert all(r["source"] == "simulated" for r in phases[:5])
    assert phases[5]["source"] == ""  # no dram zone: no memory figure, so no source either
    eff = {r["figure"]: r["source"] for r in ps.summary["sections"]["efficiency"]["rows"]}
    assert eff["train_energy_j"] == eff["eer_j_per_param"] == eff["carbon_gco2e"] == "simulated"
    assert eff["train_samples"] == "" and eff["n_params"] == ""
