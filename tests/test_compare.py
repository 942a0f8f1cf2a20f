"""``python -m lightning_green compare|show`` on the summaries of real tiny fits."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from helpers import SleepyModel, tiny_trainer
from lightning.pytorch.loggers import CSVLogger

from lightning_green import EfficiencyLogger, PowerSampler, SimulatedSensor
from lightning_green import compare as cmp
from lightning_green import run_summary as rs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, str]:
    """Two run folders (``<dir>/lightning_logs/version_0``): the same fit at 100 W and at 200 W."""
    out = {}
    for name, watts in (("low", 100.0), ("high", 200.0)):
        root = tmp_path_factory.mktemp(name)
        sampler = PowerSampler(sensors=[SimulatedSensor(watts, name="sim")], interval_s=0.01, print_summary=False)
        trainer = tiny_trainer(max_steps=6, callbacks=[sampler, EfficiencyLogger()], logger=CSVLogger(str(root)))
        trainer.fit(SleepyModel(step_s=0.03))
        out[name] = str(root)
    return out


def summary_of(run_dir: str) -> dict:
    return rs.load_summary(os.path.join(run_dir, "lightning_logs", "version_0", "energy_summary_fit.json"))


def cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), COLUMNS="200")
    return subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "lightning_green", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def cells(stdout: str, figure: str) -> list[str]:
    """The cells of the table line whose first cell is ``figure``."""
    for line in stdout.splitlines():
        parts = [p.strip() for p in line.split("│")]
        if len(parts) > 2 and parts[1] == figure:
            return parts[1:-1]
    raise AssertionError(f"no row {figure!r} in:\n{stdout}")


def test_compare_cli_prints_both_runs_and_marks_the_lower_energy_best(runs):
    proc = cli("compare", runs["low"], runs["high"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "lightning_green.compare" in imported and not {"torch", "lightning", "numpy"} & imported
    low_j, high_j = summary_of(runs["low"])["energy_j"], summary_of(runs["high"])["energy_j"]
    assert low_j < high_j  # 100 W against 200 W over fits of similar length
    figure, unit, source, first, second = cells(proc.stdout, "energy total")
    assert (unit, source) == ("J", "simulated")
    assert first == f"{low_j:.4g} {cmp.BEST_MARK}" and cmp.BEST_MARK not in second
    assert second == f"{high_j:.4g} ×{high_j / low_j:.2f}"
    for run_dir in runs.values():
        assert os.path.join(run_dir, "lightning_logs", "version_0", "energy_summary_fit.json") in proc.stdout
    shown = cli("show", runs["low"])
    assert shown.returncode == 0 and f"{low_j:.4g}" in shown.stdout
    assert not {"torch", "lightning", "numpy"} & {line.rsplit("|", 1)[-1].strip() for line in shown.stderr.splitlines()}


def test_compare_json_holds_values_best_and_ratio(runs, capsys):
    assert cmp.main(["compare", runs["high"], runs["low"], "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    high, low = summary_of(runs["high"]), summary_of(runs["low"])
    assert [r["run"] for r in out["runs"]] == [runs["high"], runs["low"]]
    rows = {r["figure"]: r for r in out["rows"]}
    total = rows["energy total"]
    assert total["values"] == [high["energy_j"], low["energy_j"]] and total["sources"] == ["simulated", "simulated"]
    assert total["best"] == [1] and total["ratio_to_first"] == [1.0, low["energy_j"] / high["energy_j"]]
    assert rows["duration"]["values"] == [high["duration_s"], low["duration_s"]]
    assert rows["mean power"]["best"] == []  # neither lower nor higher power is better by itself
    eff = rs.efficiency(low)
    assert rows["EER"]["values"][1] == eff["eer_j_per_param"][0]
    assert rows["samples per joule"]["better"] == "higher"
    assert rows["samples per joule"]["best"] == [
        1 if eff["samples_per_j"][0] > rs.efficiency(high)["samples_per_j"][0] else 0
    ]


def test_show_prints_one_run_again(runs, capsys):
    assert cmp.main(["show", runs["low"]]) == 0
    out = capsys.readouterr().out
    assert "energy summary (fit, finished)" in out and "simulated" in out and "efficiency" in out
    assert cmp.main(["show", runs["low"], "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["energy_j"] == summary_of(runs["low"])["energy_j"]


def test_a_run_is_a_folder_at_any_sensible_depth_or_a_json(runs):
    version = os.path.join(runs["low"], "lightning_logs", "version_0")
    file = os.path.join(version, "energy_summary_fit.json")
    assert (
        rs.resolve_run(runs["low"])
        == rs.resolve_run(os.path.join(runs["low"], "lightning_logs"))
        == rs.resolve_run(version)
        == file
    )
    assert rs.resolve_run(file, stage="test") == file  # a file is taken as given


def test_the_stage_chooses_among_a_runs_summaries(runs, tmp_path):
    version = tmp_path / "version_0"
    shutil.copytree(os.path.join(runs["low"], "lightning_logs", "version_0"), version)
    test_summary = dict(summary_of(runs["low"]), stage="test")
    (version / "energy_summary_test.json").write_text(json.dumps(test_summary))
    assert rs.resolve_run(str(version)) == str(version / "energy_summary_fit.json")  # fit first
    assert rs.resolve_run(str(version), "test") == str(version / "energy_summary_test.json")


def bad_inputs(tmp_path, runs) -> list[tuple[str, str]]:
    not_summary = tmp_path / "energy_summary_fit.json"
    not_summary.write_text(json.dumps({"hello": 1}))
    not_json = tmp_path / "notes.json"
    not_json.write_text("{oops")
    empty = tmp_path / "empty"
    (empty / "lightning_logs" / "version_0").mkdir(parents=True)
    two = tmp_path / "two"
    for v in ("version_0", "version_1"):
        shutil.copytree(os.path.join(runs["low"], "lightning_logs", "version_0"), two / "lightning_logs" / v)
    return [
        (str(tmp_path / "missing"), "no such file or directory"),
        (str(not_summary), "not an energy summary (a JSON without 'stage', 'sensors', 'energy_j')"),
        (str(not_json), "not an energy summary (not valid JSON"),
        (str(empty), "no energy_summary_*.json in this directory"),
        (str(two), "holds 2 runs (lightning_logs/version_0, lightning_logs/version_1); pass one of them"),
    ]


def test_each_bad_input_exits_2_with_one_line_naming_it(runs, tmp_path, capsys):
    for path, message in bad_inputs(tmp_path, runs):
        assert cmp.main(["compare", runs["low"], path]) == 2, path
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"lightning_green compare: {path}: ") and message in err
    assert cmp.main(["show", runs["low"], "--stage", "validate"]) == 2
    assert capsys.readouterr().err == f"lightning_green show: {runs['low']}: no 'validate' summary (it has: fit)\n"


def test_bad_input_exits_2_from_the_command_line(tmp_path):
    proc = cli("compare", str(tmp_path / "nope"))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines()[-1] == f"lightning_green compare: {tmp_path / 'nope'}: no such file or directory"


# ---------------------------------------------------------------------------------- rows, plain calls
def test_rows_best_and_ratio_rules():
    assert cmp.Row("e", "J", "lower", "energy", [3.0, 2.0, 2.0]).best() == [1, 2]
    assert cmp.Row("t", "tokens/J", "higher", "efficiency", [3.0, None, 5.0]).best() == [2]
    assert cmp.Row("e", "J", "lower", "energy", [2.0, 2.0]).best() == []  # all equal: nothing to mark
    assert cmp.Row("p", "W", None, "energy", [1.0, 2.0]).best() == []
    assert cmp.Row("e", "J", "lower", "energy", [2.0, 1.0, None, "n/a"]).ratios() == [1.0, 0.5, None, None]
    assert cmp.Row("e", "J", "lower", "energy", [0.0, 1.0]).ratios() == [None, None]


def test_targets_qat_and_power_limit_rows(runs):
    base = summary_of(runs["low"])
    a = dict(
        base,
        targets=[
            {
                "metric": "val_loss<=2.0",
                "reached": True,
                "step": 40,
                "joules": 90.0,
                "seconds": 5.0,
                "source": "simulated",
            }
        ],
    )
    a["sections"] = dict(base["sections"], **{
        "Quantization-aware training (int8_weight_only)": [
            {"figure": "EPI, float", "value": 0.5, "unit": "J/token", "source": "simulated"},
            {"figure": "EPI, converted", "value": 0.3, "unit": "J/token", "source": "simulated"},
        ],
        "Power limit search": [{"limit_w": 300.0, "chosen": False, "source": "profiled"}, {"limit_w": 250.0, "chosen": True, "source": "profiled"}],
    })  # fmt: skip
    b = dict(
        base,
        targets=[
            {
                "metric": "val_loss<=2.0",
                "reached": False,
                "step": None,
                "joules": None,
                "seconds": None,
                "source": "simulated",
            }
        ],
    )
    rows = {r.figure: r for r in cmp.build_rows([a, b])}
    assert (
        rows["to val_loss<=2.0: energy"].values == [90.0, "not reached"]
        and rows["to val_loss<=2.0: energy"].best() == []
    )
    assert rows["to val_loss<=2.0: step"].values == [40, "not reached"]
    assert rows["QAT EPI, converted"].values == [0.3, None] and rows["QAT EPI, converted"].unit == "J/token"
    assert rows["QAT scheme"].values == ["int8_weight_only", None]
    assert rows["power limit"].values == [250.0, None] and rows["power limit"].sources[0] == "profiled"
    groups = [r.group for r in cmp.build_rows([a, b])]
    assert groups == sorted(groups, key=cmp.GROUPS.index)
