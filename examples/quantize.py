"""Quantize a model's weights for inference with quantization-aware training, and see what it costs.

QAT with the callback (fake quantization from step 150 on), then the model is converted with the
scheme ``"auto"`` measured fastest on this device (on x86 CPU: torch's dynamic int8 kernel). The
float model QAT trained and the converted one are compared on held-out data: the largest difference
between their outputs, accuracy, size of their weights, and energy per inference (EPI) measured by a
PowerSampler on this machine, with its source.

    python examples/quantize.py                 # under a minute on a 2-core CPU
    python examples/quantize.py --scheme int8_weight_only
"""

from __future__ import annotations

import argparse
import time

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_green import EfficiencyLogger, PowerSampler, QuantizationAwareTraining
from lightning_green.quantization import state_dict_size_bytes


def blobs(n: int, dim: int = 64, classes: int = 10, seed: int = 0) -> TensorDataset:
    """Gaussian clusters around fixed random centres: a classification task with 64 input features."""
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(1234)) * 1.5
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = centres[y] + torch.randn(n, dim, generator=g) * 4.0
    return TensorDataset(x, y)


class MLP(L.LightningModule):
    def __init__(self, dim: int = 64, hidden: int = 512, classes: int = 10, lr: float = 1e-3):
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(dim, hidden),
            torch.nn.ReLU(),
            torch.nn.Linear(hidden, hidden),
            torch.nn.ReLU(),
            torch.nn.Linear(hidden, classes),
        )

    def forward(self, x):
        return F.log_softmax(self.net(x), dim=-1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.nll_loss(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        loss = F.nll_loss(self(x), y)
        self.log("val_loss", loss)
        return loss

    def test_step(self, batch, batch_idx):
        x, y = batch
        out = self(x)
        self.log("test_loss", F.nll_loss(out, y))
        self.log("test_acc", (out.argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


def epi_and_metrics(model: L.LightningModule, loader: DataLoader) -> dict:
    """Test ``model`` under a PowerSampler + EfficiencyLogger: loss, accuracy and energy per sample."""
    power, efficiency = PowerSampler(print_summary=False), EfficiencyLogger()
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[power, efficiency],
    )
    t0 = time.perf_counter()
    metrics = trainer.test(model, loader, verbose=False)[0]
    ms_per_sample = (time.perf_counter() - t0) * 1e3 / len(loader.dataset)
    return {
        **metrics,
        "ms_per_sample": ms_per_sample,
        "epi_j": efficiency.results["test_epi_j"],
        "source": "+".join(power.summary["sources"]),
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scheme", default="auto")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    L.seed_everything(args.seed)
    train, val, test = blobs(16_000, seed=1), blobs(1_000, seed=2), blobs(4_000, seed=3)
    model = MLP()
    qat = QuantizationAwareTraining(scheme=args.scheme, start_step=args.steps // 2, convert_on_fit_end=False)
    trainer = L.Trainer(
        max_steps=args.steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=4,
        val_check_interval=args.steps // 2,
        num_sanity_val_steps=0,
        callbacks=[PowerSampler(print_summary=False), qat],
    )
    trainer.fit(model, DataLoader(train, batch_size=64, shuffle=True), DataLoader(val, batch_size=256))

    float_model = qat.float_copy(model)  # the float weights QAT trained, fake quantization off
    quantized = qat.convert(model)  # in place, with the scheme auto chose
    name = qat.report["scheme"]
    x = test.tensors[0]
    with torch.no_grad():
        p_float, p_quant = float_model(x).exp(), quantized(x).exp()
    max_diff = (p_float - p_quant).abs().max().item()
    agreement = (p_float.argmax(-1) == p_quant.argmax(-1)).float().mean().item()
    loader = DataLoader(test, batch_size=256)
    rows = {"float": epi_and_metrics(float_model, loader), name: epi_and_metrics(quantized, loader)}
    rows["float"]["size_bytes"] = state_dict_size_bytes(float_model)
    rows[name]["size_bytes"] = state_dict_size_bytes(quantized)

    print(f"\n=== quantize: float vs {name} on {len(test)} held-out samples ===")
    print(
        f"{'model':<26}{'test loss':>10}{'accuracy':>10}{'size bytes':>12}{'EPI J/sample':>14}{'ms/sample':>11}  source"
    )
    for label, r in rows.items():
        print(
            f"{label:<26}{r['test_loss']:>10.4f}{r['test_acc']:>10.3f}{r['size_bytes']:>12,}{r['epi_j']:>14.3g}"
            f"{r['ms_per_sample']:>11.4f}  {r['source']}"
        )
    print(
        f"max |float - quantized| over the output probabilities: {max_diff:.4g}; same prediction on {agreement:.1%} "
        "of samples"
    )
    print(
        f"size ratio: {rows[name]['size_bytes'] / rows['float']['size_bytes']:.3f}; "
        f"EPI ratio quantized/float: {rows[name]['epi_j'] / rows['float']['epi_j']:.3g} (as measured here)"
    )
    if "estimate" in rows["float"]["source"]:
        print("note: EPI here comes from a CPU utilisation model ('estimate'), not a measurement.")
    return {"rows": rows, "max_abs_diff": max_diff, "agreement": agreement}


if __name__ == "__main__":
    main()
