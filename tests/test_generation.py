"""Energy per generated token: the counting rule, prefill/decode phases, the cluster figures, the Trainer-free
loop and ``trainer.predict`` (simulated sensors, injected clocks: exact arithmetic, no wall time)."""

import json
import os
import subprocess
import sys
from unittest.mock import Mock

import pytest
import torch
from helpers import FakeClock, logged, tiny_trainer
from lightning.pytorch import LightningModule
from torch.utils.data import DataLoader

from lightning_green import EfficiencyLogger, PowerSampler, compare, find_power_sampler
from lightning_green.energy.generation import (
    GenerationPhases,
    GenerationTally,
    check_generated_tokens,
    cluster_generation,
    cluster_phases,
    count_generated,
)
from lightning_green.energy.session import EnergySession
from lightning_green.sensors import SimulatedSensor

SCRIPTS = os.path.join(os.path.dirname(__file__), "ddp_scripts")


def started_session(power_w=100.0):
    clock = FakeClock()
    session = EnergySession(interval_s=3600.0, clock=clock)  # the thread never reads: the test does
    session.start([SimulatedSensor(power_w, clock=clock)])
    return session, clock


# ------------------------------------------------------------------ the counting rule
def test_rule_counts_rows_times_the_width_past_the_prompt():
    prompt = torch.zeros(2, 3, dtype=torch.long)
    assert count_generated(torch.zeros(2, 8, dtype=torch.long), prompt) == 2 * 5
    assert count_generated(torch.zeros(2, 8, dtype=torch.int32), (prompt, torch.ones(2))) == 10  # first tensor
    batch = {"attention_mask": torch.ones(2, 3), "input_ids": torch.zeros(2, 4, dtype=torch.long)}
    assert count_generated(torch.zeros(2, 8, dtype=torch.long), batch) == 2 * 4  # input_ids, not the first entry
    assert count_generated(torch.zeros(7, dtype=torch.long), torch.zeros(3, dtype=torch.long)) == 4  # one row
    assert count_generated(torch.zeros(2, 3, dtype=torch.long), prompt) == 0  # nothing generated


@pytest.mark.parametrize(
    "output, batch, words",
    [
        ([1, 2, 3], torch.zeros(1, 2), "not a tensor"),
        (torch.zeros(2, 8), torch.zeros(2, 3), "integer dtype"),
        (torch.zeros(2, 8, dtype=torch.bool), torch.zeros(2, 3), "integer dtype"),
        (torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 3), "narrower"),
        (torch.zeros(2, 8, dtype=torch.long), {"text": "hello"}, "no prompt"),
    ],
)
def test_rule_says_why_it_cannot_read_an_output(output, batch, words):
    assert words in count_generated(output, batch)


def test_a_callable_is_checked_on_use_and_an_unreadable_output_counts_samples_once_warned():
    tally = GenerationTally(lambda output, batch: 3.0, samples_of=len)
    tally.add(None, None)
    assert tally.tokens == 3
    bad = GenerationTally(lambda output, batch: torch.tensor(3), samples_of=len)
    with pytest.raises(TypeError, match="`generated_tokens`"):
        bad.add(None, None)
    rule = GenerationTally("output", samples_of=len)
    with pytest.warns(UserWarning, match="cannot count generated tokens") as warned:
        rule.add(torch.zeros(4, 9), [0, 1, 2, 3])  # float logits: 4 samples
        rule.add(torch.zeros(2, 9), [0, 1])
    assert sum("cannot count generated tokens" in str(w.message) for w in warned) == 1
    rule.add(torch.zeros(1, 5, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long))  # read: 3 tokens
    assert (rule.tokens, rule.fallback_samples) == (4 + 2 + 3, 6)
    with pytest.raises(ValueError, match="`generated_tokens`"):
        check_generated_tokens("numel")
    with pytest.raises(ValueError, match="`generated_tokens`"):
        EfficiencyLogger(generated_tokens=3)


# ------------------------------------------------------------------ phases, Trainer-free
def test_phases_give_each_phase_its_energy_time_and_tokens_exactly():
    session, clock = started_session(100.0)
    phases = GenerationPhases(session)
    for _ in range(2):
        with phases.phase("prefill", tokens=64):
            clock.t += 0.5
        session.read_now()  # the sensors read past the block: it takes its energy now
        with phases.phase("decode") as block:
            clock.t += 2.0
            block.tokens = 32
        clock.t += 1.0  # between requests: in no phase
    metrics = phases.loop_ended()
    prefill, decode = phases.cluster["prefill"], phases.cluster["decode"]
    assert (prefill["tokens"], prefill["seconds"], prefill["energy_j"], prefill["blocks"]) == (128, 1.0, 100.0, 2)
    assert (decode["tokens"], decode["seconds"], decode["energy_j"]) == (64, 4.0, 400.0)
    assert metrics == {
        "generation/prefill_j_per_token": 100.0 / 128,
        "generation/prefill_s_per_token": 1.0 / 128,
        "generation/decode_j_per_token": 400.0 / 64,
        "generation/decode_s_per_token": 4.0 / 64,
    }
    assert decode["tokens_per_j"] == 64 / 400.0
    rows = phases.rows(session.sources())
    assert [(r["phase"], r["tokens_are"], r["source"]) for r in rows] == [
        ("prefill", "prompt tokens", "simulated"),
        ("decode", "generated tokens", "simulated"),
    ]
    session.finish()


def test_phases_refuse_bad_use():
    session, clock = started_session()
    phases = GenerationPhases(session)
    with pytest.raises(ValueError, match="`phase`"):
        with phases.phase("sample"):
            pass
    with pytest.raises(ValueError, match="`tokens`"):
        with phases.phase("decode", tokens=-1):
            pass
    with pytest.raises(RuntimeError, match="do not nest"):
        with phases.phase("prefill"):
            with phases.phase("decode"):
                pass
    session.finish()
    with pytest.raises(RuntimeError, match="running sampler"):
        with phases.phase("decode"):
            pass


def test_cluster_figures_are_sums_of_the_processes_and_time_is_the_longest():
    rows = [[0.0, 375.0, 250.0, 2.5, 8.0, 0.0], [0.0, 450.0, 450.0, 4.5, 12.0, 0.0]]
    figures = cluster_generation(rows)
    total = figures["total"]
    assert (total["energy_j"], total["generated_tokens"], total["seconds"]) == (825.0, 20, 4.5)
    assert total["j_per_token"] == 825.0 / 20 and total["s_per_token"] == 4.5 / 20
    assert total["tokens_per_j"] == 20 / 825.0
    assert [r["j_per_token"] for r in figures["per_rank"]] == [375.0 / 8, 450.0 / 12]
    assert figures["imbalance"] == {
        "device_energy_j": 450.0 / 350.0,
        "generated_tokens": 12 / 10,
        "seconds": 4.5 / 3.5,
    }
    phases = cluster_phases([[8, 0.5, 75.0, 2, 8, 2.0, 300.0, 2], [8, 0.5, 50.0, 2, 12, 4.0, 400.0, 2]])
    assert phases["decode"] == {
        "tokens": 20,
        "seconds": 4.0,
        "energy_j": 700.0,
        "blocks": 4,
        "processes": 2,
        "j_per_token": 700.0 / 20,
        "s_per_token": 4.0 / 20,
        "tokens_per_j": 20 / 700.0,
    }


def test_any_inference_loop_without_lightning():
    """The docs' example: a plain loop, an EnergySession, a tally of generated tokens and the phases."""
    session, clock = started_session(40.0)
    tally = GenerationTally("output", samples_of=len)
    phases = GenerationPhases(session)
    tally.start(session)
    for prompt in (torch.zeros(1, 5, dtype=torch.long), torch.zeros(3, 5, dtype=torch.long)):
        with phases.phase("prefill", tokens=prompt.numel()):
            clock.t += 0.25
        with phases.phase("decode") as block:
            out = torch.cat([prompt, torch.ones(prompt.shape[0], 10, dtype=torch.long)], dim=1)
            clock.t += 1.0
            block.tokens = out.shape[0] * 10
        tally.add(out, prompt)
    figures = cluster_generation([tally.local_row(session)])
    phases.loop_ended()
    session.finish()
    assert figures["total"]["generated_tokens"] == 40
    assert figures["total"]["energy_j"] == 40.0 * 2.5
    assert figures["total"]["j_per_token"] == 100.0 / 40
    assert phases.cluster["prefill"]["j_per_token"] == 20.0 / 20
    assert phases.cluster["decode"]["j_per_token"] == 80.0 / 40


# ------------------------------------------------------------------ trainer.predict
class Generator(LightningModule):
    """predict_step "generates" ``new`` tokens per row; the injected clock moves as prefill and decode run."""

    def __init__(self, clock, new=6, prefill_s=0.25, decode_s=1.0, logits=False):
        super().__init__()
        self.layer = torch.nn.Linear(2, 2)
        self.clock, self.new, self.prefill_s, self.decode_s, self.logits = clock, new, prefill_s, decode_s, logits

    def predict_step(self, batch, batch_idx):
        sampler = find_power_sampler(self.trainer)
        with sampler.generation_phase("prefill", tokens=batch.numel()):
            self.clock.t += self.prefill_s
        with sampler.generation_phase("decode") as block:
            self.clock.t += self.decode_s
            block.tokens = batch.shape[0] * self.new
        if self.logits:
            return torch.zeros(batch.shape[0], 3)
        return torch.cat([batch, torch.ones(batch.shape[0], self.new, dtype=batch.dtype)], dim=1)

    def predict_dataloader(self):
        return DataLoader(torch.zeros(8, 8, dtype=torch.long), batch_size=4)


def predict_run(tmp_path, generated_tokens="output", logits=False):
    clock = FakeClock()
    logger = Mock()
    logger.log_dir = logger.save_dir = None
    sampler = PowerSampler(
        sensors=[SimulatedSensor(100.0, name="sim", clock=clock)],
        interval_s=3600.0,
        clock=clock,
        summary_dir=str(tmp_path),
        print_summary=False,
        report_picture=False,
    )
    eff = EfficiencyLogger(generated_tokens=generated_tokens)
    trainer = tiny_trainer(logger=logger, callbacks=[sampler, eff])
    trainer.predict(Generator(clock, logits=logits))
    return logger, sampler, eff


def test_predict_writes_its_summary_with_energy_per_generated_token(tmp_path):
    logger, sampler, eff = predict_run(tmp_path)
    summary = json.loads((tmp_path / "energy_summary_predict.json").read_text())
    # 2 batches x (0.25 s prefill + 1.0 s decode) at 100 W; 2 x 4 rows x 6 new tokens; 2 x 32 prompt tokens
    assert summary["stage_energy_j"] == 250.0
    total = eff.generation["total"]
    assert (total["generated_tokens"], total["energy_j"], total["seconds"]) == (48, 250.0, 2.5)
    assert logged(logger, "efficiency/j_per_generated_token") == [(0, 250.0 / 48)]
    assert logged(logger, "efficiency/s_per_generated_token") == [(0, 2.5 / 48)]
    assert logged(logger, "efficiency/generated_tokens_per_j") == [(0, 48 / 250.0)]
    assert logged(logger, "generation/prefill_j_per_token") == [(0, 50.0 / 64)]
    assert logged(logger, "generation/decode_j_per_token") == [(0, 200.0 / 48)]
    sections = summary["sections"]
    assert sections["generation"]["rows"][0] == {
        "rank": "all",
        "generated_tokens": 48,
        "energy_j": 250.0,
        "seconds": 2.5,
        "j_per_token": 250.0 / 48,
        "s_per_token": 2.5 / 48,
        "tokens_per_j": 48 / 250.0,
        "fallback_samples": 0,
        "source": "simulated",
    }
    phases = {r["phase"]: r for r in sections["generation_phases"]["rows"]}
    assert phases["prefill"]["j_per_token"] == 50.0 / 64 and phases["decode"]["source"] == "simulated"
    efficiency = {r["figure"]: r for r in sections["efficiency"]["rows"]}
    assert efficiency["predict_j_per_generated_token"]["value"] == 250.0 / 48
    assert efficiency["predict_j_per_generated_token"]["source"] == "simulated"
    compared = {
        f.figure: (f.value, f.unit, f.source) for f in compare.figures(summary)
    }  # `python -m lightning_green compare`
    assert compared["energy per generated token"] == (250.0 / 48, "J/token", "simulated")
    assert compared["generated tokens per joule"] == (48 / 250.0, "tokens/J", "simulated")


def test_predict_output_the_rule_cannot_read_falls_back_to_samples(tmp_path):
    with pytest.warns(UserWarning, match="cannot count generated tokens"):
        _, _, eff = predict_run(tmp_path, logits=True)
    assert eff.generation["total"]["generated_tokens"] == 8  # 8 samples, counted instead
    assert eff.generation["total"]["fallback_samples"] == 8
    assert eff.results["predict_generated_tokens_fallback_samples"] == 8


def test_predict_callable_returning_a_wrong_type_raises_naming_it(tmp_path):
    with pytest.raises(TypeError, match="`generated_tokens`"):
        predict_run(tmp_path, generated_tokens=lambda output, batch: "many")


def test_predict_on_two_processes_sums_energy_and_tokens_into_the_cluster_figure(tmp_path):
    """ddp and ddp_green, 2 CPU processes: rank 0 reads a 50 W host sensor and a 100 W device, rank 1 its
    100 W device only (the host is counted once); each rank's clock moves by its own decode time."""
    script = os.path.join(SCRIPTS, "generation_predict.py")
    done = subprocess.run([sys.executable, script, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for strategy in ("ddp", "ddp_green"):
        ranks = [json.loads((tmp_path / f"{strategy}_rank{r}.json").read_text()) for r in (0, 1)]
        for rank in ranks:  # every process holds the same cluster figures
            figures = rank["generation"]
            per_rank, total = figures["per_rank"], figures["total"]
            assert total["energy_j"] == sum(r["energy_j"] for r in per_rank)
            assert total["generated_tokens"] == sum(r["generated_tokens"] for r in per_rank)
            assert total["j_per_token"] == sum(r["energy_j"] for r in per_rank) / sum(
                r["generated_tokens"] for r in per_rank
            )
            # rank 0: 2 x (0.25 + 1.0) s at 150 W, 2 x 4 tokens; rank 1: 2 x (0.25 + 2.0) s at 100 W, 2 x 6 tokens
            assert [(r["energy_j"], r["device_energy_j"], r["generated_tokens"]) for r in per_rank] == [
                (375.0, 250.0, 8),
                (450.0, 450.0, 12),
            ]
            assert (total["energy_j"], total["generated_tokens"], total["j_per_token"]) == (825.0, 20, 825.0 / 20)
            assert total["s_per_token"] == 4.5 / 20
            assert figures["imbalance"]["device_energy_j"] == 450.0 / 350.0
        summary = json.loads((tmp_path / strategy / "energy_summary_predict.json").read_text())
        rows = summary["sections"]["generation"]["rows"]
        assert [r["rank"] for r in rows] == ["all", 0, 1, "imbalance (max/mean)"]
        assert rows[0]["j_per_token"] == 825.0 / 20 and rows[3]["generated_tokens"] == 12 / 10
        decode = {r["phase"]: r for r in summary["sections"]["generation_phases"]["rows"]}["decode"]
        assert (decode["tokens"], decode["energy_j"], decode["processes"]) == (20, 150.0 * 2.0 + 100.0 * 4.0, 2)


def generate_measured(sampler, gpt, prompt, max_returned_tokens):
    """The docs' LitGPT example: ``generate_fn`` streams tokens, the first right after the prefill pass."""
    from litgpt.generate.base import generate_fn

    gpt.set_kv_cache(batch_size=1)
    stream = generate_fn(gpt, prompt, max_returned_tokens, include_prompt=False, include_eos=True)
    with sampler.generation_phase("prefill", tokens=prompt.numel()):
        first = next(stream)
    with sampler.generation_phase("decode") as block:
        rest = list(stream)
        block.tokens = len(rest)
    gpt.clear_kv_cache()
    return torch.cat([prompt, first, *rest])


class LitGPTGenerator(LightningModule):
    def __init__(self):
        super().__init__()
        from litgpt.model import GPT, Config

        torch.manual_seed(0)
        self.gpt = GPT(Config(block_size=16, vocab_size=64, padded_vocab_size=64, n_layer=1, n_head=2, n_embd=16))

    def predict_step(self, batch, batch_idx):
        return generate_measured(find_power_sampler(self.trainer), self.gpt, batch[0], max_returned_tokens=11)

    def predict_dataloader(self):
        return DataLoader(torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0)), batch_size=1)


def test_litgpt_generate_fn_in_predict(tmp_path):
    """LitGPT's own generation loop, unchanged, marked and counted (real time: the figures are checked
    against the time each one covers at the simulated sensor's constant 100 W)."""
    sampler = PowerSampler(sensors=[SimulatedSensor(100.0, name="sim")], summary_dir=str(tmp_path), print_summary=False)
    eff = EfficiencyLogger(generated_tokens="output")
    tiny_trainer(callbacks=[sampler, eff]).predict(LitGPTGenerator())
    total = eff.generation["total"]
    assert total["generated_tokens"] == 2 * (11 - 5)  # 1-D outputs: the prompt's 5, then 6 new tokens
    assert total["energy_j"] == pytest.approx(100.0 * total["seconds"], rel=1e-9)
    summary = json.loads((tmp_path / "energy_summary_predict.json").read_text())
    phases = {r["phase"]: r for r in summary["sections"]["generation_phases"]["rows"]}
    assert (phases["prefill"]["tokens"], phases["decode"]["tokens"]) == (2 * 5, 2 * 5)  # decode: the 5 after the first
    for row in phases.values():
        assert row["energy_j"] == pytest.approx(100.0 * row["seconds"], rel=1e-9) and row["source"] == "simulated"


def test_logged_keys_match_the_documented_rows(tmp_path):
    """The keys a predict run with generation logs are the rows of docs/metrics.md's generation table."""
    import re

    from test_readme import GENERATION, documented_keys

    documented = documented_keys(GENERATION)
    logger, _, _ = predict_run(tmp_path)
    logged_keys = {k for call in logger.log_metrics.call_args_list for k in call.args[0]}
    logged_keys = {re.sub(r"^generation/(prefill|decode)_", "generation/<phase>_", k) for k in logged_keys}
    assert logged_keys == documented
