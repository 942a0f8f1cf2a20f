"""``python -m lightning_green compare|show`` on the summaries of real tiny fits.

Every clock but the DDP run's is injected (a batch moves it 0.5 s; the sensor is 100 W or 200 W), so
the joules are exact: 100 W x 0.5 s = 50 J a batch.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from helpers import FakeClock, SleepyModel, tiny_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from lightning_green import EfficiencyLogger, PowerSampler, cli
from lightning_green import compare as cmp
from lightning_green import run_summary as rs
from lightning_green import summary as S
from lightning_green import summary_table as st
from lightning_green.distributed import cluster_figures
from lightning_green.sensors import SimulatedSensor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data")


class StageClock(FakeClock):
    """:class:`helpers.FakeClock` that moves at test batches too."""

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.t += self.batch_s


def sampler(clock, watts: float = 100.0, **kwargs) -> PowerSampler:
    sensor = SimulatedSensor(watts, name="sim", clock=clock)
    return PowerSampler(
        sensors=[sensor], interval_s=3600.0, print_summary=False, report_picture=False, clock=clock, **kwargs
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, str]:
    """Two run folders (``<dir>/lightning_logs/version_0``): the same 6-step fit at 100 W (300 J) and
    at 200 W (600 J), each 3 s."""
    out = {}
    for name, watts in (("low", 100.0), ("high", 200.0)):
        root = tmp_path_factory.mktemp(name)
        clock = StageClock(batch_s=0.5)
        callbacks = [clock, sampler(clock, watts), EfficiencyLogger()]
        tiny_trainer(max_steps=6, callbacks=callbacks, logger=CSVLogger(str(root))).fit(SleepyModel(step_s=0.0))
        out[name] = str(root)
    return out


@pytest.fixture(scope="module")
def resumed(tmp_path_factory) -> str:
    """A folder with the summaries of a fit resumed from a 4-step checkpoint (200 J restored) to 6
    steps (100 J of its own), and of a 2-batch test after it (100 J) in the same process."""
    root = tmp_path_factory.mktemp("resumed")
    clock = StageClock(batch_s=0.5)
    ckpt = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=4, save_top_k=-1)
    first = tiny_trainer(
        max_steps=4, callbacks=[clock, sampler(clock, summary_dir=str(root / "first")), ckpt], enable_checkpointing=True
    )
    first.fit(SleepyModel(step_s=0.0))
    ps = sampler(clock, summary_dir=str(root / "run"))
    trainer = tiny_trainer(max_steps=6, callbacks=[clock, ps], limit_test_batches=2)
    trainer.fit(SleepyModel(step_s=0.0), ckpt_path=root / "ckpt" / "epoch=0-step=4.ckpt")
    trainer.test(SleepyModel(step_s=0.0), verbose=False)
    return str(root / "run")


def summary_of(run_dir: str) -> dict:
    return rs.load_summary(os.path.join(run_dir, "lightning_logs", "version_0", "energy_summary_fit.json"))


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), COLUMNS="200")
    return subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "lightning_green", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def imported(stderr: str) -> set[str]:
    return {line.rsplit("|", 1)[-1].strip() for line in stderr.splitlines() if line.startswith("import time:")}


def cells(stdout: str, figure: str) -> list[str]:
    """The cells of the table line whose first cell is ``figure``."""
    for line in stdout.splitlines():
        parts = [p.strip() for p in line.split("│")]
        if len(parts) > 2 and parts[1] == figure:
            return parts[1:-1]
    raise AssertionError(f"no row {figure!r} in:\n{stdout}")


def values(summary: dict) -> dict:
    """``{figure: value}`` of compare's rows for one summary."""
    return {f.figure: f.value for f in cmp.figures(summary)}


# ---------------------------------------------------------------------------------- the command line
def test_compare_cli_prints_both_runs_and_marks_the_lower_energy_best(runs):
    proc = run_cli("compare", runs["low"], runs["high"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "lightning_green.cli" in imported(proc.stderr)
    assert not {"torch", "lightning", "numpy"} & imported(proc.stderr)
    assert (summary_of(runs["low"])["stage_energy_j"], summary_of(runs["high"])["stage_energy_j"]) == (300.0, 600.0)
    assert cells(proc.stdout, st.STAGE_ENERGY) == [
        st.STAGE_ENERGY,
        "J",
        "simulated",
        f"300 {cmp.BEST_MARK}",
        "600 ×2.00",
    ]
    assert cells(proc.stdout, st.DURATION) == [st.DURATION, "s", "", "3", "3 ×1.00"]
    assert cells(proc.stdout, st.STAGE_POWER) == [st.STAGE_POWER, "W", "simulated", "100", "200 ×2.00"]
    for run_dir in runs.values():
        assert os.path.join(run_dir, "lightning_logs", "version_0", "energy_summary_fit.json") in proc.stdout
    shown = run_cli("show", runs["low"])
    assert shown.returncode == 0
    assert "energy, this stage: 300 J  [source: simulated]" in shown.stdout
    assert not {"torch", "lightning", "numpy"} & imported(shown.stderr)


def test_compare_json_holds_values_best_and_ratio(runs, capsys):
    assert cli.main(["compare", runs["high"], runs["low"], "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    high = summary_of(runs["high"])
    low = summary_of(runs["low"])
    assert [r["run"] for r in out["runs"]] == [runs["high"], runs["low"]]
    rows = {r["figure"]: r for r in out["rows"]}
    stage = rows[st.STAGE_ENERGY]
    assert stage["values"] == [600.0, 300.0] and stage["sources"] == ["simulated", "simulated"]
    assert stage["best"] == [1] and stage["ratio_to_first"] == [1.0, 0.5]
    assert rows[st.CUMULATIVE]["values"] == [600.0, 300.0]
    assert rows[st.CARRIED]["values"] == [0.0, 0.0] and rows[st.RESTORED]["values"] == [0.0, 0.0]
    assert rows[st.DURATION]["values"] == [high["duration_s"], low["duration_s"]] == [3.0, 3.0]
    # neither lower nor higher power is better by itself
    assert rows[st.STAGE_POWER]["best"] == []
    eff = rs.efficiency(low)
    assert rows["EER"]["values"][1] == eff["eer_j_per_param"][0]
    assert rows["samples per joule"]["better"] == "higher"
    # the same samples for half the joules
    assert rows["samples per joule"]["best"] == [1]


def test_show_prints_one_run_again(runs, capsys):
    assert cli.main(["show", runs["low"]]) == 0
    out = capsys.readouterr().out
    assert "energy summary (fit, finished)" in out and "simulated" in out and "efficiency" in out
    assert cli.main(["show", runs["low"], "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["schema"] == rs.SCHEMA and shown["cumulative_energy_j"] == 300.0


def test_a_run_is_a_folder_at_any_sensible_depth_or_a_json(runs):
    version = os.path.join(runs["low"], "lightning_logs", "version_0")
    file = os.path.join(version, "energy_summary_fit.json")
    assert rs.resolve_run(runs["low"]) == file
    assert rs.resolve_run(os.path.join(runs["low"], "lightning_logs")) == file
    assert rs.resolve_run(version) == file
    # a file is taken as given
    assert rs.resolve_run(file, stage="test") == file


def test_the_stage_chooses_among_a_runs_summaries(runs, tmp_path):
    version = tmp_path / "version_0"
    shutil.copytree(os.path.join(runs["low"], "lightning_logs", "version_0"), version)
    test_summary = dict(summary_of(runs["low"]), stage="test")
    (version / "energy_summary_test.json").write_text(json.dumps(test_summary))
    # fit first
    assert rs.resolve_run(str(version)) == str(version / "energy_summary_fit.json")
    assert rs.resolve_run(str(version), "test") == str(version / "energy_summary_test.json")


def bad_inputs(tmp_path, runs) -> list[tuple[str, str]]:
    not_summary = tmp_path / "energy_summary_fit.json"
    not_summary.write_text(json.dumps({"hello": 1}))
    no_energy = tmp_path / "no_energy.json"
    no_energy.write_text(json.dumps({"schema": 2, "stage": "fit", "sensors": []}))
    newer = tmp_path / "newer.json"
    newer.write_text(json.dumps({"schema": 99, "stage": "fit", "sensors": []}))
    not_json = tmp_path / "notes.json"
    not_json.write_text("{oops")
    empty = tmp_path / "empty"
    (empty / "lightning_logs" / "version_0").mkdir(parents=True)
    two = tmp_path / "two"
    for v in ("version_0", "version_1"):
        shutil.copytree(os.path.join(runs["low"], "lightning_logs", "version_0"), two / "lightning_logs" / v)
    return [
        (str(tmp_path / "missing"), "no such file or directory"),
        (str(not_summary), "not an energy summary (a JSON without 'stage', 'sensors')"),
        (str(no_energy), "not an energy summary (a JSON without 'cumulative_energy_j')"),
        (str(newer), "written in summary schema 99; this lightning_green reads schemas 1 to 2"),
        (str(not_json), "not an energy summary (not valid JSON"),
        (str(empty), "no energy_summary_*.json in this directory"),
        (str(two), "holds 2 runs (lightning_logs/version_0, lightning_logs/version_1); pass one of them"),
    ]


def test_each_bad_input_exits_2_with_one_line_naming_it(runs, tmp_path, capsys):
    for path, message in bad_inputs(tmp_path, runs):
        assert cli.main(["compare", runs["low"], path]) == 2, path
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"lightning_green compare: {path}: ") and message in err, err
    assert cli.main(["show", runs["low"], "--stage", "validate"]) == 2
    assert capsys.readouterr().err == f"lightning_green show: {runs['low']}: no 'validate' summary (it has: fit)\n"


def test_bad_input_exits_2_from_the_command_line(tmp_path):
    proc = run_cli("compare", str(tmp_path / "nope"))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines()[-1] == f"lightning_green compare: {tmp_path / 'nope'}: no such file or directory"


# ---------------------------------------------------------------------------------- scopes
def test_a_resumed_fit_keeps_its_stage_and_its_restored_energy_apart(resumed, capsys):
    fit = rs.load_summary(os.path.join(resumed, "energy_summary_fit.json"))
    got = values(fit)
    # 2 batches of its own (100 J in 1 s), 4 restored from the checkpoint (200 J): the stage's rows
    # hold the stage's figures, and the restored energy has its own row
    assert got[st.DURATION] == 1.0
    assert got[st.STAGE_ENERGY] == 100.0
    assert got[st.STAGE_POWER] == 100.0
    assert got[st.CARRIED] == 0.0
    assert got[st.RESTORED] == 200.0
    assert got[st.CUMULATIVE] == 300.0
    assert got["energy sim, this stage"] == 100.0
    assert cli.main(["compare", os.path.join(resumed, "energy_summary_fit.json")]) == 0
    out = capsys.readouterr().out
    assert f"note (#1): {st.RESTORED_NOTE}" in out
    assert "energy total" not in out


def test_a_test_after_a_fit_shows_the_test_alone_and_the_fit_carried(resumed, capsys):
    test = rs.load_summary(os.path.join(resumed, "energy_summary_test.json"))
    got = values(test)
    assert (got[st.STAGE_ENERGY], got[st.CARRIED], got[st.RESTORED], got[st.CUMULATIVE]) == (100.0, 100.0, 200.0, 400.0)
    assert got[st.DURATION] == 1.0 and got[st.STAGE_POWER] == 100.0
    assert cli.main(["show", resumed, "--stage", "test"]) == 0
    out = capsys.readouterr().out
    for line in (
        "duration, this stage: 1 s",
        "energy, this stage: 100 J  [source: simulated]",
        "energy carried from earlier stages: 100 J  [source: simulated]",
        "energy restored from checkpoint: 200 J  [source: simulated]",
        "energy cumulative: 400 J  [source: simulated]",
        "mean power, this stage: 100 W  [source: simulated]",
    ):
        assert line in out.splitlines(), (line, out)


def test_a_summary_without_sensors_says_nothing_measured_not_zero(runs, capsys):
    bare = dict(summary_of(runs["low"]), sensors=[], sources=[], stage_energy_j=0.0, cumulative_energy_j=0.0)
    got = values(bare)
    for figure in (st.STAGE_ENERGY, st.CARRIED, st.RESTORED, st.CUMULATIVE, st.STAGE_POWER):
        assert got[figure] == st.NO_SENSOR, figure
    # time was still measured
    assert got[st.DURATION] == 3.0
    rows = {r.figure: r for r in cmp.build_rows([bare, summary_of(runs["low"])])}
    assert rows[st.STAGE_ENERGY].values == [st.NO_SENSOR, 300.0] and rows[st.STAGE_ENERGY].best() == []
    # no source for what nothing measured
    assert rows[st.STAGE_ENERGY].sources == ["", "simulated"]
    st.render(bare)
    out = capsys.readouterr().out
    assert f"lightning_green energy summary (fit, finished): {st.NO_SENSOR}" in out
    assert f"energy, this stage: {st.NO_SENSOR}" in out and " 0 J" not in out


def two_process_summary(summary: dict, rank0_at_loop_end_j: float) -> dict:
    """``summary`` as rank 0 of a 2-process fit writes it: this process's own figures read at teardown,
    every process's gathered at the end of the loop (``rank0_at_loop_end_j`` then; rank 1 has no
    sensor of its own: the host-level one is read by local rank 0 only)."""
    per_rank = [
        {
            "rank": 0,
            "node_rank": 0,
            "energy_j": rank0_at_loop_end_j,
            "device_energy_j": 0.0,
            "stage_energy_j": rank0_at_loop_end_j,
            "sources": ["simulated"],
        },
        {"rank": 1, "node_rank": 0, "energy_j": 0.0, "device_energy_j": 0.0, "stage_energy_j": 0.0, "sources": []},
    ]
    fields = ("stage", "status", "started_at", "duration_s", "rank", "sensors", "skipped", "sections", "trace")
    return S.build_summary(
        **{k: summary[k] for k in fields}, unattributed_j=0.0, cluster=cluster_figures(per_rank), timeline=[]
    )


def test_the_all_processes_figures_say_when_they_were_taken(runs, tmp_path, capsys):
    path = tmp_path / "energy_summary_fit.json"
    S.write_json(two_process_summary(summary_of(runs["low"]), rank0_at_loop_end_j=290.0), path)
    summary = rs.load_summary(path)
    assert summary["cluster"]["gathered_at"] == "loop_end"
    got = values(summary)
    # every process at loop end (290 J) is less than this process at teardown (300 J): the rows say
    # which is which, and the footnote why
    assert got[st.ALL_CUMULATIVE] == got[st.ALL_STAGE] == 290.0
    assert got[st.CUMULATIVE] == got[st.STAGE_ENERGY] == 300.0
    assert cli.main(["compare", str(path), runs["low"]]) == 0
    # rich wraps long lines
    out = " ".join(capsys.readouterr().out.split())
    assert f"note (#1): {st.ALL_PROCESSES_NOTE}" in out
    assert "note (#1): this stage, carried, restored, cumulative: this process (rank 0) only" in out
    assert cli.main(["show", str(path)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"{st.ALL_CUMULATIVE}: 290 J [source: simulated]" in out
    assert "per process, cumulative (at loop end; 2 processes, 1 nodes): rank 0 (node 0): 290 J" in out
    assert st.ALL_PROCESSES_NOTE in out
    single = values(summary_of(runs["low"]))
    # one process: no all-processes rows, no footnote
    assert st.ALL_CUMULATIVE not in single


# ---------------------------------------------------------------------------------- schema 1
def test_a_schema_1_resumed_fit_reads_with_the_same_scopes(capsys):
    """A summary written before schema 2 (kept in tests/data): synonyms gone, QAT scheme from its title."""
    path = os.path.join(DATA, "summary_v1_resumed_fit.json")
    with open(path) as f:
        raw = json.load(f)
    assert "schema" not in raw and raw["energy_j"] == 300.0 and raw["energy_this_run_j"] == 100.0
    summary = rs.load_summary(path)
    assert summary["schema"] == 2 and summary["upgraded_from_schema"] == 1
    assert "energy_j" not in summary and "energy_this_run_j" not in summary
    (sensor,) = summary["sensors"]
    assert "energy_j" not in sensor and "energy_this_run_j" not in sensor and "mean_power_w" not in sensor
    assert (sensor["stage_energy_j"], sensor["restored_j"], sensor["cumulative_energy_j"]) == (100.0, 200.0, 300.0)
    got = values(summary)
    assert (got[st.STAGE_ENERGY], got[st.CARRIED], got[st.RESTORED], got[st.CUMULATIVE]) == (100.0, 0.0, 200.0, 300.0)
    assert got[st.STAGE_POWER] == 100.0 and got[st.DURATION] == 1.0
    assert got["QAT scheme"] == "int8_dynamic" and got["QAT EPI, converted"] == 0.3
    assert rs.section_entry(summary, rs.QAT)["scheme"] == "int8_dynamic"
    assert rs.efficiency(summary)["train_energy_j"] == (100.0, "simulated")
    assert cli.main(["show", path]) == 0
    assert "energy restored from checkpoint: 200 J  [source: simulated]" in capsys.readouterr().out


def test_a_schema_1_test_summary_reads_its_stage_energy_not_the_cumulative():
    summary = rs.load_summary(os.path.join(DATA, "summary_v1_test_after_resumed_fit.json"))
    got = values(summary)
    assert (got[st.STAGE_ENERGY], got[st.CARRIED], got[st.RESTORED], got[st.CUMULATIVE]) == (100.0, 100.0, 200.0, 400.0)
    assert rs.efficiency(summary)["test_epi_j"] == (50.0, "simulated")


def test_a_summary_older_than_carried_j_leaves_the_split_unknown():
    sensor = {"name": "sim", "source": "simulated", "energy_j": 300.0, "energy_this_run_j": 200.0}
    old = {
        "stage": "fit",
        "duration_s": 2.0,
        "energy_j": 300.0,
        "energy_this_run_j": 200.0,
        "restored_j": 100.0,
        "sensors": [sensor],
    }
    got = values(rs.upgrade(old))
    assert (got[st.STAGE_ENERGY], got[st.CARRIED], got[st.RESTORED], got[st.CUMULATIVE]) == (200.0, None, None, 300.0)
    assert got[st.STAGE_POWER] == 100.0


# ---------------------------------------------------------------------------------- rows, plain calls
def test_rows_best_and_ratio_rules():
    assert cmp.Row("e", "J", "lower", "energy", [3.0, 2.0, 2.0]).best() == [1, 2]
    assert cmp.Row("t", "tokens/J", "higher", "efficiency", [3.0, None, 5.0]).best() == [2]
    # all equal: nothing to mark
    assert cmp.Row("e", "J", "lower", "energy", [2.0, 2.0]).best() == []
    assert cmp.Row("p", "W", None, "energy", [1.0, 2.0]).best() == []
    assert cmp.Row("e", "J", "lower", "energy", [2.0, 1.0, None, "n/a"]).ratios() == [1.0, 0.5, None, None]
    assert cmp.Row("e", "J", "lower", "energy", [0.0, 1.0]).ratios() == [None, None]


def test_targets_qat_and_power_limit_rows(runs):
    base = summary_of(runs["low"])
    reached = {
        "metric": "val_loss<=2.0",
        "reached": True,
        "step": 40,
        "joules": 90.0,
        "seconds": 5.0,
        "source": "simulated",
    }
    missed = {
        "metric": "val_loss<=2.0",
        "reached": False,
        "step": None,
        "joules": None,
        "seconds": None,
        "source": "simulated",
    }
    qat_rows = [
        {"figure": "EPI, float", "value": 0.5, "unit": "J/token", "source": "simulated"},
        {"figure": "EPI, converted", "value": 0.3, "unit": "J/token", "source": "simulated"},
    ]
    limit_rows = [
        {"limit_w": 300.0, "chosen": False, "source": "profiled"},
        {"limit_w": 250.0, "chosen": True, "source": "profiled"},
    ]
    sections = dict(base["sections"])
    sections["qat"] = {
        "kind": "qat",
        "title": "Quantization-aware training",
        "rows": qat_rows,
        "scheme": "int8_weight_only",
    }
    sections["power_limit"] = {"kind": "power_limit", "title": "Power limit search", "rows": limit_rows}
    a = dict(base, targets=[reached], sections=sections)
    b = dict(base, targets=[missed])
    rows = {r.figure: r for r in cmp.build_rows([a, b])}
    energy_to_target = rows["to val_loss<=2.0: energy"]
    assert energy_to_target.values == [90.0, "not reached"] and energy_to_target.best() == []
    assert rows["to val_loss<=2.0: step"].values == [40, "not reached"]
    assert rows["QAT EPI, converted"].values == [0.3, None] and rows["QAT EPI, converted"].unit == "J/token"
    assert rows["QAT scheme"].values == ["int8_weight_only", None]
    assert rows["power limit"].values == [250.0, None] and rows["power limit"].sources[0] == "profiled"
    groups = [r.group for r in cmp.build_rows([a, b])]
    assert groups == sorted(groups, key=cmp.GROUPS.index)
