"""The README's "Logged metrics" table names exactly the keys the code logs."""

import re
from pathlib import Path
from unittest.mock import Mock

import torch
from helpers import tiny_trainer
from lightning.pytorch.demos.boring_classes import BoringModel

from lightning_green import EfficiencyLogger, EnergyAwareDDPStrategy, PowerSampler, QuantizationAwareTraining, SimulatedPowerControl, SimulatedSensor

README = Path(__file__).resolve().parents[1] / "README.md"


def documented_keys() -> set[str]:
    section = README.read_text().split("## Logged metrics", 1)[1].split("\n## ", 1)[0]
    keys = set()
    for row in section.splitlines():
        if row.startswith("| `"):
            keys |= set(re.findall(r"`([a-z_]+/[^`]+)`", row.split("|")[1]))
    return keys


def normalise(key: str) -> str:
    key = re.sub(r"^(energy|power|power_trace)/sim_(j|w)$", r"\1/<sensor>_\2", key)
    key = re.sub(r"^(energy|time)/phase/(data|compute|optimizer|comm|other)_", r"\1/phase/<phase>_", key)
    return key


class Wide(BoringModel):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2))

    def validation_step(self, batch, batch_idx):
        loss = self.step(batch)
        self.log("val_loss", loss)
        return loss


def test_logged_keys_match_readme(tmp_path):
    logger = Mock()
    logger.log_dir = logger.save_dir = None
    strategy = EnergyAwareDDPStrategy(power_limit=300.0, power_control=SimulatedPowerControl(), power_limit_cache=False)
    callbacks = [
        PowerSampler(sensors=[SimulatedSensor(100.0, name="sim")], interval_s=0.01, phases=True, summary_dir=str(tmp_path), print_summary=False),
        EfficiencyLogger(tokens_per_batch="numel"),
        QuantizationAwareTraining(scheme="int8_weight_only", group_size=32),
    ]
    trainer = tiny_trainer(max_steps=4, log_every_n_steps=2, limit_val_batches=2, val_check_interval=2, logger=logger, callbacks=callbacks, strategy=strategy)
    trainer.fit(Wide())
    calls = logger.log_metrics.call_args_list
    logged = {normalise(k) for call in calls for k in call.kwargs.get("metrics", call.args[0] if call.args else {})}
    logged -= {"epoch", "val_loss"}  # the model's own and Lightning's
    documented = documented_keys()
    assert logged - documented == set(), "logged but not in the README table"
    assert documented - logged == set(), "in the README table but not logged by this run"


def test_results_section_matches_benchmark_json():
    import subprocess
    import sys

    report = Path(__file__).resolve().parents[1] / "benchmarks" / "report.py"
    table = subprocess.run([sys.executable, str(report)], capture_output=True, text=True, check=True).stdout.strip()
    assert table.count("\n") > 10
    assert table in README.read_text(), "README Results differ from benchmarks/results/*.json: run python benchmarks/report.py"
