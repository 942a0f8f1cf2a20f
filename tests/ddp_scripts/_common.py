"""Shared pieces of the scripts that tests run in subprocesses (each script re-runs per rank)."""

from __future__ import annotations

import json
import os
import sys

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.loggers import Logger
from lightning.pytorch.strategies import StrategyRegistry
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from lightning_green.strategies import EnergyAwareDDPStrategy  # noqa: E402

EnergyAwareDDPStrategy.register_strategies(StrategyRegistry)

#: Parameters of :class:`TwoLayer` per tensor: 64x64 weight, 64 bias, 4x64 weight, 4 bias.
TWO_LAYER_NUMEL = 64 * 64 + 64 + 4 * 64 + 4


class TwoLayer(LightningModule):
    """Linear(64, 64) -> ReLU -> Linear(64, 4) on a fixed random regression set."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
        self.lr = lr
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(512, 64, generator=g)
        y = x[:, :4] * 2.0 + 0.1 * torch.randn(512, 4, generator=g)
        return DataLoader(TensorDataset(x, y), batch_size=16)


class RecordingLogger(Logger):
    """Keeps every ``log_metrics`` call (on every rank: not rank-zero-only on purpose)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[dict, int]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics, step=None) -> None:
        self.calls.append((dict(metrics), step))

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


def write_json(path: str, data: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)
