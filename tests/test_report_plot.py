"""The energy report picture: drawn from a real stage summary, tolerant of missing sections."""

from __future__ import annotations

import copy
import json
import logging
import os
import struct
import sys

import pytest
from helpers import SleepyModel, tiny_trainer

from lightning_green import EfficiencyLogger, PowerSampler
from lightning_green import report_plot as rp
from lightning_green import run_summary as rs
from lightning_green.sensors import SimulatedSensor

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class EstimateLike(SimulatedSensor):
    """A scripted sensor labelled as an estimate, to see how estimates are drawn."""

    source = "estimate"


@pytest.fixture(scope="module")
def fit_summary(tmp_path_factory) -> dict:
    """The JSON summary of a real tiny fit with two sensors (one an estimate) and phases."""
    out = tmp_path_factory.mktemp("report")
    sampler = PowerSampler(
        sensors=[SimulatedSensor(100.0, name="gpu0"), EstimateLike(20.0, name="cpu", domain="cpu", host_level=True)],
        interval_s=0.01,
        phases=True,
        print_summary=False,
        summary_dir=str(out),
    )
    tiny_trainer(max_steps=6, callbacks=[sampler, EfficiencyLogger()]).fit(SleepyModel(step_s=0.02))
    return rs.load_summary(out / "energy_summary_fit.json")


def with_qat(summary: dict) -> dict:
    s = copy.deepcopy(summary)
    rows = [
        {"figure": "size, float", "value": 4000, "unit": "bytes", "source": ""},
        {"figure": "size, converted", "value": 1000, "unit": "bytes", "source": ""},
        {"figure": "size ratio", "value": 0.25, "unit": "converted/float", "source": ""},
        {"figure": "EPI, float", "value": 0.5, "unit": "J/token", "source": "estimate"},
        {"figure": "EPI, converted", "value": 0.4, "unit": "J/token", "source": "estimate"},
    ]
    s["sections"][rs.QAT] = {"kind": rs.QAT, "title": rs.QAT_TITLE, "rows": rows, "scheme": "int8_weight_only"}
    return s


def png_size(path) -> tuple[int, int]:
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == PNG_SIGNATURE and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def test_draw_report_writes_a_png_of_the_expected_size(fit_summary, tmp_path):
    path = rp.draw_report(fit_summary, tmp_path / "sub" / "energy_report_fit.png")
    width, height = png_size(path)
    assert (width, height) == (round(rp.SIZE_IN[0] * rp.DPI), round(rp.SIZE_IN[1] * rp.DPI))
    assert 600 <= width <= 1400 and 350 <= height <= 900
    assert 10_000 < (tmp_path / "sub" / "energy_report_fit.png").stat().st_size < 300_000


def test_the_legend_names_each_sensor_and_its_source(fit_summary):
    power = rp.report_figure(fit_summary).axes[0]
    labels = [t.get_text() for t in power.get_legend().get_texts()]
    assert labels == ["gpu0 (simulated)", "cpu (estimate, not a measurement)"]
    styles = {
        line.get_label(): line.get_linestyle()
        for line in power.get_lines()
        if not line.get_label().startswith("_")
        # "_": loop boundaries
    }
    assert styles == {"gpu0 (simulated)": "-", "cpu (estimate, not a measurement)": "--"}
    # the curve is the summary's trace, not something else
    xs, ys = next(line for line in power.get_lines() if not line.get_label().startswith("_")).get_data()
    assert list(zip(xs, ys, strict=False)) == rs.trace(fit_summary)["gpu0"]


def test_energy_bars_hold_the_summary_energy_and_hatch_estimates(fit_summary):
    energy = rp.report_figure(fit_summary).axes[1]
    bars = [p for p in energy.patches if p.get_width() > 0]
    sensors = [b for b in bars if abs(b.get_y() + b.get_height() / 2) < 1e-9]
    phase_bars = [b for b in bars if abs(b.get_y() + b.get_height() / 2 - 1) < 1e-9]
    expected = [s["stage_energy_j"] for s in fit_summary["sensors"]]
    assert [b.get_width() for b in sensors] == pytest.approx(expected)
    assert [b.get_hatch() for b in sensors] == [None, rp.ESTIMATE_HATCH]
    phase_j = [r["energy_j"] for r in rs.phases(fit_summary) if r["energy_j"] > 0]
    assert [b.get_width() for b in phase_bars] == pytest.approx(phase_j)
    # their source includes the estimate
    assert all(b.get_hatch() == rp.ESTIMATE_HATCH for b in phase_bars)


def test_qat_panel_shows_converted_relative_to_float(fit_summary):
    fig = rp.report_figure(with_qat(fit_summary))
    qat = fig.axes[2]
    # the scheme field
    assert qat.get_title(loc="left") == "QAT int8_weight_only: converted relative to float"
    heights = [round(p.get_height(), 6) for p in qat.patches]
    # size float, converted, EPI float, converted
    assert heights == [1.0, 0.25, 1.0, 0.8]
    assert [p.get_hatch() for p in qat.patches] == [None, None, rp.ESTIMATE_HATCH, rp.ESTIMATE_HATCH]
    texts = [t.get_text() for t in qat.texts]
    assert "4000" in texts and "0.4\nestimate" in texts


def test_timeline_shades_the_validation_loops(fit_summary):
    s = copy.deepcopy(fit_summary)
    s["timeline"] = [
        {"loop": "train", "start_s": 0.0, "end_s": 0.1},
        {"loop": "validation", "start_s": 0.1, "end_s": 0.15},
        {"loop": "train", "start_s": 0.15, "end_s": 0.3},
    ]
    s["timeline"].append({"loop": "validation", "start_s": 0.3, "end_s": 0.35})
    power = rp.report_figure(s).axes[0]
    spans = [(p.get_x(), p.get_x() + p.get_width()) for p in power.patches]
    # validation shaded, training the plain background
    assert spans == [(0.1, 0.15), (0.3, 0.35)]
    boundaries = [line.get_xdata()[0] for line in power.get_lines() if line.get_label().startswith("_")]
    assert boundaries == [0.0, 0.1, 0.15, 0.3]
    labels = [t.get_text() for t in power.get_legend().get_texts()]
    assert labels[0] == "validation" and labels.count("validation") == 1


def test_missing_sections_still_draw(fit_summary, tmp_path):
    bare = {k: v for k, v in fit_summary.items() if k not in ("trace", "sections")}
    fig = rp.report_figure(bare)
    # power and energy; no QAT panel
    assert len(fig.axes) == 2
    assert any("no power trace" in t.get_text() for t in fig.axes[0].texts)
    # sensors only, no phase bar
    assert len([p for p in fig.axes[1].patches if p.get_width() > 0]) == 2
    assert png_size(rp.draw_report(bare, tmp_path / "bare.png"))[0] > 0


def test_report_image_is_rgb_uint8(fit_summary):
    image = rp.report_image(fit_summary)
    assert image.dtype.name == "uint8" and image.shape == (
        round(rp.SIZE_IN[1] * rp.DPI),
        round(rp.SIZE_IN[0] * rp.DPI),
        3,
    )
    # drawn, not blank
    assert image.min() < 100 and image.max() == 255


def test_write_report_picture_sends_the_image_to_tensorboard(fit_summary, tmp_path):
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = TensorBoardLogger(str(tmp_path), name="tb")
    path = rp.write_report_picture(fit_summary, str(tmp_path / "out"), "fit", [CSVLogger(str(tmp_path)), tb], step=6)
    assert path == str(tmp_path / "out" / "energy_report_fit.png") and png_size(path)[0] > 0
    tb.experiment.flush()
    acc = EventAccumulator(tb.log_dir, size_guidance={"images": 1})
    acc.Reload()
    assert acc.Tags()["images"] == [rp.IMAGE_TAG]
    event = acc.Images(rp.IMAGE_TAG)[0]
    assert event.step == 6 and event.width == round(rp.SIZE_IN[0] * rp.DPI)


def test_without_matplotlib_one_hint_and_no_file(fit_summary, tmp_path, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg", "matplotlib.image"):
        monkeypatch.setitem(sys.modules, name, None)
    said = []
    assert rp.write_report_picture(fit_summary, str(tmp_path), "fit", info=said.append) is None
    assert said == [rp.PLOTS_HINT] and 'pip install "lightning_green[plots]"' in said[0]
    assert rp.draw_report(fit_summary, tmp_path / "x.png") is None and rp.report_image(fit_summary) is None
    assert list(tmp_path.iterdir()) == []


def test_a_failure_to_write_is_a_warning_not_an_error(fit_summary, tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with caplog.at_level(logging.WARNING, logger="lightning_green"):
        assert rp.write_report_picture(fit_summary, str(blocker), "fit") is None
    assert "could not draw the energy report of fit" in caplog.text


def test_the_summary_json_round_trips_into_the_picture(fit_summary, tmp_path):
    path = tmp_path / "energy_summary_fit.json"
    path.write_text(json.dumps(fit_summary))
    assert png_size(rp.draw_report(rs.load_summary(path), tmp_path / "p.png"))[1] > 0


def test_a_summary_without_sensors_says_nothing_measured(fit_summary):
    bare = dict(fit_summary, sensors=[], sources=[], trace={}, stage_energy_j=0.0, cumulative_energy_j=0.0)
    fig = rp.report_figure(bare)
    energy = fig.axes[1]
    assert [t.get_text() for t in energy.texts] == ["no energy measured (no sensor)"]
    # no 0 J bar
    assert not [p for p in energy.patches if p.get_width() > 0]
    assert fig.get_suptitle().endswith(": no energy measured (no sensor)")
    assert " J " not in fig.get_suptitle()


def test_the_title_gives_the_stage_energy_and_a_schema_1_summary_still_draws(fit_summary):
    title = rp.report_figure(fit_summary).get_suptitle()
    stage_j = fit_summary["stage_energy_j"]
    duration = fit_summary["duration_s"]
    assert title.startswith(
        f"lightning_green energy report: fit (finished), {stage_j:.4g} J this stage in {duration:.4g} s"
    )
    with open(os.path.join(DATA, "summary_v1_resumed_fit.json")) as f:
        old = json.load(f)
    fig = rp.report_figure(old)
    # its own 100 J, not the 300 J cumulative
    assert "100 J this stage in 1 s" in fig.get_suptitle()
    assert [p.get_width() for p in fig.axes[1].patches if p.get_width() > 0] == [100.0]
    assert fig.axes[2].get_title(loc="left").startswith("QAT int8_dynamic")
