"""PowerSampler's end-of-stage report: the picture beside the summary, the loop timeline, the batched
power trace, and the summary's partial wording (also for summaries read back from JSON)."""

from __future__ import annotations

import json
import math
import struct
import sys

import pytest
from helpers import FakeClock, SleepyModel, logged, tiny_trainer
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_green import PowerSampler
from lightning_green import report_plot as rp
from lightning_green import summary as S
from lightning_green.callbacks import stage_summaries
from lightning_green.energy.loops import LoopTimeline, TraceLog
from lightning_green.sensors import SimulatedSensor

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path) -> tuple[int, int]:
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == PNG_SIGNATURE and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


# --------------------------------------------------------------------------- the picture, end to end
def test_fit_and_test_write_the_picture_beside_the_summary_and_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(str(tmp_path), name="tb")
    ps = PowerSampler(sensors=[SimulatedSensor(100.0)], interval_s=0.01, print_summary=False)
    trainer = tiny_trainer(
        max_steps=8, logger=logger, callbacks=[ps], limit_val_batches=2, val_check_interval=4, log_every_n_steps=2
    )
    trainer.fit(SleepyModel(step_s=0.01))
    trainer.test(SleepyModel(step_s=0.01), verbose=False)
    for stage in ("fit", "test"):
        picture = tmp_path / "tb" / "version_0" / f"energy_report_{stage}.png"
        assert ps.summary_by_stage[stage]["picture"] == str(picture)
        assert (tmp_path / "tb" / "version_0" / f"energy_summary_{stage}.json").exists()
        assert png_size(picture) == (round(rp.SIZE_IN[0] * rp.DPI), round(rp.SIZE_IN[1] * rp.DPI))
    acc = EventAccumulator(logger.log_dir, size_guidance={"images": 4})
    acc.Reload()
    assert rp.IMAGE_TAG in acc.Tags()["images"]
    assert sorted(e.step for e in acc.Images(rp.IMAGE_TAG)) == [8, 8]  # fit and test, at the global step


def test_the_summary_timeline_shades_validation_on_the_trace_axis(tmp_path):
    clock = FakeClock(0.5, val_s=0.25)
    ps = PowerSampler(
        sensors=[SimulatedSensor(100.0, clock=clock)],
        interval_s=3600.0,
        print_summary=False,
        summary_dir=str(tmp_path),
        clock=clock,
    )
    clock.reads = ps.session
    trainer = tiny_trainer(
        max_steps=6, callbacks=[clock, ps], limit_val_batches=2, val_check_interval=3, num_sanity_val_steps=1
    )
    trainer.fit(SleepyModel(step_s=0.0))
    rows = json.loads((tmp_path / "energy_summary_fit.json").read_text())["timeline"]
    # a sanity check, then train and validation in turn, and a tail to train end
    assert [r["loop"] for r in rows] == ["sanity", "train", "validation", "train", "validation", "train"]
    # consecutive, no overlap, on simulated time: 0.25 s per validation batch, 0.5 s per training batch
    assert all(a["end_s"] == b["start_s"] for a, b in zip(rows[:-1], rows[1:], strict=True))
    durations = [r["end_s"] - r["start_s"] for r in rows]
    assert durations[:5] == pytest.approx([0.25, 1.5, 0.5, 1.5, 0.5])
    # one time axis: the trace's readings fall inside the timeline
    trace_t = [t for t, _ in ps.summary["trace"]["sim"]]
    assert rows[0]["start_s"] <= trace_t[0] and trace_t[-1] <= rows[-1]["end_s"]


def test_without_matplotlib_the_hint_is_said_once_per_sampler(tmp_path, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg", "matplotlib.image"):
        monkeypatch.setitem(sys.modules, name, None)
    said = []
    monkeypatch.setattr(stage_summaries, "rank_zero_info", said.append)
    ps = PowerSampler(sensors=[SimulatedSensor(10.0)], interval_s=0.01, print_summary=False, summary_dir=str(tmp_path))
    trainer = tiny_trainer(max_steps=2, callbacks=[ps])
    trainer.fit(SleepyModel(step_s=0.0))
    trainer.test(SleepyModel(step_s=0.0), verbose=False)
    assert said == [rp.PLOTS_HINT]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["energy_summary_fit.json", "energy_summary_test.json"]


def test_report_picture_false_writes_the_summary_only(tmp_path):
    ps = PowerSampler(
        sensors=[SimulatedSensor(10.0)],
        interval_s=0.01,
        print_summary=False,
        summary_dir=str(tmp_path),
        report_picture=False,
    )
    tiny_trainer(max_steps=2, callbacks=[ps]).fit(SleepyModel(step_s=0.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["energy_summary_fit.json"]
    assert "picture" not in ps.summary_by_stage["fit"]
    with pytest.raises(TypeError, match="`report_picture`"):
        PowerSampler(report_picture="no")


# --------------------------------------------------------------------------- Trainer-free parts
def test_loop_timeline_merges_same_loops_and_stays_bounded():
    clock = FakeClock(t=100.0)
    timeline = LoopTimeline(clock, max_entries=5)
    timeline.reset(origin_t=90.0)
    for loop, t in (("train", 100.0), ("train", 101.0), ("validation", 102.0), ("train", 102.5)):
        clock.t = t
        timeline.begin(loop)
    clock.t = 104.0
    timeline.end()
    assert timeline.as_rows() == [
        {"loop": "train", "start_s": 10.0, "end_s": 12.0},
        {"loop": "validation", "start_s": 12.0, "end_s": 12.5},
        {"loop": "train", "start_s": 12.5, "end_s": 14.0},
    ]
    # three more validation loops of 0.1 s, 0.3 s and 0.2 s: past 5 rows, the shortest finished one
    # becomes training (0.1 s when the 0.3 s loop begins, then 0.3 s when the 0.2 s loop begins)
    for length in (0.1, 0.3, 0.2):
        clock.t += 1.0
        timeline.begin("validation")
        clock.t += length
        timeline.begin("train")
    rows = timeline.as_rows()
    assert len(rows) <= 5 and all(a["loop"] != b["loop"] for a, b in zip(rows, rows[1:], strict=False))
    kept = [round(r["end_s"] - r["start_s"], 6) for r in rows if r["loop"] == "validation"]
    assert kept == [0.5, 0.2]


def test_trace_log_keeps_each_point_step_and_drains_in_time_order():
    class Window:
        def trace_points(self, n):
            return {"gpu": [(10.0, 50.0), (10.5, 60.0), (11.0, 70.0)][:n], "cpu": [(10.5, 5.0)]}

    trace = TraceLog(points=2, batch=4)
    trace.collect(Window(), origin_t=10.0)
    assert not trace.due()
    trace.collect(Window(), origin_t=10.0)
    assert trace.due()
    drained = trace.drain()
    assert [step for step, _ in drained] == [0, 500]
    assert drained[1][1] == {"power_trace/gpu_w": 60.0, "power_trace/cpu_w": 5.0}
    assert trace.drain() == [] and not trace.due()


def test_power_trace_keeps_its_key_step_axis_and_bound_per_window(tmp_path):
    from unittest.mock import Mock

    logger = Mock()
    logger.log_dir = logger.save_dir = None
    ps = PowerSampler(
        sensors=[SimulatedSensor(100.0)],
        interval_s=0.01,
        trace_points=3,
        print_summary=False,
        summary_dir=str(tmp_path),
    )
    tiny_trainer(max_steps=12, log_every_n_steps=3, logger=logger, callbacks=[ps]).fit(SleepyModel(step_s=0.02))
    trace = logged(logger, "power_trace/sim_w")
    assert 4 <= len(trace) <= 4 * 3  # four windows of at most three points
    steps = [s for s, _ in trace]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)
    duration_ms = ps.summary["duration_s"] * 1000
    assert 0 <= steps[0] and steps[-1] <= duration_ms + 50  # ms since the sampler started, not global steps
    assert all(v == pytest.approx(100.0) for _, v in trace)


# --------------------------------------------------------------------------- summary wording
def stats(**changes) -> dict:
    row = {
        "name": "gpu0",
        "failed": None,
        "hung": False,
        "abandoned": False,
        "rejected": 0,
        "transient_errors": 0,
        "resets": 0,
        "gaps": 0,
        "gap_s": 0.0,
        "gap_bridge": "counter difference",
        "last_problem": None,
    }
    row.update(changes)
    return row


def test_partial_reason_names_what_happened():
    assert S.partial_reason(stats(failed="hung: read() has not returned", hung=True, abandoned=True)) == (
        "dropped (hung: read() has not returned); its reader was abandoned, still blocked at stop; "
        "figures up to its last good reading + at most one interval"
    )
    assert S.partial_reason(stats(rejected=2, transient_errors=3, gaps=5, gap_s=0.25, last_problem="NVML timeout")) == (
        "2 readings rejected; 3 transient read errors (retried); 0.25 s of gaps bridged by counter difference; "
        "last: NVML timeout"
    )
    assert (
        S.partial_reason(stats(resets=1, last_problem="counter reset from 9.0 to 1.0 J"))
        == "1 counter resets; last: counter reset from 9.0 to 1.0 J"
    )
    assert S.partial_reason({"gaps": 4}) == "4 readings missed"  # an older summary without the new keys


def test_render_tolerates_nulls_and_nan(capsys):
    sensor = {
        "name": "sim",
        "source": "simulated",
        "energy_this_run_j": None,
        "mean_power_w": float("nan"),
        "duration_s": None,
        "peak_power_w": None,
        "energy_j": 12.0,
        "gaps": None,
        "partial": True,
        "failed": None,
    }
    cluster = {
        "world_size": 2,
        "num_nodes": 1,
        "total_j": None,
        "imbalance": None,
        "per_rank": [{"rank": 0, "node_rank": 0, "energy_j": None}],
    }
    summary = {
        "stage": "fit",
        "status": "finished",
        "duration_s": None,
        "energy_j": None,
        "energy_this_run_j": 12.0,
        "sources": ["simulated"],
        "sensors": [sensor],
        "cluster": cluster,
        "partial": ["sim: 1 readings rejected"],
        "skipped": None,
        "sections": {"efficiency": [{"figure": "x", "value": None}]},
    }
    S.render(json.loads(json.dumps(summary).replace("NaN", "null")))
    out = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert "duration, this stage: - s energy, this stage: 12 J [source: simulated]" in out
    assert "mean power, this stage: - W" in out and "energy cumulative: - J" in out
    assert "energy all processes, cumulative (at loop end): - J" in out
    assert "per process, cumulative (at loop end; 2 processes, 1 nodes): rank 0 (node 0): - J;" in out
    assert "device-energy imbalance (max/mean): n/a (no per-process device sensor)" in out
    assert "partial figures: sim: 1 readings rejected" in out
    summary["cluster"]["imbalance"] = float("nan")  # in memory, before JSON
    S.render(summary)
    assert "imbalance (max/mean): n/a (no" in " ".join(capsys.readouterr().out.split())
    empty = S.build_summary(
        stage="fit",
        status="finished",
        started_at="",
        duration_s=0.0,
        rank=0,
        sensors=[],
        unattributed_j=0.0,
        cluster={},
        skipped=[],
        sections={},
        trace={},
    )
    assert math.isnan(empty["stage_mean_power_w"])


def test_a_section_value_json_cannot_hold_is_written_as_text_not_raised(tmp_path):
    import torch

    ps = PowerSampler(
        sensors=[SimulatedSensor(10.0)],
        interval_s=0.01,
        print_summary=True,
        summary_dir=str(tmp_path),
        report_picture=False,
    )
    ps.add_summary_provider(lambda: {"mine": [{"figure": "a tensor", "value": torch.tensor(1.5)}]})
    tiny_trainer(max_steps=2, callbacks=[ps]).fit(SleepyModel(step_s=0.0))
    rows = json.loads((tmp_path / "energy_summary_fit.json").read_text())["sections"]["mine"]["rows"]
    assert rows == [{"figure": "a tensor", "value": "tensor(1.5000)"}]
