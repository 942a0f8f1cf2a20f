"""The top level: cheap, explicit, and every exported name resolves."""

import subprocess
import sys

import pytest

import lightning_green


def run_python(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip()


def test_import_registers_the_strategy_and_loads_no_lever():
    out = run_python(
        "import sys, lightning.pytorch\n"
        "before = set(sys.modules)\n"
        "import lightning_green\n"
        "from lightning_green import EfficiencyLogger, PowerSampler\n"
        "PowerSampler(); EfficiencyLogger()\n"
        "from lightning.pytorch.strategies import StrategyRegistry\n"
        "heavy = sorted(m for m in ('torchao', 'lightning_green.quantization', 'pynvml', 'matplotlib.pyplot',"
        " 'torch_pruning') if m in set(sys.modules) - before)\n"
        "print('ddp_green' in StrategyRegistry, 'ddp_green_spawn' in StrategyRegistry, heavy)"
    )
    assert out == "True True []"


def test_every_exported_name_resolves():
    for name in lightning_green.__all__:
        assert getattr(lightning_green, name) is not None, name


def test_unknown_name_raises_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'PowerSamplr'"):
        lightning_green.PowerSamplr  # noqa: B018


@pytest.mark.parametrize(
    ("name", "home"),
    [("SimulatedSensor", "lightning_green.sensors"), ("SimulatedPowerControl", "lightning_green.power_limit")],
)
def test_test_doubles_moved_with_a_deprecation_warning(name, home):
    with pytest.warns(DeprecationWarning, match=f"import it from `{home}`"):
        moved = getattr(lightning_green, name)
    assert moved is getattr(__import__(home, fromlist=[name]), name)
    assert name not in lightning_green.__all__
