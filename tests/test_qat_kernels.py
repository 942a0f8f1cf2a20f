"""Plain calls: int8 numerics against the deployed kernel, the kernel micro-benchmark with an injected
timer, and the report that drives both the logged metrics and the summary rows."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_green.quantization import QatReport, int8, kernels

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
    assert set(rows) == {"size ratio", "val loss, float", "val loss, converted", "time per sample, float", "time per sample, converted",
                         "time ratio", "EPI, float", "EPI, converted", "EPI ratio"}  # fmt: skip
    assert rows["EPI, converted"]["source"] == "estimate" and rows["EPI, converted"]["value"] == 0.1
    assert len(rows) == len(metrics)  # one table: every logged figure has its row
    assert "energy_j" not in report and report.get("energy_j", "none") == "none"
    with pytest.raises(KeyError):
        report.update(nonsense=1)
