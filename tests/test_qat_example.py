"""The YAML example configures QAT as the script example does, so both runs quantize alike."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def qat_init_args(config: dict) -> dict:
    (qat,) = [c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("QuantizationAwareTraining")]
    return qat["init_args"]


def test_yaml_example_uses_the_scripts_qat_scheme_and_start_step():
    spec = importlib.util.spec_from_file_location("tiny_gpt_example", ROOT / "examples/tiny_gpt.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    defaults = script.parse_args([])
    init_args = qat_init_args(yaml.safe_load((ROOT / "examples/tiny_gpt.yaml").read_text()))
    assert init_args["scheme"] == defaults.qat_scheme == "auto"
    assert init_args["start_step"] == defaults.qat_start_step
