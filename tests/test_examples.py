"""Smoke tests: each example runs as a user runs it (a subprocess), with small settings."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(args, cwd, timeout=240):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    out = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout + out.stderr


def test_tiny_gpt(tmp_path):
    out = run(
        [
            str(ROOT / "examples/tiny_gpt.py"),
            "--max-steps",
            "12",
            "--val-every",
            "6",
            "--val-batches",
            "2",
            "--qat-start-step",
            "6",
            "--max-bytes",
            "200000",
            "--energy-budget-kj",
            "1000",
            "--log-dir",
            str(tmp_path),
        ],
        cwd=tmp_path,
    )
    assert "=== tiny_gpt: energy headline ===" in out
    assert "EPI float -> int8" in out and "per token" in out and "tensorboard --logdir" in out
    assert "to val_loss <= 2.5:" in out
    # the fit's figures survive the test stage that follows it: none of them is missing from the headline
    for figure in ("training energy:", "EER:", "tokens per joule:", "carbon:"):
        (line,) = [ln for ln in out.splitlines() if ln.strip().startswith(figure)]
        assert "n/a" not in line, line
    assert any(
        r["metric"] == "val_loss"
        for r in json.loads(next(tmp_path.rglob("energy_summary_fit.json")).read_text())["sections"]["targets"]["rows"]
    )
    summary = json.loads(next(tmp_path.rglob("energy_summary_fit.json")).read_text())
    assert summary["sources"] and all(s in {"counter", "polled", "rapl", "estimate"} for s in summary["sources"])
    sections = summary["sections"]
    assert {"efficiency", "phases", "qat", "energy_budget"} <= set(sections)
    assert sections["qat"]["kind"] == "qat" and sections["qat"]["scheme"]
    budget = {r["figure"]: r["value"] for r in sections["energy_budget"]["rows"]}
    assert budget["budget_j"] == 1e6 and budget["stopped_by"] == "not stopped" and 0 < budget["spent_j"] < 1e6
    if "estimate" in summary["sources"]:
        assert "not a measurement" in out


def test_tiny_gpt_cli_yaml(tmp_path):
    out = run(
        [
            str(ROOT / "examples/tiny_gpt_cli.py"),
            "fit",
            "--config",
            str(ROOT / "examples/tiny_gpt.yaml"),
            "--trainer.max_steps",
            "6",
            "--trainer.val_check_interval",
            "3",
            "--trainer.limit_val_batches",
            "2",
            "--data.max_bytes",
            "200000",
            "--trainer.logger.init_args.save_dir",
            str(tmp_path),
            "--model.warmup_steps",
            "2",
        ],
        cwd=tmp_path,
    )
    assert "lightning_green energy summary (fit, finished)" in out
    assert list(tmp_path.rglob("energy_summary_fit.json"))


def test_distributed_update(tmp_path):
    out = run([str(ROOT / "examples/distributed_update.py"), "--epochs", "1"], cwd=tmp_path)
    assert "[rank 0]" in out and "[rank 1]" in out
    assert "max |difference| = 0 -> identical" in out
    assert "parameters identical on all ranks: True" in out


def test_quantize(tmp_path):
    import re

    out = run([str(ROOT / "examples/quantize.py"), "--steps", "120"], cwd=tmp_path)
    ratio = float(re.search(r"size ratio: ([0-9.]+)", out).group(1))
    agreement = float(re.search(r"same prediction on ([0-9.]+)%", out).group(1))
    assert ratio < 0.35  # int8 weights: about 0.27 of the float state_dict
    assert agreement > 90.0
    assert "EPI J/sample" in out


def test_prune(tmp_path):
    import re

    out = run([str(ROOT / "examples/prune.py"), "--steps", "40", "--max-bytes", "100000"], cwd=tmp_path)
    ratio = float(re.search(r"parameters: [0-9,]+ -> [0-9,]+ \(x([0-9.]+)\)", out).group(1))
    assert 0.6 < ratio < 0.8
    assert "n_query_groups=3 intermediate_size=360" in out
    in_memory = re.search(r"val_loss \(in memory\): ([0-9.]+)", out).group(1)
    assert f"val_loss (fresh model + pruned_final.ckpt): {in_memory}" in out
