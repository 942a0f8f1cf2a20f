"""The logged-metrics table (docs/metrics.md, linked from the README) names exactly the keys the code logs;
the README's Results section is what benchmarks/report.py makes of the results files."""

import re
from pathlib import Path
from unittest.mock import Mock

import torch
from helpers import tiny_trainer
from lightning.pytorch.demos.boring_classes import BoringModel

from lightning_green import (
    EfficiencyLogger,
    EnergyAwareDDPStrategy,
    EnergyBudget,
    PowerLimitSearch,
    PowerSampler,
    QuantizationAwareTraining,
)
from lightning_green.power_limit import SimulatedPowerControl
from lightning_green.sensors import SimulatedSensor

README = Path(__file__).resolve().parents[1] / "README.md"
METRICS_TABLE = README.parent / "docs" / "metrics.md"


#: The sections of docs/metrics.md, one table each.
TRAINER = "Training and evaluation (Trainer)"
GENERATION = "Generation (Trainer: predict and test)"
FABRIC = "Fabric (`FabricEnergy`)"


def documented_keys(section_title: str = TRAINER) -> set[str]:
    """The keys of one table of docs/metrics.md, by its section's title."""
    text = METRICS_TABLE.read_text()
    assert f"\n## {section_title}\n" in text, f"docs/metrics.md has no section {section_title!r}"
    section = text.split(f"\n## {section_title}\n", 1)[1].split("\n## ", 1)[0]
    keys = set()
    for row in section.splitlines():
        if row.startswith("| `"):
            keys |= set(re.findall(r"`([a-z_]+/[^`]+)`", row.split("|")[1]))
    return keys


def normalise(key: str) -> str:
    key = re.sub(r"^(energy|power|power_trace)/sim_(j|w)$", r"\1/<sensor>_\2", key)
    key = re.sub(r"^(energy|time)/phase/(data|compute|optimizer|comm|other)_", r"\1/phase/<phase>_", key)
    key = re.sub(r"^efficiency/(energy|time)_to_target/val_loss_(j|s)$", r"efficiency/\1_to_target/<metric>_\2", key)
    key = re.sub(r"^efficiency/val_loss_delta_per_kj$", r"efficiency/<monitor>_delta_per_kj", key)
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
    strategy = EnergyAwareDDPStrategy(
        power_limit=PowerLimitSearch(300.0, power_control=SimulatedPowerControl(), cache=False)
    )
    callbacks = [
        PowerSampler(
            sensors=[SimulatedSensor(100.0, name="sim")],
            interval_s=0.01,
            phases=True,
            summary_dir=str(tmp_path),
            print_summary=False,
        ),
        EfficiencyLogger(tokens_per_batch="numel", targets={"val_loss": 1e9}),  # reached at the first validation
        QuantizationAwareTraining(scheme="int8_weight_only", group_size=32),
        EnergyBudget(max_j=1e9, forecast_after=2, monitor="val_loss", patience=10),
    ]
    trainer = tiny_trainer(
        max_steps=4,
        log_every_n_steps=2,
        limit_val_batches=2,
        val_check_interval=2,
        logger=logger,
        callbacks=callbacks,
        strategy=strategy,
    )
    trainer.fit(Wide())
    calls = logger.log_metrics.call_args_list
    logged = {normalise(k) for call in calls for k in call.kwargs.get("metrics", call.args[0] if call.args else {})}
    logged -= {"epoch", "val_loss"}  # the model's own and Lightning's
    documented = documented_keys()
    assert logged - documented == set(), "logged but not in docs/metrics.md"
    assert documented - logged == set(), "in docs/metrics.md but not logged by this run"


def load_report():
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchmarks_report", README.parent / "benchmarks" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_results_section_matches_benchmark_json():
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, str(README.parent / "benchmarks" / "report.py"), "--check"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr


def test_check_fails_when_any_results_figure_is_altered(tmp_path, capsys):
    report = load_report()
    text = README.read_text()
    begin, end = text.index(report.BEGIN), text.index(report.END)
    numbers = list(re.finditer(r"\d+(\.\d+)?", text[begin + len(report.BEGIN) : end]))
    assert len(numbers) > 50
    copy = tmp_path / "README.md"
    for m in numbers:
        at = begin + len(report.BEGIN) + m.end() - 1
        altered = text[:at] + ("1" if text[at] != "1" else "2") + text[at + 1 :]
        copy.write_text(altered)
        assert report.main(["--check", "--readme", str(copy)]) == 1, f"altering {m.group()!r} went unnoticed"
    copy.write_text(text)
    assert report.main(["--check", "--readme", str(copy)]) == 0


def test_check_refuses_results_of_a_quick_run(tmp_path):
    import json
    import shutil

    report = load_report()
    results = tmp_path / "results"
    shutil.copytree(report.RESULTS, results)
    path = results / "overhead.json"
    data = json.loads(path.read_text())
    data["quick"] = True
    path.write_text(json.dumps(data))
    readme = tmp_path / "README.md"
    readme.write_text(README.read_text())
    assert report.main(["--write", "--readme", str(readme), "--results", str(results)]) == 0
    assert report.main(["--check", "--readme", str(readme), "--results", str(results)]) == 1
    data["quick"] = False
    path.write_text(json.dumps(data))
    assert report.main(["--check", "--readme", str(readme), "--results", str(results)]) == 0


def test_summaries_render_median_and_spread():
    report = load_report()
    assert (
        report.span({"min": 0.95, "median": 1.0, "max": 1.2, "values": [0.95, 1.0, 1.2]}, ".2f", " ms")
        == "1.00 ms (0.95–1.20)"
    )
    assert report.span({"min": 2.0, "median": 2.0, "max": 2.0}, ".1f") == "2.0"
    assert report.span(0.5, ".3f") == "0.500"


def test_render_pruning_rows_goals_and_status():
    report = load_report()

    def summary(*values):
        return {"min": min(values), "median": sorted(values)[len(values) // 2], "max": max(values), "values": values}

    data = {
        "repeats": 3,
        "energy_source": "estimate",
        "config": {
            "n_layer": 4,
            "amount": 0.3,
            "prefill_batch": 8,
            "prefill_tokens": 64,
            "new_tokens": 32,
            "fit_steps": 40,
            "fit_val_batches": 4,
        },
        "goals": {
            "width_prefill_ratio": {"op": "<=", "value": 0.75},
            "fit_epi_ratio": {"op": "<=", "value": 0.8},
            "event_s": {"op": "<=", "value": 1.0},
        },
        "figures": {
            "llama": {
                "width_prefill_ratio": summary(0.7, 0.72, 0.9),
                "fit_epi_ratio": summary(0.85, 0.9, 0.7),
                "event_s": summary(0.1, 0.2, 0.15),
                "masked_prefill_ratio": summary(1.2, 1.1, 1.3),
                "fit_val_loss_ratio": summary(1.01),
                "width_params_ratio": summary(0.72),
            }
        },
    }
    rows, notes = report.render_pruning(data)
    assert rows == [
        "| pruning, LitGPT `GPT` LLaMA style, GQA, 4 layers, 512 wide: width, 30 % of the prunable block parameters: "
        "prefill time pruned / unpruned (8 × 64) | ≤ 0.75 | 0.72 (0.7–0.9) | met | 3 runs | CPU |",
        "| pruning, LitGPT `GPT` LLaMA style, GQA, 4 layers, 512 wide: Lightning's `ModelPruning` (`ln_structured`, "
        "30 %, masks): prefill time / unpruned | reported | 1.2 (1.1–1.3) | reported | 3 runs | CPU |",
        "| pruning, LitGPT `GPT` LLaMA style, GQA, 4 layers, 512 wide: time of one pruning event, graph trace "
        "included, 4 layers | ≤ 1 s | 0.15 s (0.1–0.2) | met | 3 runs | CPU |",
        "| pruning, LitGPT `GPT` LLaMA style, GQA, 4 layers, 512 wide: `StructuredPruning` in a 40-step fit: "
        "validation loss at the end / unpruned fit's | reported | 1.01 | reported | 1 run | CPU |",
        "| pruning, LitGPT `GPT` LLaMA style, GQA, 4 layers, 512 wide: `StructuredPruning` in a 40-step fit: "
        "the callbacks' EPI pruned / unpruned | ≤ 0.8 | 0.85 (0.7–0.9) | **missed** | 3 runs | CPU, `estimate` |",
    ]
    assert "not a measurement" in notes[0]
