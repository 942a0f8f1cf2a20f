"""``LIGHTNING_GREEN=1 litgpt pretrain``: LitGPT's real command line, unchanged, on a tiny model config, a
tokenizer built here and local text, on CPU and offline; FabricEnergy is added by the entry point alone."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("litgpt", reason="litgpt is in the [dev] extra; without it there is no `litgpt pretrain`")
pytest.importorskip("tomllib", reason="the run reads pyproject.toml with Python 3.11's tomllib")
tokenizers = pytest.importorskip("tokenizers", reason="the tokenizer is built with HF tokenizers (a LitGPT dependency)")

HERE = os.path.dirname(os.path.abspath(__file__))
TEXT = (
    "the green model learns to count joules while it trains on a tiny corpus of plain words "
    "energy is measured per step and summed over every process at log time only "
)
BLOCK, MICRO_BATCH, ITERS, EVERY = 16, 2, 6, 2


def build_tokenizer(folder) -> int:
    """A word-level tokenizer over TEXT (``tokenizer.json`` + ``tokenizer_config.json``); its vocabulary size."""
    words = sorted(set(TEXT.split()))
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *words])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "tokenizer_class": "PreTrainedTokenizerFast"})
    )
    return len(vocab)


def write_config(tmp_path, vocab_size: int):
    data = tmp_path / "text"
    data.mkdir()
    for i in range(3):  # the last one is the validation set
        (data / f"part{i}.txt").write_text(TEXT * 8)
    config = tmp_path / "pretrain.yaml"
    config.write_text(
        f"""
model_name: tiny-green
model_config:
  name: tiny-green
  block_size: {BLOCK}
  vocab_size: {vocab_size}
  padded_vocab_size: {vocab_size}
  n_layer: 1
  n_head: 2
  n_embd: 16
out_dir: {tmp_path / "out"}
precision: 32-true
devices: 1
tokenizer_dir: {tmp_path / "tokenizer"}
logger_name: csv
data:
  class_path: litgpt_pretrain.TinyTextFiles
  init_args:
    train_data_path: {data}
train:
  global_batch_size: {MICRO_BATCH}
  micro_batch_size: {MICRO_BATCH}
  max_tokens: {ITERS * MICRO_BATCH * BLOCK}
  log_interval: 1
  save_interval: 1000
  lr_warmup_steps: 1
  max_norm: 1.0
  min_lr: 0.0001
eval:
  interval: 1000
  max_iters: 1
  final_validation: false
"""
    )
    return config


def test_litgpt_pretrain_is_measured_with_no_code_change(tmp_path):
    config = write_config(tmp_path, build_tokenizer(tmp_path / "tokenizer"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIGHTNING_GREEN")}
    env.update(
        LIGHTNING_GREEN="1",
        LIGHTNING_GREEN_SENSORS="estimate",  # a figure on any machine, labelled as the estimate it is
        LIGHTNING_GREEN_LOG_EVERY_N_STEPS=str(EVERY),
        HF_HUB_OFFLINE="1",
        PYTHONPATH=os.pathsep.join([os.path.join(HERE, "ddp_scripts"), env.get("PYTHONPATH", "")]),
        CUDA_VISIBLE_DEVICES="",
    )
    script = os.path.join(HERE, "ddp_scripts", "litgpt_pretrain.py")
    out = subprocess.run(
        [sys.executable, script, "pretrain", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    log_dir = tmp_path / "out" / "logs" / "csv" / "version_0"
    summary = json.loads((log_dir / "energy_summary_fit.json").read_text())  # beside LitGPT's own logs
    assert summary["status"] == "finished at exit (finish() not called)"
    assert summary["sources"] == ["estimate"] and summary["stage_energy_j"] > 0
    with open(log_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    energy = [(int(r["step"]), float(r["energy/total_j"])) for r in rows if r.get("energy/total_j")]
    assert [s for s, _ in energy] == list(range(EVERY, ITERS + 1, EVERY))  # one per optimizer step window
    assert all(b > a > 0 for (_, a), (_, b) in zip(energy, energy[1:], strict=False))
    assert any(r.get("loss") for r in rows)  # LitGPT's own metrics are still there
    assert "lightning_green energy summary (fit" in out.stdout
