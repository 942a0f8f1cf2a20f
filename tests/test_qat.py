"""QuantizationAwareTraining: prepare, delayed fake quantization, convert, checkpoints, DDP, energy."""

from __future__ import annotations

import csv
import json
import math
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path
from unittest.mock import Mock

import pytest
import torch
from helpers import FakeClock
from helpers import logged as logged_any
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.demos.boring_classes import BoringModel, RandomDataset
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader

from lightning_green import EfficiencyLogger, PowerSampler
from lightning_green.quantization import QuantizationAwareTraining, _torchao, int8, layers
from lightning_green.quantization.qat import state_dict_size_bytes
from lightning_green.sensors import SimulatedSensor

KEYS = (
    "qat/size_bytes_before",
    "qat/size_bytes_after",
    "qat/size_ratio",
    "qat/val_loss_float",
    "qat/val_loss_converted",
)


class QatModel(BoringModel):
    """BoringModel with three 64-wide Linear layers (and optionally a misfit or an embedding)."""

    def __init__(self, width: int = 64, misfit: bool = False, embedding: bool = False):
        super().__init__()
        torch.manual_seed(0)
        layers = [nn.Linear(32, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU()]
        if misfit:
            layers += [nn.Linear(width, 48), nn.ReLU(), nn.Linear(48, 2)]  # 48 % 32 != 0: stays float
        else:
            layers += [nn.Linear(width, 2)]
        self.layer = nn.Sequential(*layers)
        self.emb = nn.Embedding(256, 32) if embedding else None

    def forward(self, x):
        if self.emb is not None:
            x = x + self.emb(torch.arange(x.shape[0], device=x.device) % 256)
        return self.layer(x)

    def validation_step(self, batch, batch_idx):
        loss = self.loss(self(batch))
        self.log("val_loss", loss)

    def test_step(self, batch, batch_idx):
        loss = self.loss(self(batch))
        self.log("test_loss", loss)

    def val_dataloader(self):
        return DataLoader(fixed_data(1), batch_size=4)

    def test_dataloader(self):
        return DataLoader(fixed_data(2), batch_size=4)


def fixed_data(seed: int) -> RandomDataset:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return RandomDataset(32, 16)


def make_trainer(callbacks, **kwargs):
    defaults = dict(
        max_steps=4,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        logger=False,
        num_sanity_val_steps=0,
        limit_val_batches=2,
        val_check_interval=None,
        check_val_every_n_epoch=None,
        callbacks=callbacks,
    )
    defaults.update(kwargs)
    if defaults["check_val_every_n_epoch"] is None:
        defaults.pop("check_val_every_n_epoch")
        defaults.pop("val_check_interval")
    return Trainer(**defaults)


def fake_quantized(model):
    types = int8.FAKE_QUANTIZED + (_torchao.fake_quantized_types() if "torchao" in sys.modules else ())
    return [name for name, m in model.named_modules() if isinstance(m, types)]


def quantized_params(model):
    """Names of the converted weights, either backend."""
    ours = [f"{name}.weight" for name, m in model.named_modules() if isinstance(m, int8.CONVERTED)]
    ao = [name for name, p in model.named_parameters() if "torchao" in sys.modules and _torchao.is_quantized_tensor(p)]
    return ours + ao


def fast_int8(label, fn):
    """An injected kernel timer: the int8 kernel takes half the float time."""
    return 1.0 if label == "float" else 0.5


def logged(logger, key):
    return [(c.kwargs["step"], c.args[0][key]) for c in logger.log_metrics.call_args_list if key in c.args[0]]


def val_loss_of(model):
    """Sample-weighted mean loss of ``model`` over the first 2 validation batches."""
    total, n = 0.0, 0
    with torch.inference_mode():
        for i, batch in enumerate(model.val_dataloader()):
            if i == 2:
                break
            total += float(model.loss(model(batch))) * batch.shape[0]
            n += batch.shape[0]
    return total / n


# ---------------------------------------------------------------- prepare and start_step


def test_prepare_swaps_linear_and_keeps_parameter_names():
    model = QatModel()
    names_before = list(model.state_dict())
    qat = QuantizationAwareTraining(convert_on_fit_end=False)
    trainer = make_trainer([qat], max_steps=1)
    trainer.fit(model)
    assert fake_quantized(model) == ["layer.0", "layer.2", "layer.4"]
    assert list(model.state_dict()) == names_before
    assert qat.report["layers_quantized"] == ["layer.0", "layer.2", "layer.4"]
    assert quantized_params(model) == []  # not converted


def test_prepare_outside_a_trainer():
    model = QatModel()
    qat = QuantizationAwareTraining(start_step=10)
    assert qat.prepare(model) is model
    assert fake_quantized(model) == ["layer.0", "layer.2", "layer.4"]
    assert layers.fake_quant_enabled(model) == [True] * 3
    layer = model.layer[0]
    qat.prepare(model)  # idempotent
    assert model.layer[0] is layer


def test_filter_fn_restricts_layers():
    model = QatModel()
    qat = QuantizationAwareTraining(convert_on_fit_end=False, filter_fn=lambda m, fqn: fqn != "layer.2")
    make_trainer([qat], max_steps=1).fit(model)
    assert fake_quantized(model) == ["layer.0", "layer.4"]


class FlagRecorder(Callback):
    """After the QAT callback's hook: the fake-quant flags and whether the output is plain float."""

    def __init__(self):
        self.flags: dict[int, list[bool]] = {}
        self.float_output: dict[int, bool] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = trainer.global_step
        self.flags[step] = layers.fake_quant_enabled(pl_module)
        x = torch.randn(8, 32)
        with torch.no_grad():
            out = pl_module(x)
            ref = x
            for m in pl_module.layer:
                ref = nn.functional.linear(ref, m.weight, m.bias) if isinstance(m, nn.Linear) else m(ref)
        self.float_output[step] = torch.equal(out, ref)


def test_start_step_delays_fake_quantization():
    model = QatModel()
    qat = QuantizationAwareTraining(start_step=3, convert_on_fit_end=False)
    rec = FlagRecorder()
    make_trainer([qat, rec], max_steps=5).fit(model)
    assert set(rec.flags) == {0, 1, 2, 3, 4}
    for step in (0, 1, 2):
        assert not any(rec.flags[step]) and rec.float_output[step], step
    for step in (3, 4):
        assert len(rec.flags[step]) == 3 and all(rec.flags[step]), step  # one flag per layer
        assert not rec.float_output[step], step
    assert qat.report["fake_quant_from_step"] == 3


# ---------------------------------------------------------------- convert and report


def test_convert_at_fit_end_shrinks_model_and_logs_figures():
    model = QatModel(width=256)
    float_bytes = state_dict_size_bytes(model)
    logger = Mock()
    qat = QuantizationAwareTraining()
    make_trainer([qat], logger=logger, max_steps=3).fit(model)

    assert fake_quantized(model) == []
    assert quantized_params(model) == ["layer.0.weight", "layer.2.weight", "layer.4.weight"]
    report = qat.report
    assert report["size_bytes_before"] == pytest.approx(float_bytes, rel=0.01)  # same tensors, zip metadata aside
    assert report["size_bytes_after"] == state_dict_size_bytes(model)
    assert report["size_ratio"] == report["size_bytes_after"] / report["size_bytes_before"]
    assert report["size_ratio"] < 0.5
    assert report["converted_at_step"] == 3
    # the converted figure is the loss of the converted model on the same batches
    assert report["val_loss_converted"] == pytest.approx(val_loss_of(model), rel=1e-5)
    assert math.isfinite(report["val_loss_float"]) and report["val_loss_float"] != report["val_loss_converted"]
    for key in KEYS:
        ((step, value),) = logged(logger, key)
        assert step == 3
        assert value == pytest.approx(report[key.split("/", 1)[1]])
    assert not logged(logger, "qat/epi_float_j")  # no PowerSampler: no energy figures


def test_loss_fn_is_used_for_validation_loss():
    model = QatModel()
    qat = QuantizationAwareTraining(loss_fn=lambda m, batch: torch.tensor(2.5))
    make_trainer([qat], max_steps=1).fit(model)
    assert qat.report["val_loss_float"] == 2.5 and qat.report["val_loss_converted"] == 2.5


def test_no_validation_loop_skips_loss_figures():
    qat = QuantizationAwareTraining()
    make_trainer([qat], max_steps=1, limit_val_batches=0).fit(QatModel())
    assert "val_loss_float" not in qat.report and qat.report["size_ratio"] < 1


@pytest.mark.parametrize("scheme", ["int8_dynamic_int4_weight", "int4_weight_only", "int8_weight_only"])
def test_other_cpu_schemes_convert(scheme):
    model = QatModel(width=128)
    qat = QuantizationAwareTraining(scheme=scheme)
    make_trainer([qat], max_steps=2, limit_val_batches=0).fit(model)
    assert len(quantized_params(model)) == 3
    assert qat.report["size_ratio"] < 0.5
    assert model(torch.randn(2, 32)).shape == (2, 2)


def test_quantize_embeddings():
    model = QatModel(embedding=True)
    qat = QuantizationAwareTraining(quantize_embeddings=True, convert_on_fit_end=False)
    make_trainer([qat], max_steps=1, limit_val_batches=0).fit(model)
    assert "emb" in fake_quantized(model)
    qat.convert()
    assert "emb.weight" in quantized_params(model)
    assert model(torch.randn(3, 32)).shape == (3, 2)


def test_convert_and_export_after_fit(tmp_path):
    model = QatModel()
    qat = QuantizationAwareTraining(convert_on_fit_end=False)
    make_trainer([qat], max_steps=2).fit(model)
    assert quantized_params(model) == []
    path = qat.export(tmp_path / "model_q.pt")
    assert len(quantized_params(model)) == 3 and qat.report["size_ratio"] < 1
    fresh = QatModel()
    QuantizationAwareTraining().convert(fresh)
    fresh.load_state_dict(torch.load(path, weights_only=False))
    x = torch.randn(4, 32)
    assert torch.equal(fresh(x), model(x))


class ConvertMidTraining(Callback):
    def __init__(self, qat):
        self.qat, self.error = qat, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        try:
            self.qat.convert(pl_module)
        except RuntimeError as err:
            self.error = err


def test_convert_refused_mid_training():
    model = QatModel()
    qat = QuantizationAwareTraining(convert_on_fit_end=False)
    probe = ConvertMidTraining(qat)
    make_trainer([qat, probe], max_steps=1, limit_val_batches=0).fit(model)
    assert "during training" in str(probe.error)
    assert quantized_params(model) == []


# ---------------------------------------------------------------- fit twice, resume, test after conversion


def test_fit_twice_without_conversion_continues_qat():
    model = QatModel()
    qat = QuantizationAwareTraining(convert_on_fit_end=False)
    trainer = make_trainer([qat], max_steps=2, limit_val_batches=0)
    trainer.fit(model)
    layer = model.layer[0]
    trainer.fit_loop.epoch_loop.max_steps = 4
    trainer.fit(model)
    assert trainer.global_step == 4
    assert model.layer[0] is layer  # not prepared twice
    assert fake_quantized(model) == ["layer.0", "layer.2", "layer.4"]


def test_fit_twice_after_conversion_trains_from_dequantized_weights():
    model = QatModel()
    qat = QuantizationAwareTraining()
    trainer = make_trainer([qat], max_steps=2, limit_val_batches=0)
    trainer.fit(model)
    dequantized = model.layer[0].weight.dequantize().clone()
    trainer.fit_loop.epoch_loop.max_steps = 4
    with pytest.warns(UserWarning, match="already converted"):
        trainer.fit(model)
    assert trainer.global_step == 4 and qat.report["converted_at_step"] == 4
    assert len(quantized_params(model)) == 3
    assert not torch.allclose(model.layer[0].weight.dequantize(), dequantized)  # it trained


class WeightsAtStart(Callback):
    def on_train_start(self, trainer, pl_module):
        self.weights = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        self.step = trainer.global_step


def slow_int8(label, fn):
    """An injected kernel timer for a machine busy with another process: int8 looks 30x float."""
    return 1.0 if label == "float" else 30.0


def test_resume_from_mid_qat_checkpoint(tmp_path):
    model = QatModel()
    qat = QuantizationAwareTraining(start_step=2, convert_on_fit_end=False, kernel_timer=slow_int8)
    trainer = make_trainer([qat], max_steps=3, limit_val_batches=0)
    trainer.fit(model)
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    saved = torch.load(tmp_path / "mid.ckpt", weights_only=False)
    assert saved["callbacks"]["QuantizationAwareTraining"]["scheme"] == "int8_dynamic"
    assert saved["callbacks"]["QuantizationAwareTraining"]["report"]["kernel_decode_ratio"] == 30.0

    resumed = QatModel()
    qat2 = QuantizationAwareTraining(start_step=2, kernel_timer=fast_int8)
    probe = WeightsAtStart()
    flags = FlagRecorder()
    trainer2 = make_trainer([qat2, probe, flags], max_steps=6, limit_val_batches=0)
    trainer2.fit(resumed, ckpt_path=tmp_path / "mid.ckpt")
    assert probe.step == 3
    for key, value in saved["state_dict"].items():
        assert torch.equal(probe.weights[key], value), key
    assert set(flags.flags) == {3, 4, 5} and all(all(f) for f in flags.flags.values())
    assert trainer2.global_step == 6 and qat2.report["converted_at_step"] == 6
    assert len(quantized_params(resumed)) == 3
    # the resumed fit timed the kernels itself; the checkpoint's timings of a busy machine are not restored
    assert qat2.report["kernel_decode_ratio"] == 0.5 and qat2.report["kernel_prefill_ratio"] == 0.5
    assert qat2.report["fake_quant_from_step"] == 2 and qat2.report["method"] == "qat"


def test_test_with_checkpoint_of_converted_model(tmp_path):
    model = QatModel()
    qat = QuantizationAwareTraining()
    trainer = make_trainer([qat], max_steps=3)
    trainer.fit(model)
    trainer.save_checkpoint(tmp_path / "converted.ckpt")
    expected = trainer.test(model, verbose=False)[0]["test_loss"]

    fresh = QatModel()
    tester = make_trainer([QuantizationAwareTraining()])
    result = tester.test(fresh, ckpt_path=tmp_path / "converted.ckpt", verbose=False)[0]["test_loss"]
    assert len(quantized_params(fresh)) == 3
    assert result == pytest.approx(expected, rel=1e-6)
    x = torch.randn(4, 32)
    assert torch.equal(fresh(x), model(x))

    # fitting from it goes on from the dequantized weights
    again = QatModel()
    with pytest.warns(UserWarning, match="dequantized"):
        make_trainer([QuantizationAwareTraining()], max_steps=4, limit_val_batches=0).fit(
            again, ckpt_path=tmp_path / "converted.ckpt"
        )
    assert len(quantized_params(again)) == 3


# ---------------------------------------------------------------- warnings and bad input


def test_misfit_layers_are_left_in_float_with_one_warning():
    model = QatModel(misfit=True)
    qat = QuantizationAwareTraining(scheme="int8_dynamic_int4_weight", convert_on_fit_end=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer([qat], max_steps=1, limit_val_batches=0).fit(model)
    ours = [str(w.message) for w in caught if "left in float" in str(w.message)]
    assert len(ours) == 1
    assert "layer.6 (in_features=48 not a multiple of group_size=32)" in ours[0] and "layer.4" not in ours[0]
    assert fake_quantized(model) == ["layer.0", "layer.2", "layer.4"]
    assert type(model.layer[6]) is nn.Linear
    assert qat.report["layers_left_float"] == ["layer.6 (in_features=48 not a multiple of group_size=32)"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"scheme": "int3"},
            r"`scheme` must be one of \['auto', 'float8_dynamic', 'int4_weight_only', 'int8_dynamic',",
        ),
        ({"eval_as": "int8"}, r"`eval_as` must be one of \['converted', 'float'\]"),
        ({"group_size": 0}, "`group_size` must be a positive power of two"),
        ({"group_size": 24}, "`group_size` must be a positive power of two"),
        ({"group_size": -32}, "`group_size` must be a positive power of two"),
        ({"group_size": 32.0}, "`group_size` must be a positive power of two"),
        ({"start_step": -1}, "`start_step` must be an integer >= 0"),
        ({"filter_fn": "layer.0"}, "`filter_fn` must be None or a callable"),
        ({"scheme": "float8_dynamic", "quantize_embeddings": True}, "`quantize_embeddings=True` needs a scheme"),
    ],
)
def test_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantizationAwareTraining(**kwargs)


def test_scheme_that_cannot_run_on_cpu_is_refused_in_setup():
    qat = QuantizationAwareTraining(scheme="float8_dynamic")
    with pytest.raises(ValueError, match=r"float8_dynamic.*device cpu.*'int8_dynamic', 'int8_dynamic_int4_weight'"):
        make_trainer([qat], max_steps=1).fit(QatModel())


def test_conversion_without_fake_quantization_says_it_is_post_training_quantization():
    model = QatModel()
    qat = QuantizationAwareTraining(start_step=50, kernel_timer=fast_int8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer([qat], max_steps=4).fit(model)
    ours = [str(w.message) for w in caught if "post-training quantization" in str(w.message)]
    assert ours == [
        "QuantizationAwareTraining: fake quantization never ran (start_step=50; training ended at global step 4),"
        " so the model was quantized without QAT (post-training quantization, report['method'] == 'ptq'); set"
        " start_step below the number of training steps to train with fake quantization."
    ]
    assert qat.report["method"] == "ptq" and "fake_quant_from_step" not in qat.report
    assert len(quantized_params(model)) == 3
    assert qat.report.summary_rows()[0]["value"].startswith("ptq (post-training quantization")


def test_conversion_after_fake_quantization_is_qat_without_warning():
    qat = QuantizationAwareTraining(start_step=2, kernel_timer=fast_int8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer([qat], max_steps=4, limit_val_batches=0).fit(QatModel())
    assert not [w for w in caught if "post-training" in str(w.message)]
    assert qat.report["method"] == "qat" and qat.report["fake_quant_from_step"] == 2
    prepared = qat.prepare(QatModel())  # outside a Trainer: fake quantization on from the user's first step
    qat.convert(prepared)
    assert qat.report["method"] == "qat"
    QuantizationAwareTraining(kernel_timer=fast_int8).convert(plain := QatModel())
    assert len(quantized_params(plain)) == 3


def test_model_with_no_eligible_layer_raises():
    model = QatModel()
    model.layer = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 2))  # in_features 32 fits
    qat = QuantizationAwareTraining(scheme="int8_dynamic_int4_weight", filter_fn=lambda m, fqn: m.in_features == 48)
    with pytest.raises(ValueError, match="no layer to quantize"):
        make_trainer([qat], max_steps=1).fit(model)


# ---------------------------------------------------------------- energy


def test_energy_figures_with_power_sampler(tmp_path):
    model = QatModel(width=128)
    sampler = PowerSampler(
        sensors=[SimulatedSensor(power_w=100.0)], interval_s=0.01, print_summary=False, summary_dir=str(tmp_path)
    )
    qat = QuantizationAwareTraining()
    logger = Mock()
    trainer = make_trainer([sampler, qat], max_steps=4, logger=logger, default_root_dir=tmp_path)
    trainer.fit(model)
    report = qat.report
    total_j = sampler.summary["cumulative_energy_j"]
    assert 0 < report["energy_j"] < total_j  # from on_fit_start to the conversion: part of the run
    assert report["energy_source"] == "simulated"
    for tag in ("float", "converted"):
        assert report[f"epi_{tag}_source"] == "simulated"
        assert 0 < report[f"epi_{tag}_j"] < total_j / report["val_samples"]
        ((step, value),) = logged(logger, f"qat/epi_{tag}_j")
        assert step == 4 and value == pytest.approx(report[f"epi_{tag}_j"])
    rows = sampler.summary["sections"]["qat"]["rows"]
    assert sampler.summary["sections"]["qat"]["scheme"] == "int8_dynamic"
    assert {r["figure"]: r["source"] for r in rows}["EPI, converted"] == "simulated"
    assert {r["figure"]: r["value"] for r in rows}["size ratio"] == report["size_ratio"]


class ClockedQatModel(QatModel):
    """Every validation batch (Lightning's loops and QAT's evaluation alike) lasts ``val_batch_s`` on ``clock``."""

    def __init__(self, clock: FakeClock, val_batch_s: float):
        super().__init__()
        self.clock, self.val_batch_s = clock, val_batch_s

    def validation_step(self, batch, batch_idx):
        self.clock.t += self.val_batch_s
        return super().validation_step(batch, batch_idx)


@pytest.mark.parametrize("qat_first", [False, True], ids=["qat_last", "qat_first"])
def test_end_of_fit_evaluation_is_not_training_energy_in_either_callback_order(tmp_path, qat_first):
    # 100 W; 4 training batches of 1 s; every validation batch 5 s: two validation loops in fit (steps
    # 2 and 4) of 2 batches, then QAT's float and converted evaluations of 2 batches each, in on_train_end.
    watts, batch_s, val_batch_s = 100.0, 1.0, 5.0
    clock = FakeClock(batch_s=batch_s)
    ps = PowerSampler(
        sensors=[SimulatedSensor(watts, clock=clock)],
        interval_s=3600.0,
        print_summary=False,
        report_picture=False,
        summary_dir=str(tmp_path),
        clock=clock,
    )
    clock.reads = ps.session
    eff, qat, logger = EfficiencyLogger(), QuantizationAwareTraining(kernel_timer=fast_int8), Mock()
    callbacks = [clock, qat, ps, eff] if qat_first else [clock, ps, eff, qat]
    trainer = make_trainer(
        callbacks,
        max_steps=4,
        logger=logger,
        val_check_interval=2,
        check_val_every_n_epoch=1,
        default_root_dir=tmp_path,
    )
    trainer.fit(ClockedQatModel(clock, val_batch_s))
    train_j, val_loop_j, evaluation_j = watts * 4 * batch_s, watts * 2 * 2 * val_batch_s, watts * 2 * 2 * val_batch_s
    assert ps.evaluation_energy_j == pytest.approx(evaluation_j)
    assert eff.results["train_energy_j"] == pytest.approx(train_j)  # neither validation loops nor QAT's evaluation
    assert eff.results["eer_j_per_param"] == pytest.approx(train_j / eff.n_params)
    assert eff.results["validate_energy_j"] == pytest.approx(val_loop_j / 2)  # the last loop's
    assert eff.state_dict()["per_rank"][0]["train_energy_j"] == pytest.approx(train_j)  # what a checkpoint now carries
    assert [v for _, v in logged_any(logger, "energy/step_j")] == [
        pytest.approx(watts * batch_s)
    ]  # the last, partial window
    assert qat.report["energy_j"] == pytest.approx(train_j + val_loop_j)  # fit start to the conversion
    assert qat.report["epi_float_j"] == qat.report["epi_converted_j"] == pytest.approx(watts * 2 * val_batch_s / 8)
    assert ps.summary["stage_energy_j"] == pytest.approx(
        train_j + val_loop_j + evaluation_j
    )  # the fit stage holds it all


# ---------------------------------------------------------------- DDP


def test_ddp_spawn_two_processes(tmp_path):
    # ddp_green_spawn destroys the process group at teardown: with plain ddp_spawn a spawned rank now and
    # then aborts at exit in gloo's shutdown (SIGABRT after the work is done), which failed a CI run
    model = QatModel(width=128)
    qat = QuantizationAwareTraining()
    logger = CSVLogger(tmp_path, name="qat", version=0)
    trainer = make_trainer([qat], strategy="ddp_green_spawn", devices=2, max_steps=3, logger=logger)
    before = model.layer[0].weight.detach().clone()
    trainer.fit(model)
    rows = list(csv.DictReader(open(Path(logger.log_dir) / "metrics.csv")))
    figures = {k: float(v) for row in rows for k, v in row.items() if k.startswith("qat/") and v}
    assert set(KEYS) <= set(figures)
    assert figures["qat/size_ratio"] < 0.5
    # the main process gets the trained float weights back and converts them itself
    assert fake_quantized(model) == [] and quantized_params(model) == []
    assert not torch.equal(model.layer[0].weight, before)
    qat.convert(model)
    assert len(quantized_params(model)) == 3
    assert qat.report["size_bytes_after"] == pytest.approx(figures["qat/size_bytes_after"])


def test_ddp_two_processes_subprocess(tmp_path):
    """strategy="ddp_green" re-runs its command for rank 1, so it runs as a script, not inside pytest."""
    script = Path(__file__).with_name("qat_ddp_script.py")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
    }
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for result in ranks:
        assert result["quantized"] == ["layer.0.weight", "layer.2.weight", "layer.4.weight"]
        report = result["report"]
        assert report["size_ratio"] < 0.5 and report["fake_quant_from_step"] == 1
        assert report["val_samples"] == 16  # 2 batches of 4 on each of 2 ranks, summed
        assert report["epi_converted_source"] == "simulated" and report["epi_converted_j"] > 0
        assert report["energy_j"] > 0
    # figures are reduced over ranks: every rank reports the same
    for key in ("val_loss_float", "val_loss_converted", "epi_float_j", "energy_j"):
        assert ranks[0]["report"][key] == ranks[1]["report"][key], key
    assert ranks[0]["output"] == ranks[1]["output"]  # DDP kept the replicas identical
    assert ranks[0]["tested"] and ranks[1]["tested"]  # test() of the converted model under ddp_green


def test_checkpointed_qat_energy_is_carried_once_by_global_rank_zero():
    from types import SimpleNamespace

    from lightning_green.quantization.evaluate import EnergyProbe

    for rank, carried in ((0, 12.5), (1, 0.0)):
        probe = EnergyProbe()
        probe.bind(SimpleNamespace(global_rank=rank, world_size=1))
        probe.restore_j(12.5)
        assert probe.prior_j == carried and probe.checkpoint_j() == (carried or None)
    assert pickle.loads(pickle.dumps(probe)).trainer is None  # spawn pickles callbacks
