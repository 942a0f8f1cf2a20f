"""Data-parallel training updates one model on every process: ``ddp_green``, 2 processes, NLL loss, SGD.

Each process trains on its own shard of a 3-class classification task and prints its loss every few
batches; DDP averages the gradients, so after the last step the parameters are identical on all
ranks, which the script checks and prints. A PowerSampler measures each process's energy and the
summary gives the cluster total and the imbalance between ranks.

    python examples/distributed_update.py            # 2 CPU processes, well under a minute
    python examples/distributed_update.py --devices 4 --comm-compression fp16
"""

from __future__ import annotations

import argparse
import math

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import lightning_green  # noqa: F401  (registers "ddp_green")
from lightning_green import EnergyAwareDDPStrategy, PowerSampler


def three_spirals(n_per_class: int = 600, seed: int = 0) -> TensorDataset:
    """Three interleaved 2-D spirals with noise: a small task an MLP learns in seconds."""
    g = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for c in range(3):
        r = torch.linspace(0.1, 1.0, n_per_class)
        theta = r * 4.0 + c * 2.0 * math.pi / 3 + 0.2 * torch.randn(n_per_class, generator=g)
        xs.append(torch.stack([r * torch.cos(theta), r * torch.sin(theta)], dim=1))
        ys.append(torch.full((n_per_class,), c))
    return TensorDataset(torch.cat(xs), torch.cat(ys))


class Classifier(L.LightningModule):
    """An MLP whose output is log-probabilities, trained with the negative log-likelihood loss."""

    def __init__(self, hidden: int = 64, lr: float = 0.3, print_every: int = 10):
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(2, hidden),
            torch.nn.Tanh(),
            torch.nn.Linear(hidden, hidden),
            torch.nn.Tanh(),
            torch.nn.Linear(hidden, 3),
        )
        self.params_equal: bool | None = None

    def forward(self, x):
        return F.log_softmax(self.net(x), dim=-1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.nll_loss(self(x), y)
        if batch_idx % self.hparams.print_every == 0:
            print(
                f"[rank {self.global_rank}] epoch {self.current_epoch} batch {batch_idx:3d}  nll {loss.item():.4f}",
                flush=True,
            )
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)

    def on_train_end(self):
        # every rank's flattened parameters, gathered while the process group is still up
        flat = torch.cat([p.detach().reshape(-1) for p in self.parameters()])
        gathered = self.all_gather(flat)
        if gathered.dim() == 1:  # a single process
            gathered = gathered.unsqueeze(0)
        max_diff = (gathered - gathered[0]).abs().max().item()
        self.params_equal = max_diff == 0.0
        if self.global_rank == 0:
            print(
                f"parameters on {gathered.shape[0]} ranks: max |difference| = {max_diff:.3g} -> "
                f"{'identical' if self.params_equal else 'DIFFERENT'}",
                flush=True,
            )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--comm-compression", default=None, help="None | fp16 | bf16 | powersgd")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    L.seed_everything(args.seed)
    data = three_spirals(seed=args.seed)
    train = DataLoader(data, batch_size=32, shuffle=True)  # Lightning adds a DistributedSampler: one shard per rank
    model = Classifier()
    power = PowerSampler(sensors="auto", interval_s=0.1, summary_dir="lightning_logs/distributed_update")
    trainer = L.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=args.devices,
        strategy=EnergyAwareDDPStrategy(comm_compression=args.comm_compression),
        callbacks=[power],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, train)
    if trainer.is_global_zero:
        with torch.no_grad():
            x, y = data.tensors
            accuracy = (model(x).argmax(-1) == y).float().mean().item()
        print(f"accuracy on the whole task: {accuracy:.3f}; parameters identical on all ranks: {model.params_equal}")
    return model


if __name__ == "__main__":
    main()
