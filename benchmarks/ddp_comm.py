"""Gradient traffic of ``strategy="ddp_green"`` with each compression preset, 2 processes, gloo on CPU.

    python benchmarks/ddp_comm.py [--steps 40] [--powersgd-start 10]

An MLP of about 3.2 M parameters is trained for the same steps on the same data with ``none``, ``fp16``,
``bf16`` and ``powersgd`` (rank 2). Reported per preset (rank 0; every rank sends the same): bytes per
step once compression runs (the last step), the mean over all steps, the ratio to ``none``, the
exposed communication time, the wall time per step, and the loss on a fixed held-out set after
training, next to ``none``'s. Goals: fp16 <= 0.5 x none, powersgd <= 0.1 x none.

Lightning's popen launcher re-runs this script for rank 1; rank 0 prints the table and writes
``benchmarks/results/ddp_comm.json``. About a minute on an idle 2-core CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from _common import table, write  # noqa: E402
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lightning_green.strategies import EnergyAwareDDPStrategy  # noqa: E402

PRESETS = ("none", "fp16", "bf16", "powersgd")
WIDTH, DEPTH, IN, CLASSES = 1024, 3, 512, 10


def make_data(n: int, seed: int) -> TensorDataset:
    """A fixed random teacher labels Gaussian inputs: the same task for every preset."""
    g = torch.Generator().manual_seed(1234)
    teacher = torch.randn(IN, CLASSES, generator=g)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, IN, generator=g)
    return TensorDataset(x, (x @ teacher).argmax(dim=1))


class MLP(LightningModule):
    def __init__(self, lr: float = 2e-3) -> None:
        super().__init__()
        layers, d = [], IN
        for _ in range(DEPTH):
            layers += [torch.nn.Linear(d, WIDTH), torch.nn.ReLU()]
            d = WIDTH
        layers.append(torch.nn.Linear(d, CLASSES))
        self.net = torch.nn.Sequential(*layers)
        self.lr = lr
        self.train_losses: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.net(x), y)
        self.train_losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)

    def train_dataloader(self):
        return DataLoader(make_data(8192, seed=0), batch_size=64)


class StepTimer(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 2:  # skip the first steps (DDP rebuilds buckets, threads warm up)
            self.t0, self.n0 = time.perf_counter(), trainer.global_step

    def on_train_end(self, trainer, pl_module):
        self.step_s = (time.perf_counter() - self.t0) / max(1, trainer.global_step - self.n0)


@torch.no_grad()
def held_out_loss(model: MLP) -> float:
    x, y = make_data(2048, seed=99).tensors
    return float(torch.nn.functional.cross_entropy(model.net(x), y))


def run_preset(preset: str, steps: int, powersgd_start: int) -> dict:
    seed_everything(0, verbose=False)
    model, timer = MLP(), StepTimer()
    strategy = EnergyAwareDDPStrategy(comm_compression=preset, powersgd_rank=2, powersgd_start_step=powersgd_start)
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_steps=steps,
        logger=False,
        callbacks=[timer],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model)
    stats = strategy.comm_stats
    return {
        "preset": preset,
        "rank": trainer.global_rank,
        "params": sum(p.numel() for p in model.parameters()),
        "steps": stats.steps,
        "bytes_per_step": stats.bytes_sent_last_step,
        "mean_bytes_per_step": stats.bytes_sent / max(1, stats.steps),
        "uncompressed_bytes_per_step": stats.bytes_uncompressed_last_step,
        "exposed_comm_ms_per_step": 1000 * stats.exposed_comm_s_total / max(1, stats.steps),
        "step_ms": 1000 * timer.step_s,
        "train_loss_last": sum(model.train_losses[-5:]) / len(model.train_losses[-5:]),
        "held_out_loss": held_out_loss(model),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--powersgd-start", type=int, default=10, help="plain all-reduce steps before PowerSGD")
    args = parser.parse_args()
    t0 = time.monotonic()
    rows = [run_preset(p, args.steps, args.powersgd_start) for p in PRESETS]
    if rows[0]["rank"] != 0:
        return
    none = rows[0]
    for r in rows:
        r["ratio_to_none"] = r["bytes_per_step"] / none["bytes_per_step"]
        r["none_held_out_loss"] = none["held_out_loss"]
    goals = {
        "fp16_le_half_of_none": rows[1]["bytes_per_step"] <= 0.5 * none["bytes_per_step"],
        "powersgd_le_tenth_of_none": rows[3]["bytes_per_step"] <= 0.1 * none["bytes_per_step"],
    }
    untrained = held_out_loss(MLP())
    print(
        table(
            rows,
            ["preset", "bytes_per_step", "ratio_to_none", "mean_bytes_per_step", "exposed_comm_ms_per_step", "step_ms",
             "train_loss_last", "held_out_loss", "none_held_out_loss"],
        )
    )
    print(f"params {none['params']:,}; held-out loss before training {untrained:.4f}; goals {goals}")
    write(
        "ddp_comm",
        {
            "setup": {
                "processes": 2, "backend": "gloo", "steps": args.steps, "powersgd_rank": 2,
                "powersgd_start_step": args.powersgd_start, "batch_size_per_rank": 64, "optimizer": "Adam(lr=2e-3)",
                "model": f"MLP {IN}->{WIDTH}x{DEPTH}->{CLASSES}", "params": none["params"],
            },
            "rows": rows,
            "held_out_loss_untrained": untrained,
            "goals": goals,
            "seconds": time.monotonic() - t0,
        },
    )


if __name__ == "__main__":
    main()
