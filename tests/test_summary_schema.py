"""The summary JSON, schema 2: one key per meaning with its scope, sections by id, every key documented."""

from __future__ import annotations

import json
import os
import re

import pytest
from helpers import FakeClock, SleepyModel, tiny_trainer

from lightning_green import EfficiencyLogger, PowerSampler
from lightning_green import run_summary as rs
from lightning_green import summary as S
from lightning_green import summary_table as st
from lightning_green.sensors import SimulatedSensor

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "summary_json.md")
#: The names schema 1 had for meanings that schema 2 names once.
SYNONYMS = {"energy_j", "energy_this_run_j", "mean_power_w", "offset_j"}


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict:
    """The JSON of a real 4-step fit at 100 W (0.5 s a batch: 200 J), with a QAT-like section set by
    id and fields, and a user's section set by title."""
    out = tmp_path_factory.mktemp("schema")
    clock = FakeClock(batch_s=0.5)
    sensor = SimulatedSensor(100.0, name="sim", clock=clock)
    ps = PowerSampler(
        sensors=[sensor],
        interval_s=3600.0,
        summary_dir=str(out),
        print_summary=False,
        report_picture=False,
        clock=clock,
    )

    class Sections(FakeClock):
        def on_train_end(self, trainer, pl_module):
            rows = [{"figure": "EPI, float", "value": 0.5, "unit": "J/token", "source": "simulated"}]
            ps.add_summary_section("Quantization-aware training", rows, section_id="qat", fields={"scheme": "int8_x"})
            ps.add_summary_section("mine", [{"figure": "a", "value": 1.0}])

    tiny_trainer(max_steps=4, callbacks=[clock, ps, EfficiencyLogger(), Sections(0.0)]).fit(SleepyModel(step_s=0.0))
    with open(out / "energy_summary_fit.json") as f:
        return json.load(f)


def documented() -> set[str]:
    """Every name written in code style in the reference page (``{"loop", "start_s"}`` gives both)."""
    with open(DOC) as f:
        spans = re.findall(r"`([^`]+)`", f.read())
    return {name for span in spans for name in re.findall(r"[a-z_]+", span)}


def test_each_meaning_has_one_key_named_for_its_scope(written):
    assert written["schema"] == rs.SCHEMA == 2
    assert (written["stage_energy_j"], written["carried_j"], written["restored_j"]) == (200.0, 0.0, 0.0)
    assert written["cumulative_energy_j"] == 200.0 and written["stage_mean_power_w"] == 100.0
    (sensor,) = written["sensors"]
    assert (sensor["stage_energy_j"], sensor["cumulative_energy_j"], sensor["stage_mean_power_w"]) == (
        200.0,
        200.0,
        100.0,
    )
    assert not SYNONYMS & set(written) and not SYNONYMS & set(sensor)
    assert written["cluster"]["gathered_at"] == "teardown"
    # schema 2 is read as it is
    assert rs.upgrade(written) is written


def test_sections_have_ids_kinds_and_fields_so_no_title_is_parsed(written):
    sections = written["sections"]
    assert sections["qat"] == {
        "kind": "qat",
        "title": "Quantization-aware training",
        "rows": [{"figure": "EPI, float", "value": 0.5, "unit": "J/token", "source": "simulated"}],
        "scheme": "int8_x",
    }
    # from the field: the title names no scheme
    assert rs.qat_scheme(written) == "int8_x"
    assert sections["mine"] == {"kind": "custom", "title": "mine", "rows": [{"figure": "a", "value": 1.0}]}
    assert sections["efficiency"]["kind"] == "efficiency"
    assert rs.efficiency(written)["train_energy_j"] == (200.0, "simulated")


def test_a_section_set_by_title_gets_the_packages_id():
    sections = S.SummarySections()
    sections.add_section("Quantization-aware training (int8_dynamic)", [{"figure": "x"}])
    sections.add_section("Power limit search", [{"limit_w": 250.0, "chosen": True, "source": "profiled"}])
    got = sections.collect()
    assert got["qat"]["scheme"] == "int8_dynamic" and got["qat"]["kind"] == "qat"
    assert got["power_limit"]["kind"] == "power_limit"
    assert rs.power_limit({"sections": got}) == (250.0, "profiled")
    sections.add_section("Other", [], section_id="other_table", fields={"note": "n"})
    assert sections.collect()["other_table"] == {"kind": "custom", "title": "Other", "rows": [], "note": "n"}


def test_every_key_of_a_written_summary_is_documented(written):
    keys = set(written) | {k for s in written["sensors"] for k in s} | set(written["cluster"])
    keys |= {k for r in written["cluster"]["per_rank"] for k in r}
    keys |= {k for entry in written["sections"].values() for k in entry}
    keys |= {k for row in written["timeline"] for k in row}
    assert keys - documented() == set()
    assert {"upgraded_from_schema", "gathered_at", "scheme"} <= documented()


def test_a_stage_without_sensors_reads_no_energy_measured(capsys):
    summary = S.build_summary(
        stage="fit",
        status="finished",
        started_at="",
        duration_s=2.0,
        rank=0,
        sensors=[],
        unattributed_j=0.0,
        cluster={},
        skipped=["gpu: no NVML"],
        sections={},
        trace={},
    )
    assert summary["sensors"] == [] and summary["stage_energy_j"] == 0
    st.render(summary)
    out = capsys.readouterr().out
    assert "lightning_green energy summary (fit, finished): no energy measured (no sensor)" in out
    assert "energy cumulative: no energy measured (no sensor)" in out and "duration, this stage: 2 s" in out
    assert "skipped: gpu: no NVML" in out and " 0 J" not in out
