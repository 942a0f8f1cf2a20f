"""PowerSampler's interface for other callbacks (:class:`SamplerInterface`), read through a Trainer run
on a simulated sensor and an injected clock: exact arithmetic, no wall time."""

from __future__ import annotations

import itertools
import pathlib
import re

import pytest
from helpers import FakeClock, SleepyModel, tiny_trainer
from lightning.pytorch import Callback

import lightning_green
from lightning_green import PowerSampler
from lightning_green.callbacks.power import SamplerInterface, find_power_sampler
from lightning_green.sensors import SimulatedSensor

WATTS = 100.0
BATCH_S = 0.5

INTERFACE = {
    "properties": [
        "clock",
        "evaluation_energy_j",
        "logged_total_j",
        "measuring",
        "sensors",
        "stage",
        "summary",
        "summary_by_stage",
    ],
    "methods": [
        "add_log_step_listener",
        "add_summary_provider",
        "add_summary_section",
        "device_energy_j",
        "energy_at_j",
        "energy_now_j",
        "generation_phase",
        "measure",
        "measure_evaluation",
        "measured_now_j",
        "set_comm_seconds",
        "sources",
    ],
}


class Reads(Callback):
    """Reads the interface as another callback would, at the end of training and of the test loop."""

    def __init__(self, clock: FakeClock):
        self.clock = clock
        self.seen: dict[str, object] = {}

    def on_train_end(self, trainer, pl_module):
        ps = find_power_sampler(trainer)
        self.seen["stage"] = ps.stage
        self.seen["energy_now_j"] = ps.energy_now_j()
        self.seen["measured_now_j"] = ps.measured_now_j()
        with ps.measure_evaluation() as m:
            # a 2 s evaluation outside Lightning's loops at 100 W
            self.clock.t += 2.0
        self.seen["block_j"] = m.energy_j
        self.seen["evaluation_energy_j"] = ps.evaluation_energy_j
        self.seen["clock"] = ps.clock
        self.seen["sensors"] = [s.name for s in ps.sensors]
        self.seen["sources"] = ps.sources()

    def on_test_end(self, trainer, pl_module):
        self.seen["test_stage"] = find_power_sampler(trainer).stage


def test_the_interface_is_these_names():
    public = sorted(name for name in vars(SamplerInterface) if not name.startswith("_"))
    assert public == sorted(INTERFACE["properties"] + INTERFACE["methods"])
    for name in INTERFACE["properties"]:
        assert isinstance(vars(SamplerInterface)[name], property), name


def test_the_interface_read_by_another_callback(tmp_path):
    clock = FakeClock(batch_s=BATCH_S)
    ps = PowerSampler(
        sensors=[SimulatedSensor(WATTS, clock=clock)],
        interval_s=3600.0,
        print_summary=False,
        summary_dir=str(tmp_path),
        clock=clock,
    )
    clock.reads = ps.session
    # a checkpoint of an earlier run that measured 500 J on this sensor: energy_now_j counts it,
    # measured_now_j does not
    ps.load_state_dict({"version": 1, "per_rank_energy_j": [{"sim": 500.0}], "origins": ["elsewhere"]})
    reads = Reads(clock)
    assert ps.stage == ""
    assert ps.sensors == []
    trainer = tiny_trainer(default_root_dir=tmp_path, max_steps=4, callbacks=[clock, ps, reads])
    trainer.fit(SleepyModel(0.0))
    trainer.test(SleepyModel(0.0), verbose=False)
    seen = reads.seen
    assert seen["stage"] == "fit"
    assert seen["test_stage"] == "test"
    assert seen["measured_now_j"] == pytest.approx(WATTS * BATCH_S * 4)
    assert seen["energy_now_j"] == pytest.approx(500.0 + WATTS * BATCH_S * 4)
    assert seen["block_j"] == pytest.approx(WATTS * 2.0)
    assert seen["evaluation_energy_j"] == pytest.approx(WATTS * 2.0)
    assert seen["clock"] is clock
    assert seen["sensors"] == ["sim"]
    assert seen["sources"] == "simulated"
    assert ps.measuring is True


def test_phase_edge_hooks_with_phases_off_do_nothing():
    # no training log started: a hook that marked an edge would fail here
    ps = PowerSampler(sensors=[SimulatedSensor(1.0)])
    assert ps.on_train_batch_start(None, None, None, 0) is None
    assert ps.on_before_zero_grad(None, None, None) is None
    assert ps.on_before_backward(None, None, None) is None
    assert ps.on_after_backward(None, None) is None
    assert ps.on_before_optimizer_step(None, None, None) is None


def test_phase_edge_hooks_with_phases_on_mark_the_edges(tmp_path):
    # a clock that moves 1 ms at every read: every phase between two edges lasts > 0 s
    ticks = itertools.count()

    def clock():
        return next(ticks) / 1000

    ps = PowerSampler(
        sensors=[SimulatedSensor(100.0, clock=clock)], interval_s=3600.0, phases=True, print_summary=False, clock=clock
    )
    tiny_trainer(default_root_dir=tmp_path, max_steps=3, callbacks=[ps]).fit(SleepyModel(0.0))
    rows = ps.summary["sections"]["phases"]["rows"]
    assert {row["phase"] for row in rows[:5]} == {"data", "compute", "optimizer", "comm", "other"}
    # the compute phase (backward start to end, forward included) ran in every step
    assert next(row for row in rows if row["phase"] == "compute")["seconds"] > 0


def test_no_module_reaches_past_the_interface():
    root = pathlib.Path(lightning_green.__file__).parent
    # the sampler's parts by name, and any private attribute read through a variable named for it
    reach = re.compile(r"(sampler|_power)\.(session|_\w+|train_log|training|record|stage_record|sections)\b")
    offenders = []
    for path in root.rglob("*.py"):
        if path.name == "power.py" and path.parent.name == "callbacks":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if reach.search(line):
                offenders.append(f"{path.relative_to(root)}:{number}: {line.strip()}")
    assert offenders == []
