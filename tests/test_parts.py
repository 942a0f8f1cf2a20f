"""The Trainer-free parts under the callbacks, with plain calls and injected clocks (no wall time)."""

import pytest
from helpers import FakeClock

from lightning_green.callbacks.efficiency import BatchCounter
from lightning_green.checks import check_int, check_path, checked_count
from lightning_green.distributed import cluster_figures, shared_owners
from lightning_green.energy.phases import PhaseRecorder
from lightning_green.energy.session import EnergySession, LogWindow
from lightning_green.log_queue import LogCadence
from lightning_green.power_limit import LimitSearch
from lightning_green.resume import continued_part, state_for_rank
from lightning_green.sensors import SimulatedSensor
from lightning_green.summary import StageRecord, SummarySections, build_summary, local_cluster, sensor_rows


def started_session(power_w=100.0, clock=None):
    clock = clock or FakeClock()
    session = EnergySession(interval_s=3600.0, clock=clock)  # the thread never reads: the test does
    session.start([SimulatedSensor(power_w, clock=clock)])
    return session, clock


def test_session_energy_window_and_measure_are_exact():
    session, clock = started_session(100.0)
    window = LogWindow(session)
    window.reset()
    clock.t += 2.0
    session.read_now()
    window.validation_started()
    clock.t += 1.0  # a validation second: not step energy
    session.read_now()
    window.validation_ended()
    metrics = window.close(lambda values: list(values), window.end(steps=4))
    assert metrics["energy/total_j"] == pytest.approx(300.0)
    assert metrics["energy/step_j"] == pytest.approx(200.0 / 4)
    clock.t += 0.5
    session.read_now()
    assert window.epoch_energy_j() == pytest.approx(250.0)  # 3.5 s at 100 W, less the 1 s of validation
    window.start_epoch()
    assert window.epoch_energy_j() == pytest.approx(0.0)
    assert metrics["power/sim_w"] == pytest.approx(100.0)
    with session.measure() as m:
        clock.t += 0.5
    assert (m.energy_j, m.duration_s, m.sources) == (pytest.approx(50.0), 0.5, ["simulated"])
    assert session.finish() and not session.finish()
    assert session.energy_now_j() == pytest.approx(400.0)  # 4 s at 100 W


def test_session_carries_energy_across_stages_and_from_a_checkpoint():
    session, clock = started_session(10.0)
    clock.t += 3.0
    session.finish()
    session.start([SimulatedSensor(10.0, clock=clock)])
    clock.t += 1.0
    session.read_now()
    rows = sensor_rows(session.meter)
    assert rows[0]["stage_energy_j"] == pytest.approx(10.0) and rows[0]["cumulative_energy_j"] == pytest.approx(40.0)
    session.restore({"sim": 100.0, "gone": 5.0, "__unattributed__": 1.0})
    assert session.energy_now_j() == pytest.approx(100.0 + 10.0 + 5.0 + 1.0)
    session.finish()


def test_stage_summary_adds_up():
    session, clock = started_session(50.0)
    clock.t += 4.0
    session.finish()
    sensors = sensor_rows(session.meter)
    summary = build_summary(
        stage="test",
        status="finished",
        started_at="",
        duration_s=4.0,
        rank=0,
        sensors=sensors,
        unattributed_j=7.0,
        cluster=local_cluster(0, 0, sensors, 7.0),
        skipped=[],
        sections={},
        trace={},
    )
    assert summary["stage_energy_j"] == pytest.approx(200.0)
    assert summary["stage_mean_power_w"] * summary["duration_s"] == pytest.approx(
        summary["stage_energy_j"]
    )  # J = W x s
    assert summary["cumulative_energy_j"] == pytest.approx(207.0) and summary["restored_j"] == pytest.approx(7.0)
    assert "energy_j" not in summary and "energy_this_run_j" not in summary  # one key per meaning
    assert summary["schema"] == 2 and summary["cluster"]["gathered_at"] == "teardown"
    assert summary["cluster"]["stage_total_j"] == pytest.approx(200.0) and summary["cluster"][
        "total_j"
    ] == pytest.approx(207.0)


def test_cadence_follows_log_every_n_steps_and_skips_accumulation():
    cadence = LogCadence()
    cadence.reset(every=2, global_step=0)
    seen = [cadence.advance(s) for s in (0, 1, 1, 2, 3, 4)]
    assert seen == [(False, False), (True, False), (False, False), (True, True), (True, False), (True, True)]
    assert cadence.take_steps() == 4 and cadence.take_steps() == 0  # batches 1, 2, 3, 4 stepped
    # the per-batch call: the same rule, and the steps of each window
    cadence.reset(every=3, global_step=10)
    logs, windows = [], []
    for step in (10, 11, 11, 12, 12, 12, 13, 14, 15, 16):  # accumulation repeats a step
        if cadence.log_step(step):
            logs.append(step)
            windows.append(cadence.take_steps())
    assert logs == [12, 15] and windows == [2, 3] and cadence.steps == 1
    cadence.reset(every=0, global_step=0)
    assert not any(cadence.log_step(s) for s in range(1, 5)) and cadence.steps == 4  # logging off: steps still counted


def test_phase_recorder_with_an_injected_clock():
    session, clock = started_session(100.0)
    rec = PhaseRecorder("host", clock=clock)
    rec.restart()
    for edge, dt in (
        ("batch_start", 1.0),
        ("zero_grad", 2.0),
        ("backward_start", 0.5),
        ("backward_end", 3.0),
        ("optimizer_start", 0.5),
        ("batch_end", 1.0),
    ):
        clock.t += dt
        rec.edge(edge)
    session.read_now()
    rec.close_step(session.meter)
    metrics = rec.metrics(session.meter, lambda v: list(v), world_size=1)
    assert metrics["time/phase/data_s"] == pytest.approx(1.0) and metrics["energy/phase/data_j"] == pytest.approx(100.0)
    assert metrics["time/phase/compute_s"] == pytest.approx(5.0) and metrics["energy/phase/compute_j"] == pytest.approx(
        500.0
    )
    assert metrics["time/phase/optimizer_s"] == pytest.approx(1.5) and metrics["time/phase/other_s"] == pytest.approx(
        0.5
    )
    session.finish()


def test_search_settles_after_each_limit_change():
    search = LimitSearch([300, 200], warmup_steps=1, profile_steps=2, settle_steps=3)
    assert search.due(1) and search.start_next(1) == 300
    assert search.measure_from == 4 and search.next_edge_step == 6 and not search.due(5) and search.due(6)
    search.record(20.0, 0.2, 2)
    assert search.start_next(6) == 200 and search.measure_from == 9


def test_argument_checks_name_the_argument():
    with pytest.raises(ValueError, match="`history` must be an integer >= 2"):
        check_int("history", "big", 2)
    with pytest.raises(TypeError, match="`summary_dir` must be None or a path"):
        check_path("summary_dir", 123)
    with pytest.raises(TypeError, match=r"`tokens_per_batch` must return a whole number >= 0 .* returned None"):
        checked_count("tokens_per_batch", None)
    with pytest.raises(TypeError, match="`samples_per_batch` must return .* returned -2"):
        BatchCounter(samples_per_batch=lambda b: -2)([1, 2])


def test_counts_accept_whole_numbers_of_any_numeric_type_and_refuse_the_rest():
    import numpy as np
    import torch

    for value, expected in ((32, 32), (32.0, 32), (np.int64(32), 32), (np.float32(4.0), 4), (np.uint8(0), 0)):
        assert (
            checked_count("tokens_per_batch", value) == expected
            and type(checked_count("tokens_per_batch", value)) is int
        )
    for bad in (True, 2.5, float("nan"), float("inf"), np.int64(-1), "3"):
        with pytest.raises(TypeError, match="`tokens_per_batch` must return a whole number"):
            checked_count("tokens_per_batch", bad)
    with pytest.raises(TypeError, match=r"return `\.item\(\)`"):
        checked_count("tokens_per_batch", torch.tensor(3))
    assert BatchCounter(tokens_per_batch=lambda b: np.prod(b.shape))(torch.zeros(4, 8)) == (4, 32)


def test_resume_rule_and_helpers():
    per_rank = [{"a": 1.0}, {"a": 2.0}]
    assert state_for_rank(per_rank, 2, 1, ("a",)) == {"a": 2.0}
    assert state_for_rank(per_rank, 4, 0, ("a",)) == {"a": 3.0} and state_for_rank(per_rank, 4, 3, ("a",)) is None
    assert shared_owners([["x"], ["x", "y"]]) == {"x": 0, "y": 1}
    c = cluster_figures(
        [
            {
                "rank": 0,
                "node_rank": 0,
                "energy_j": 3.0,
                "device_energy_j": 1.0,
                "stage_energy_j": 1.0,
                "sources": ["counter", "rapl"],
            },
            {
                "rank": 1,
                "node_rank": 1,
                "energy_j": 5.0,
                "device_energy_j": 3.0,
                "stage_energy_j": 2.0,
                "sources": ["counter", "estimate"],
            },
        ]
    )
    assert (c["total_j"], c["stage_total_j"], c["num_nodes"], c["imbalance"]) == (8.0, 3.0, 2, 1.5)
    assert c["sources"] == ["counter", "estimate", "rapl"]  # node 1's estimate is named beside rank 0's measurements
    record = StageRecord(FakeClock())
    assert record.sources("counter+rapl") == "counter+rapl"  # nothing gathered yet: this process's
    record.cluster = c
    assert record.sources("counter+rapl") == "counter+estimate+rapl"


def test_a_broken_summary_provider_costs_its_section_only(caplog):
    sections = SummarySections()
    sections.add_section("kept", [{"a": 1}])
    sections.add_provider(lambda: 1 / 0)
    out = sections.collect()
    assert out["kept"] == {"kind": "custom", "title": "kept", "rows": [{"a": 1}]}
    (error,) = [v for k, v in out.items() if k.startswith("error in")]
    assert error["kind"] == "error" and error["rows"] == [{"error": "division by zero"}]
    assert "summary section" in caplog.text


def test_a_dropped_sensor_never_makes_the_logged_energy_go_down():
    """The reader stamps a failed read with the session's clock: the sensor's energy stays at what the
    last log step saw, through the failures and the drop; power is never negative, the stats agree."""
    clock = FakeClock(t=1000.0)
    session = EnergySession(interval_s=3600.0, clock=clock)  # the thread never reads: the test does
    session.start([SimulatedSensor(lambda t: 1000.0 if t < 0.5 else float("nan"), clock=clock)])
    window = LogWindow(session)
    window.reset()
    logged = []

    def log_step(t):
        clock.t = 1000.0 + t
        logged.append(window.close(lambda values: list(values), window.end(steps=1)))

    clock.t = 1000.4
    session.read_now()
    log_step(0.45)
    log_step(0.5)
    for i in range(6):  # six unusable reads in a row, from 0.5 s on: dropped at the sixth
        clock.t = 1000.5 + i / 10
        session.read_now()
        log_step(0.55 + i / 10)
    assert session.meter.stats("sim")["failed"]
    log_step(3.0)
    totals = [m["energy/total_j"] for m in logged]
    assert totals == pytest.approx([450.0] + [500.0] * 8)
    assert all(m["power/sim_w"] >= 0.0 and m["energy/step_j"] >= 0.0 for m in logged)
    assert session.meter.stats("sim")["energy_j"] == pytest.approx(500.0)
    session.finish()
    assert session.energy_now_j() == pytest.approx(500.0)  # carried on as the summary shows it


@pytest.mark.parametrize(
    ("saved", "world_size", "rank", "part"),
    [
        (2, 2, 1, "own"),
        (2, 2, 0, "own"),
        (4, 2, 0, "all"),
        (4, 2, 1, "nothing"),
        (1, 2, 0, "all"),
        (0, 1, 0, "nothing"),
    ],
)
def test_one_resume_rule(saved, world_size, rank, part):
    assert continued_part(saved, world_size, rank) == part
