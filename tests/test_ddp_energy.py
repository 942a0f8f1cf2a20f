"""Energy across processes: two CPU ranks (spawn, so pytest is not re-run in the children)."""

import json

import pytest
from helpers import SleepyModel, tiny_trainer

import lightning_green  # noqa: F401  (registers ddp_green_spawn)
from lightning_green import EfficiencyLogger, PowerSampler
from lightning_green.sensors import SimulatedSensor


def test_two_ranks_total_is_twice_one_rank(tmp_path):
    ps = PowerSampler(
        sensors=[
            SimulatedSensor(100.0, name="gpu_sim"),
            SimulatedSensor(10.0, name="host_sim", host_level=True, domain="cpu"),
        ],
        interval_s=0.02,
        summary_dir=str(tmp_path),
        print_summary=False,
    )
    trainer = tiny_trainer(max_steps=10, devices=2, strategy="ddp_green_spawn", callbacks=[ps, EfficiencyLogger()])
    trainer.fit(SleepyModel(step_s=0.02))
    summary = json.loads((tmp_path / "energy_summary_fit.json").read_text())
    cluster = summary["cluster"]
    assert cluster["world_size"] == 2 and cluster["num_nodes"] == 1
    per_rank = {r["rank"]: r for r in cluster["per_rank"]}
    # each rank has its own 100 W device sensor; the 10 W host sensor is read by local rank 0 only
    assert per_rank[0]["device_energy_j"] == pytest.approx(per_rank[1]["device_energy_j"], rel=0.05)
    device_total = per_rank[0]["device_energy_j"] + per_rank[1]["device_energy_j"]
    assert device_total == pytest.approx(2 * per_rank[1]["device_energy_j"], rel=0.05)
    host_j = per_rank[0]["energy_j"] - per_rank[0]["device_energy_j"]
    assert per_rank[1]["energy_j"] == pytest.approx(per_rank[1]["device_energy_j"])  # no host sensor on rank 1
    assert host_j == pytest.approx(per_rank[0]["device_energy_j"] / 10, rel=0.05)
    assert cluster["total_j"] == pytest.approx(device_total + host_j)
    assert cluster["imbalance"] == pytest.approx(1.0, abs=0.05)
    assert [s["name"] for s in summary["sensors"]] == ["gpu_sim", "host_sim"]
