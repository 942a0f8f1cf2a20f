"""Plain calls: int8 numerics against the deployed kernel, the kernel micro-benchmark with an injected
timer, and the report that drives both the logged metrics and the summary rows."""

from __future__ import annotations

import copy
import logging
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from lightning_green.quantization import QatReport, _torchao, int8, kernels, layers

CPU = torch.device("cpu")


def test_fake_quantized_linear_computes_what_the_int8_kernel_computes():
    torch.manual_seed(0)
    linear = nn.Linear(128, 96)
    fake = int8.FakeQuantInt8Linear.from_linear(linear)
    converted = int8.Int8DynamicLinear.from_float(linear.weight, linear.bias)
    x = torch.randn(3, 5, 128) * 3
    with torch.no_grad():
        qat_out, int8_out, float_out = fake(x), converted(x), linear(x)
    assert (qat_out - int8_out).abs().max() < 1e-4  # same rounding: what QAT trains for is what runs
    assert (float_out - int8_out).abs().max() > 1e-3  # and it is not the float result
    fake.fake_quant_enabled = False
    assert torch.equal(fake(x), linear(x))


def test_fake_quant_gradient_is_straight_through():
    linear = nn.Linear(16, 8)
    fake = int8.FakeQuantInt8Linear.from_linear(linear)
    x = torch.randn(4, 16, requires_grad=True)
    fake(x).sum().backward()
    assert torch.allclose(linear.weight.grad, torch.ones(4, 8).T @ int8.fake_quantize_activation(x.detach()), atol=1e-5)


def test_converted_linear_survives_deepcopy_and_reload():
    linear = nn.Linear(32, 16)
    converted = int8.Int8DynamicLinear.from_float(linear.weight, linear.bias)
    x = torch.randn(2, 32)
    expected = converted(x)
    assert torch.equal(copy.deepcopy(converted)(x), expected)
    other = int8.Int8DynamicLinear(32, 16)
    other.load_state_dict(converted.state_dict())
    assert torch.equal(other(x), expected)  # the packed weight follows the loaded values
    assert converted.state_dict()["weight"].dtype == torch.int8


def test_converted_linear_follows_edits_of_its_buffers():
    torch.manual_seed(0)
    linear = nn.Linear(32, 16)
    converted = int8.Int8DynamicLinear.from_float(linear.weight, linear.bias)
    bias = converted.bias.clone()
    x = torch.randn(2, 32)
    product = converted(x) - bias  # the int8 product, rescaled
    converted.bias = converted.bias + 1.0  # a new tensor: the packed weight holds the old one
    assert torch.allclose(converted(x), product + bias + 1.0, atol=1e-5)
    with torch.no_grad():
        converted.weight_scale.mul_(2.0)
    assert torch.allclose(converted(x), 2 * product + bias + 1.0, atol=1e-5)
    converted.weight = -converted.weight  # a new tensor, not written to since
    assert torch.allclose(converted(x), -2 * product + bias + 1.0, atol=1e-5)
    with torch.no_grad():
        converted.weight.neg_()
    assert torch.allclose(converted(x), 2 * product + bias + 1.0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_converted_linear_returns_the_input_dtype(dtype):
    torch.manual_seed(0)
    converted = int8.Int8DynamicLinear.from_float(nn.Linear(32, 16).weight, None)
    x = torch.randn(3, 32)
    out = converted(x.to(dtype))
    assert out.dtype == dtype and converted(x).dtype == torch.float32
    assert torch.equal(out, converted(x.to(dtype).float()).to(dtype))  # the kernel runs in float32


def test_int8_embedding_matches_its_fake_quantization():
    emb = nn.Embedding(50, 16)
    idx = torch.randint(0, 50, (3, 7))
    fake = int8.FakeQuantInt8Embedding.from_embedding(emb)
    assert torch.allclose(fake(idx), int8.Int8Embedding.from_float(emb.weight)(idx), atol=1e-6)


def table_timer(times):
    calls = []

    def timer(label, fn):
        calls.append(label)
        return times[label]

    return timer, calls


def test_time_schemes_divides_injected_times():
    timer, calls = table_timer({"float": 2.0, "int8_dynamic": 0.5})
    (timing,) = kernels.time_schemes(["int8_dynamic"], [(64, 32), (32, 64)], CPU, timer=timer)
    assert timing.decode_ratio == 0.25 and timing.prefill_ratio == 0.25 and timing.ratio == 0.25
    assert calls.count("float") == 12 and calls.count("int8_dynamic") == 12  # 2 shapes x 2 regimes x 3 rounds in turn
    assert calls[:6] == ["float", "int8_dynamic"] * 3


def test_time_schemes_keeps_each_sides_fastest_round_so_a_burst_of_load_does_not_decide():
    rounds = iter([40.0, 1.0, 2.0, 2.0, 40.0, 2.0])  # float at 1 token, then at 64; one round of each hit by load

    def timer(label, fn):
        return next(rounds) if label == "float" else 0.5

    (timing,) = kernels.time_schemes(["int8_dynamic"], [(64, 32)], CPU, timer=timer, rounds=3)
    assert timing.decode_ratio == 0.5 and timing.prefill_ratio == 0.25  # 0.5 / min(40, 1, 2) and 0.5 / min(2, 40, 2)


def test_auto_picks_the_fastest_candidate_and_warns_only_when_slow():
    model = nn.Sequential(nn.Linear(64, 64))
    fast, _ = table_timer({"float": 1.0, "int8_dynamic": 0.3})
    assert kernels.resolve_scheme("auto", model, CPU, 32, False, fast)[0] == "int8_dynamic"
    assert kernels.resolve_scheme("auto", model, CPU, 32, False, fast)[2] is None
    slow, _ = table_timer({"float": 1.0, "int8_dynamic": 1.5})
    scheme, timing, warning = kernels.resolve_scheme("auto", model, CPU, 32, False, slow)
    assert scheme == "int8_dynamic" and timing.decode_ratio == 1.5 and "will be slower" in warning


def test_explicit_scheme_without_fast_kernel_warns():
    model = nn.Sequential(nn.Linear(64, 64))
    slow, _ = table_timer({"float": 1.0, "int8_dynamic_int4_weight": 3.0})
    scheme, _, warning = kernels.resolve_scheme("int8_dynamic_int4_weight", model, CPU, 32, False, slow)
    assert scheme == "int8_dynamic_int4_weight"
    assert "3.00x float time at 1 token" in warning and "try scheme='auto'" in warning
    with pytest.raises(ValueError, match=r"float8_dynamic.*schemes that can: \['int8_dynamic'"):
        kernels.resolve_scheme("float8_dynamic", model, CPU, 32, False, slow)


def test_report_drives_metrics_and_summary_rows():
    report = QatReport(scheme="int8_dynamic", size_ratio=0.27)
    report.set_evaluation("float", {"samples": 8, "loss": 2.0, "time_s": 0.02, "epi_j": 0.4, "source": "estimate"})
    report.set_evaluation("converted", {"samples": 8, "loss": 2.1, "time_s": 0.01, "epi_j": 0.1, "source": "estimate"})
    assert report["epi_ratio"] == 0.25 and report["time_ratio"] == 0.5
    metrics = report.metrics("qat")
    assert metrics["qat/epi_ratio"] == 0.25 and metrics["qat/size_ratio"] == 0.27 and "qat/energy_j" not in metrics
    rows = {r["figure"]: r for r in report.summary_rows()}
    assert set(rows) == {
        "size ratio",
        "val loss, float",
        "val loss, converted",
        "time per sample, float",
        "time per sample, converted",
        "time ratio",
        "EPI, float",
        "EPI, converted",
        "EPI ratio",
    }
    assert rows["EPI, converted"]["source"] == "estimate" and rows["EPI, converted"]["value"] == 0.1
    assert len(rows) == len(metrics)  # one table: every logged figure has its row
    assert "energy_j" not in report and report.get("energy_j", "none") == "none"
    with pytest.raises(KeyError):
        report.update(nonsense=1)


# ---------------------------------------------------------------- timing a busy machine cannot mislead

CALL_S = 2.0**-10  # one timed call; powers of two keep every sum of clock readings exact
STALL_S = 2.0**-4  # wall time another process takes from a preempted call


class BusyMachine:
    """Scripted wall and CPU clocks: each call costs ``CALL_S`` of both; the calls numbered in
    ``preempted`` (0 is the warm-up call) also lose ``STALL_S`` of wall time to another process."""

    def __init__(self, preempted):
        self.wall_s = 0.0
        self.cpu_s = 0.0
        self.calls = 0
        self.preempted = preempted

    def fn(self):
        self.wall_s += CALL_S
        self.cpu_s += CALL_S
        if self.calls in self.preempted:
            self.wall_s += STALL_S
        self.calls += 1

    def timer(self, **kwargs):
        clocks = {"wall_clock": lambda: self.wall_s, "cpu_clock": lambda: self.cpu_s}
        return kernels.KernelTimer(CPU, min_block_s=CALL_S, **clocks, **kwargs)


def test_kernel_timer_rejects_preempted_blocks_and_times_them_again():
    machine = BusyMachine(preempted={2, 3, 5})  # blocks 0, 1 and 3 (one call each after warm-up and calibration)
    timer = machine.timer(repeats=5, max_blocks=25)
    assert timer("float", machine.fn) == CALL_S
    assert timer.rejected_blocks == 3 and timer.unclean_timings == 0
    assert machine.calls == 2 + 8  # 8 blocks: 3 preempted, then the fifth clean one ends it


def test_kernel_timer_under_constant_load_counts_cpu_time_within_its_bound():
    machine = BusyMachine(preempted=set(range(2, 1000)))  # every block preempted: wall time is 65x the work
    timer = machine.timer(repeats=5, max_blocks=12)
    assert timer("int8_dynamic", machine.fn) == CALL_S  # what the work cost this thread, not the neighbour's share
    assert timer.rejected_blocks == 12 and timer.unclean_timings == 1
    assert machine.calls == 2 + 12


def test_kernel_timer_bad_input():
    with pytest.raises(ValueError, match="`max_blocks` must be an integer >= 5, got 2"):
        kernels.KernelTimer(CPU, repeats=5, max_blocks=2)
    with pytest.raises(TypeError, match="`cpu_clock` must be a callable"):
        kernels.KernelTimer(CPU, cpu_clock=0.0)


def test_time_schemes_times_cpu_kernels_on_one_thread_and_restores_the_count():
    threads_seen = []

    def timer(label, fn):
        threads_seen.append(torch.get_num_threads())
        return 1.0

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        kernels.time_schemes(["int8_dynamic"], [(64, 32)], CPU, timer=timer, rounds=1)
        assert threads_seen == [1, 1, 1, 1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_slow_kernel_warning_names_both_regimes_and_the_one_that_wins():
    mixed = kernels.KernelTiming("int8_dynamic", decode_ratio=1.59, prefill_ratio=0.62, prefill_tokens=64)
    warning = kernels.slow_kernel_warning(mixed, CPU, explicit=False)
    assert "1.59x float time at 1 token (decoding) and 0.62x at 64 tokens" in warning
    assert "the converted model wins on calls of many tokens (about 64 and more)" in warning
    assert "will be slower when decoding one token at a time" in warning and "both" not in warning
    decode_wins = kernels.KernelTiming("int8_weight_only", decode_ratio=0.5, prefill_ratio=1.25, prefill_tokens=128)
    warning = kernels.slow_kernel_warning(decode_wins, CPU, explicit=True)
    assert "0.50x float time at 1 token (decoding) and 1.25x at 128 tokens" in warning
    assert "wins when decoding one token at a time" in warning and warning.endswith("try scheme='auto'")
    both = kernels.KernelTiming("int8_dynamic", decode_ratio=1.5, prefill_ratio=1.1)
    assert "slower than float in both regimes" in kernels.slow_kernel_warning(both, CPU, explicit=False)
    assert kernels.slow_kernel_warning(kernels.KernelTiming("int8_dynamic", 0.9, 0.6), CPU, False) is None


def test_restored_report_keeps_this_runs_kernel_timings_and_setup_figures():
    measured = QatReport(scheme="int8_dynamic", group_size=32, kernel_decode_ratio=1.59, kernel_prefill_ratio=0.62)
    checkpoint = QatReport(
        scheme="int8_dynamic",
        group_size=32,
        layers_quantized=["a"],
        fake_quant_from_step=7,
        kernel_decode_ratio=1886.0,
        kernel_prefill_ratio=671.0,
    ).as_dict()
    restored = measured.restored(checkpoint)
    assert restored.kernel_decode_ratio == 1.59 and restored.kernel_prefill_ratio == 0.62
    assert restored.fake_quant_from_step == 7 and restored.layers_quantized == ["a"]
    unmeasured = QatReport().restored(checkpoint)
    assert "kernel_decode_ratio" not in unmeasured and unmeasured.scheme == "int8_dynamic"


def test_report_says_how_the_model_was_quantized():
    report = QatReport(scheme="int8_dynamic", method="ptq", size_ratio=0.27)
    rows = report.summary_rows()
    assert rows[0] == {
        "figure": "method",
        "value": "ptq (post-training quantization: no training step ran with fake quantization)",
        "unit": "",
        "source": "",
    }
    assert [r["figure"] for r in rows] == ["method", "size ratio"]
    assert report.metrics("qat") == {"qat/size_ratio": 0.27}  # the method is a word: a row, not a metric
    assert QatReport.from_dict(report.as_dict()).method == "ptq"


# ---------------------------------------------------------------- layer selection errors


def test_no_layer_to_quantize_says_the_widths_misfit_group_size():
    model = nn.Sequential(nn.Linear(48, 80), nn.ReLU(), nn.Linear(80, 48), nn.ReLU(), nn.Linear(48, 2))
    with pytest.raises(ValueError) as caught:
        layers.prepare_selected(model, "int8_dynamic_int4_weight", 32, None, False)
    message = str(caught.value)
    assert "the model has 3 nn.Linear layer(s); 3 must stay float" in message
    assert "3 of them because their widths [48, 80] are not a multiple of group_size=32" in message
    assert "set group_size=16 (it divides every width) or use a scheme without groups" in message
    assert "int8_dynamic, int8_weight_only, float8_dynamic" in message
    with pytest.raises(ValueError, match=r"widths \[100\] are not a multiple of group_size=32 .*: use a scheme"):
        layers.prepare_selected(nn.Linear(100, 4), "int8_dynamic_int4_weight", 32, None, False)


# ---------------------------------------------------------------- importing torchao


def test_torchao_import_prints_nothing_a_user_must_read():
    code = "from lightning_green.quantization import _torchao; _torchao.load_torchao(); import torchao; print('loaded')"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and done.stdout == "loaded\n", done.stderr
    assert "Failed to load" not in done.stderr and "Enum subclass" not in done.stderr, done.stderr


def record(message):
    return logging.LogRecord("torchao", logging.WARNING, __file__, 1, message, None, None)


def test_import_filter_drops_exactly_the_harmless_messages():
    so = "/venv/site-packages/torchao/_C_cutlass_90a.abi3.so"
    failed = record(f"Failed to load {so}: Could not load this library: {so}")
    enum = record("<enum 'KernelPreference'> is an Enum subclass and is now natively supported by torch.compile as ...")
    other = record("Skipping import of cpp extensions due to incompatible torch version.")
    without_cuda = _torchao.ImportNoiseFilter(cuda=False)
    assert [without_cuda.filter(r) for r in (failed, enum, other)] == [False, False, True]
    with_cuda = _torchao.ImportNoiseFilter(cuda=True)  # there a CUDA kernel that fails to load matters
    assert [with_cuda.filter(r) for r in (failed, enum, other)] == [True, False, True]
    assert len(without_cuda.dropped) == 2 and with_cuda.dropped == [enum.getMessage()]
