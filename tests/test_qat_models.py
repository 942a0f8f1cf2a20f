"""QAT on the common transformer models: fit, run the converted model, test from ModelCheckpoint's files."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_green.quantization import QuantizationAwareTraining, int8, layers

VOCAB, T = 64, 8


def fast_int8(label, fn):
    return 1.0 if label == "float" else 0.5


class EncoderNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 32)
        layer = nn.TransformerEncoderLayer(32, 2, dim_feedforward=64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(32, VOCAB)

    def forward(self, x):
        return self.head(self.encoder(self.emb(x)))


class FullTransformerNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 32)
        self.transformer = nn.Transformer(32, 2, 1, 1, dim_feedforward=64, dropout=0.0, batch_first=True)
        self.head = nn.Linear(32, VOCAB)

    def forward(self, x):
        e = self.emb(x)
        return self.head(self.transformer(e, e))


class DemoNet(nn.Module):
    """Lightning's demo ``Transformer`` (``nn.Transformer`` inside): log-probabilities, flattened."""

    def __init__(self):
        super().__init__()
        from lightning.pytorch.demos import Transformer

        self.net = Transformer(vocab_size=VOCAB, ninp=32, nhead=2, nhid=64, nlayers=1, dropout=0.0)

    def forward(self, x):
        return self.net(x, x).view(x.shape[0], x.shape[1], VOCAB)


class LitGPTNet(nn.Module):
    """LitGPT's ``GPT`` (GPT-NeoX style, fused qkv), pythia-like and shrunk."""

    def __init__(self):
        super().__init__()
        from litgpt.model import GPT, Config

        config = Config(
            block_size=T,
            vocab_size=VOCAB,
            padded_vocab_size=VOCAB,
            n_layer=1,
            n_head=2,
            n_embd=32,
            intermediate_size=64,
            bias=True,
            parallel_residual=True,
            rotary_percentage=0.25,
            mlp_class_name="GptNeoxMLP",
            norm_class_name="LayerNorm",
        )
        self.gpt = GPT(config)

    def forward(self, x):
        return self.gpt(x)


NETS = {"encoder": EncoderNet, "transformer": FullTransformerNet, "lightning_demo": DemoNet, "litgpt": LitGPTNet}


class LM(LightningModule):
    def __init__(self, kind: str):
        super().__init__()
        torch.manual_seed(0)
        self.net = NETS[kind]()

    def forward(self, x):
        return self.net(x)

    def loss(self, batch):
        x, y = batch
        return F.cross_entropy(self(x).reshape(-1, VOCAB).float(), y.reshape(-1))

    def training_step(self, batch, batch_idx):
        return self.loss(batch)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.loss(batch))

    def test_step(self, batch, batch_idx):
        self.log("test_loss", self.loss(batch))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)

    def _data(self, seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randint(0, VOCAB, (16, T), generator=g)
        return DataLoader(TensorDataset(x, (x + 1) % VOCAB), batch_size=8)

    def train_dataloader(self):
        return self._data(0)

    def val_dataloader(self):
        return self._data(1)

    def test_dataloader(self):
        return self._data(2)


def trainer(callbacks, **kwargs):
    kwargs = {"max_steps": 3, **kwargs}
    return Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        **kwargs,
    )


def converted_layers(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, int8.CONVERTED))


def loss_of(model):
    with torch.inference_mode():
        losses = [(model.loss(b), b[0].shape[0]) for b in model.test_dataloader()]
    return float(sum(v * n for v, n in losses) / sum(n for _, n in losses))


def converted_from_file(kind, path):
    """Expected model: a fresh one given the file's float weights, then converted."""
    model = LM(kind)
    model.load_state_dict(torch.load(path, weights_only=False)["state_dict"])
    return QuantizationAwareTraining(kernel_timer=fast_int8).convert(model)


@pytest.mark.parametrize("kind", list(NETS))
def test_fit_convert_and_test_from_last_checkpoint(kind, tmp_path):
    model = LM(kind)
    qat = QuantizationAwareTraining(kernel_timer=fast_int8)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, monitor="val_loss")
    fit_trainer = trainer([qat, ckpt])
    fit_trainer.fit(model)

    assert qat.report["scheme"] == "int8_dynamic" and qat.report["kernel_decode_ratio"] == 0.5
    assert converted_layers(model) == qat.report["layers_quantized"]
    mha_out = [s for s in qat.report["layers_left_float"] if "MultiheadAttention" in s]
    assert bool(mha_out) == (kind != "litgpt")  # every nn.MultiheadAttention keeps its out_proj float
    x = torch.randint(0, VOCAB, (2, T))
    with torch.inference_mode():
        assert model(x).shape == (2, T, VOCAB) and torch.isfinite(model(x)).all()

    # last.ckpt was written before the conversion: it holds float weights
    last = tmp_path / "last.ckpt"
    assert torch.load(last, weights_only=False)["state_dict"][f"{_a_quantized(qat)}.weight"].dtype == torch.float32
    expected = loss_of(converted_from_file(kind, last))
    report = qat.report.as_dict()
    same = fit_trainer.test(model, ckpt_path="last", verbose=False)[0]["test_loss"]
    assert same == pytest.approx(expected, rel=1e-5)
    assert converted_layers(model) == qat.report["layers_quantized"]
    assert qat.report.as_dict() == report  # the file's older report (written before conversion) does not replace it

    fresh = LM(kind)
    tested = trainer([QuantizationAwareTraining(kernel_timer=fast_int8)]).test(fresh, ckpt_path=last, verbose=False)
    assert tested[0]["test_loss"] == pytest.approx(expected, rel=1e-5)
    assert converted_layers(fresh) == qat.report["layers_quantized"]


def _a_quantized(qat):
    return qat.report["layers_quantized"][0]


def test_best_mid_qat_and_converted_checkpoints(tmp_path):
    model = LM("litgpt")
    qat = QuantizationAwareTraining(kernel_timer=fast_int8, start_step=1)
    ckpt = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", every_n_train_steps=1, save_top_k=-1)
    t = trainer([qat, ckpt], max_steps=3, val_check_interval=1)
    t.fit(model)
    t.save_checkpoint(tmp_path / "converted.ckpt")
    converted_loss = loss_of(model)
    mid = tmp_path / "epoch=0-step=2.ckpt"  # mid-QAT (fake quantization from step 1): float weights
    best = ckpt.best_model_path

    for path, expected in (
        (mid, loss_of(converted_from_file("litgpt", mid))),
        (best, loss_of(converted_from_file("litgpt", best))),
        (tmp_path / "converted.ckpt", converted_loss),
    ):
        result = trainer([QuantizationAwareTraining(kernel_timer=fast_int8)]).validate(
            LM("litgpt"), ckpt_path=path, verbose=False
        )
        assert result[0]["val_loss"] != loss_of(LM("litgpt"))
        tested = trainer([QuantizationAwareTraining(kernel_timer=fast_int8)]).test(
            LM("litgpt"), ckpt_path=path, verbose=False
        )
        assert tested[0]["test_loss"] == pytest.approx(expected, rel=1e-5), path.name

    # eval_as="float": the float model of the file, fake quantization off
    float_model = LM("litgpt")
    float_model.load_state_dict(torch.load(mid, weights_only=False)["state_dict"])
    tested = trainer([QuantizationAwareTraining(kernel_timer=fast_int8, eval_as="float")]).test(
        LM("litgpt"), ckpt_path=mid, verbose=False
    )
    assert tested[0]["test_loss"] == pytest.approx(loss_of(float_model), rel=1e-5)

    # fit resumes from the mid-QAT file, prepared, and converts at its end
    resumed, qat2 = LM("litgpt"), QuantizationAwareTraining(kernel_timer=fast_int8, start_step=1)
    trainer([qat2], max_steps=4, limit_val_batches=0, default_root_dir=tmp_path).fit(resumed, ckpt_path=mid)
    assert qat2.report["converted_at_step"] == 4 and converted_layers(resumed)


def test_tied_weights_stay_float():
    model = LM("encoder")
    model.net.head = nn.Linear(32, VOCAB, bias=False)
    model.net.head.weight = model.net.emb.weight
    qat = QuantizationAwareTraining(kernel_timer=fast_int8, quantize_embeddings=True)
    with pytest.warns(UserWarning, match=r"net.head \(tied weight\)"):
        qat.prepare(model)
    assert (
        "net.head (tied weight)" in qat.report["layers_left_float"]
        and "net.emb (tied weight)" in qat.report["layers_left_float"]
    )
    assert type(model.net.head) is nn.Linear and model.net.head.weight is model.net.emb.weight


def test_int8_path_does_not_import_torchao():
    import subprocess

    code = (
        "import sys, torch; from lightning_green.quantization import QuantizationAwareTraining as Q; "
        "m = torch.nn.Sequential(torch.nn.Linear(64, 64)); "
        "Q(scheme='int8_dynamic', kernel_timer=lambda l, f: 1.0).convert(m); "
        "m(torch.randn(2, 64)); print('torchao' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr[-2000:]


def test_layers_fake_quant_flags_follow_the_backend():
    model = LM("encoder")
    QuantizationAwareTraining(kernel_timer=fast_int8).prepare(model)
    layers.set_fake_quant_enabled(model, False)
    assert layers.fake_quant_enabled(model) == [False] * 3  # linear1, linear2, head; out_proj stays float
