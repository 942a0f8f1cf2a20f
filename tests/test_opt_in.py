"""LIGHTNING_GREEN=1: the entry-point factories, their settings, and what Lightning does with them.

Lightning's own loading (``_load_external_callbacks``) runs here on the entry points that
``pyproject.toml`` declares, handed to it in place of the installed metadata: the tests do not depend
on how the package was installed. One test checks the installed metadata itself.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import warnings

import pytest
import torch
from conftest import sampler_threads
from helpers import tiny_trainer
from lightning.fabric import Fabric
from lightning.pytorch.demos.boring_classes import BoringModel

from lightning_green import EfficiencyLogger, PowerSampler
from lightning_green.fabric import FabricEnergy, measuring
from lightning_green.opt_in import (
    OptInEfficiencyLogger,
    OptInFabricEnergy,
    OptInPowerSampler,
    fabric_callbacks,
    settings,
    trainer_callbacks,
)
from lightning_green.sensors import SimulatedSensor

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GROUPS = ("lightning.pytorch.callbacks_factory", "lightning.fabric.callbacks_factory")
OPT_IN_VARS = (
    "LIGHTNING_GREEN",
    "LIGHTNING_GREEN_SUMMARY_DIR",
    "LIGHTNING_GREEN_SENSORS",
    "LIGHTNING_GREEN_INTERVAL_S",
    "LIGHTNING_GREEN_LOG_EVERY_N_STEPS",
)


def declared_entry_points() -> dict[str, list[importlib.metadata.EntryPoint]]:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        tables = tomllib.load(f)["project"]["entry-points"]
    return {
        group: [importlib.metadata.EntryPoint(name, value, group) for name, value in tables.get(group, {}).items()]
        for group in GROUPS
    }


@pytest.fixture
def opt_in_env(monkeypatch, tmp_path):
    """A clean opt-in environment (summaries to ``tmp_path``), and Lightning's loader fed the entry points
    pyproject.toml declares."""
    for name in OPT_IN_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LIGHTNING_GREEN_SUMMARY_DIR", str(tmp_path))
    declared = declared_entry_points()
    monkeypatch.setattr("lightning.fabric.utilities.registry.entry_points", lambda group=None: declared.get(group, []))
    return monkeypatch


def test_pyproject_registers_both_groups():
    declared = declared_entry_points()
    assert [e.value for e in declared["lightning.pytorch.callbacks_factory"]] == [
        "lightning_green.opt_in:trainer_callbacks"
    ]
    assert [e.value for e in declared["lightning.fabric.callbacks_factory"]] == [
        "lightning_green.opt_in:fabric_callbacks"
    ]
    assert [e.load() for group in GROUPS for e in declared[group]] == [trainer_callbacks, fabric_callbacks]


def test_installed_metadata_holds_the_entry_points():
    found = {
        group: [e.value for e in importlib.metadata.entry_points(group=group) if e.value.startswith("lightning_green")]
        for group in GROUPS
    }
    if not any(found.values()):
        dist = importlib.metadata.distribution("lightning_green")
        pytest.skip(
            f"the installed metadata of lightning_green ({dist.locate_file('')}) was made before pyproject.toml "
            "declared its entry points: run `pip install -e .` again"
        )
    assert found == {
        "lightning.pytorch.callbacks_factory": ["lightning_green.opt_in:trainer_callbacks"],
        "lightning.fabric.callbacks_factory": ["lightning_green.opt_in:fabric_callbacks"],
    }


def test_factories_add_nothing_unless_asked(opt_in_env):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert trainer_callbacks() == [] and fabric_callbacks() == []  # LIGHTNING_GREEN unset
        opt_in_env.setenv("LIGHTNING_GREEN", "0")
        assert trainer_callbacks() == [] and fabric_callbacks() == []
    opt_in_env.setenv("LIGHTNING_GREEN", "1")
    assert [type(c) for c in trainer_callbacks()] == [OptInPowerSampler, OptInEfficiencyLogger]
    assert [type(c) for c in fabric_callbacks()] == [OptInFabricEnergy]


@pytest.mark.parametrize("value", ["yes", "true", "2", "on"])
def test_a_value_not_understood_is_one_warning(opt_in_env, value):
    opt_in_env.setenv("LIGHTNING_GREEN", value)
    with pytest.warns(UserWarning) as record:
        assert trainer_callbacks() == []
    assert len(record) == 1
    assert f"LIGHTNING_GREEN={value!r} is not understood" in str(record[0].message)
    assert "LIGHTNING_GREEN=1" in str(record[0].message)


def test_settings_come_from_the_environment(tmp_path):
    environ = {
        "LIGHTNING_GREEN_SUMMARY_DIR": str(tmp_path),
        "LIGHTNING_GREEN_SENSORS": "rapl, estimate",
        "LIGHTNING_GREEN_INTERVAL_S": "0.5",
        "LIGHTNING_GREEN_LOG_EVERY_N_STEPS": "10",
    }
    assert settings(environ) == {"summary_dir": str(tmp_path), "sensors": ["rapl", "estimate"], "interval_s": 0.5}
    assert settings(environ, fabric=True)["log_every_n_steps"] == 10
    assert settings({"LIGHTNING_GREEN_SENSORS": "estimate"}) == {"sensors": "estimate"}


def test_a_bad_setting_is_a_warning_and_the_default(opt_in_env):
    environ = {
        "LIGHTNING_GREEN_SENSORS": "gpu",
        "LIGHTNING_GREEN_INTERVAL_S": "-1",
        "LIGHTNING_GREEN_LOG_EVERY_N_STEPS": "0",
    }
    with pytest.warns(UserWarning) as record:
        assert settings(environ, fabric=True) == {}
    messages = [str(r.message) for r in record]
    assert len(messages) == 3
    assert any("LIGHTNING_GREEN_SENSORS='gpu' ignored" in m and "unknown sensor name" in m for m in messages)
    opt_in_env.setenv("LIGHTNING_GREEN", "1")
    opt_in_env.setenv("LIGHTNING_GREEN_INTERVAL_S", "fast")
    with pytest.warns(UserWarning, match="LIGHTNING_GREEN_INTERVAL_S='fast' ignored"):
        (sampler, _) = trainer_callbacks()
    assert sampler.interval_s == 0.1


def test_unchanged_trainer_script_is_measured(opt_in_env, tmp_path):
    opt_in_env.setenv("LIGHTNING_GREEN", "1")
    opt_in_env.setenv("LIGHTNING_GREEN_SENSORS", "estimate")
    opt_in_env.setenv("LIGHTNING_GREEN_SUMMARY_DIR", str(tmp_path))
    trainer = tiny_trainer(max_steps=4, log_every_n_steps=2)
    added = [c for c in trainer.callbacks if isinstance(c, (PowerSampler, EfficiencyLogger))]
    assert [type(c) for c in added] == [OptInPowerSampler, OptInEfficiencyLogger]
    trainer.fit(BoringModel())
    summary = json.loads((tmp_path / "energy_summary_fit.json").read_text())
    assert summary["sources"] == ["estimate"] and summary["stage_energy_j"] > 0
    assert "efficiency" in summary["sections"]
    assert not sampler_threads()


def test_trainer_with_its_own_sampler_gets_no_second(opt_in_env, tmp_path):
    opt_in_env.setenv("LIGHTNING_GREEN", "1")
    own = PowerSampler(sensors=[SimulatedSensor(100.0)], print_summary=False, summary_dir=str(tmp_path))
    trainer = tiny_trainer(max_steps=3, callbacks=[own])  # two stateful samplers: Lightning accepts their keys
    added = next(c for c in trainer.callbacks if isinstance(c, OptInPowerSampler))
    trainer.fit(BoringModel())
    assert [c for c in trainer.callbacks if isinstance(c, PowerSampler)] == [own]
    assert not added.session.started and added.summary is None
    efficiency = next(c for c in trainer.callbacks if isinstance(c, EfficiencyLogger))
    assert type(efficiency) is OptInEfficiencyLogger and efficiency.results["train_energy_j"] > 0  # on the own sampler
    assert own.summary["sources"] == ["simulated"]
    trainer.test(BoringModel(), verbose=False)  # a second stage: still one sampler
    assert [c for c in trainer.callbacks if isinstance(c, PowerSampler)] == [own]


def test_trainer_with_its_own_efficiency_logger_keeps_it(opt_in_env):
    opt_in_env.setenv("LIGHTNING_GREEN", "1")
    own = EfficiencyLogger()
    trainer = tiny_trainer(max_steps=2, callbacks=[own])
    trainer.fit(BoringModel())
    assert [c for c in trainer.callbacks if isinstance(c, EfficiencyLogger)] == [own]
    assert [type(c) for c in trainer.callbacks if isinstance(c, PowerSampler)] == [OptInPowerSampler]
    assert own.results["train_energy_j"] > 0


def fabric_steps(fabric: Fabric, steps: int) -> None:
    model = torch.nn.Linear(4, 1)
    model, optimizer = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    for _ in range(steps):
        fabric.backward(model(torch.ones(2, 4)).sum())
        optimizer.step()
        optimizer.zero_grad()


def test_unchanged_fabric_script_is_measured(opt_in_env, tmp_path):
    opt_in_env.setenv("LIGHTNING_GREEN", "1")
    opt_in_env.setenv("LIGHTNING_GREEN_SENSORS", "estimate")
    opt_in_env.setenv("LIGHTNING_GREEN_SUMMARY_DIR", str(tmp_path))
    opt_in_env.setenv("LIGHTNING_GREEN_LOG_EVERY_N_STEPS", "2")
    fabric = Fabric(accelerator="cpu", devices=1)
    fabric_steps(fabric, 4)
    energy = measuring(fabric)
    assert type(energy) is OptInFabricEnergy and energy.log_every_n_steps == 2 and energy.steps == 4
    energy.finish()  # what the exit hook would do
    summary = json.loads((tmp_path / "energy_summary_fit.json").read_text())
    assert summary["sources"] == ["estimate"] and summary["stage_energy_j"] > 0
    assert not sampler_threads()


def test_fabric_with_its_own_energy_callback_gets_no_second(opt_in_env, tmp_path):
    opt_in_env.setenv("LIGHTNING_GREEN", "1")
    own = FabricEnergy(sensors=[SimulatedSensor(100.0)], print_summary=False, summary_dir=str(tmp_path))
    fabric = Fabric(accelerator="cpu", devices=1, callbacks=[own])
    fabric_steps(fabric, 3)
    assert measuring(fabric) is own and own.steps == 3
    own.finish()
    assert own.summary["sources"] == ["simulated"]
    assert not sampler_threads()  # the added one never started a thread
