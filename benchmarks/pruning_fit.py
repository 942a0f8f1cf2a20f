"""The fit part of ``benchmarks/pruning.py``: ``StructuredPruning`` inside a Lightning fit, against an
unpruned fit of the same steps, batches and seed.

The corpus is structured and synthetic: a first-order Markov chain over the byte vocabulary in which
every token has 4 possible successors (one table for training and validation), so the loss falls well
below ``ln 256`` within a few dozen steps. Each style trains twice: unpruned, and with
``StructuredPruning(amount, start_step=steps // 4, end_step=steps // 2, events=2)``. Figures:

- ``fit_val_loss_ratio``: validation loss at the end of the pruned fit / of the unpruned one (1 run);
- ``fit_epi_ratio``: EfficiencyLogger's EPI (J per validation sample) of the pruned model / the
  unpruned one, over ``repeats`` validation loops interleaved (energy: the CPU ``estimate`` sensor);
- ``fit_train_j_per_step_ratio``: the callback's ``train_j_per_step_after`` / ``_before`` (1 run,
  same sensor).
"""

from __future__ import annotations

import tempfile

import _common
import torch
from lightning.pytorch import LightningModule, Trainer
from torch.utils.data import DataLoader, TensorDataset

from lightning_green import EfficiencyLogger, PowerSampler, StructuredPruning
from lightning_green.sensors import CpuEstimateSensor

SUCCESSORS = 4


def markov_batches(vocab: int, n: int, length: int, seed: int, batch_size: int) -> DataLoader:
    """``n`` sequences of ``length`` tokens (inputs, next-token targets) from one fixed sparse chain."""
    successors = torch.randint(0, vocab, (vocab, SUCCESSORS), generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    tokens = torch.empty(n, length + 1, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, vocab, (n,), generator=g)
    for t in range(length):
        choice = torch.randint(0, SUCCESSORS, (n,), generator=g)
        tokens[:, t + 1] = successors[tokens[:, t], choice]
    return DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=batch_size)


class CorpusLM(LightningModule):
    """A LitGPT ``GPT`` trained on next-token prediction; logs ``val_loss``."""

    def __init__(self, gpt: torch.nn.Module, lr: float = 1e-3) -> None:
        super().__init__()
        self.gpt = gpt.train()
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gpt(x)

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x).flatten(0, 1), y.flatten())

    def training_step(self, batch, batch_idx):
        return self.loss(batch)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.loss(batch))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def fit_one(gpt: torch.nn.Module, pruned: bool, steps: int, amount: float, loaders: tuple, folder: str) -> dict:
    """Fit ``steps`` steps (validation at the last); the Trainer, the model and its callbacks."""
    sampler = PowerSampler(sensors=[CpuEstimateSensor()], print_summary=False, report_picture=False, summary_dir=folder)
    efficiency = EfficiencyLogger()
    callbacks = [sampler, efficiency]
    pruning = None
    if pruned:
        pruning = StructuredPruning(
            amount=amount, start_step=steps // 4, end_step=steps // 2, events=2, window_steps=max(1, steps // 8)
        )
        callbacks.append(pruning)
    trainer = Trainer(
        max_steps=steps,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        val_check_interval=steps,
        check_val_every_n_epoch=None,
        default_root_dir=folder,
    )
    torch.manual_seed(0)
    model = CorpusLM(gpt)
    trainer.fit(model, train_dataloaders=loaders[0], val_dataloaders=loaders[1])
    val_loss = float(trainer.callback_metrics["val_loss"])
    return {"trainer": trainer, "model": model, "efficiency": efficiency, "pruning": pruning, "val_loss": val_loss}


def fit_figures(make_gpt, vocab: int, args) -> dict:
    """The three fit figures of one style; ``make_gpt()`` gives a fresh, seeded model."""
    batch, length = args.prefill_batch, args.prefill_tokens
    train = markov_batches(vocab, args.fit_steps * batch, length, seed=0, batch_size=batch)
    val = markov_batches(vocab, args.fit_val_batches * batch, length, seed=1, batch_size=batch)
    with tempfile.TemporaryDirectory() as folder:
        runs = {
            name: fit_one(make_gpt(), name == "pruned", args.fit_steps, args.amount, (train, val), folder)
            for name in ("unpruned", "pruned")
        }
        epi: dict[str, list[float]] = {name: [] for name in runs}
        for _, name in _common.interleaved(list(runs), args.repeats):
            run = runs[name]
            run["trainer"].validate(run["model"], dataloaders=val, verbose=False)
            epi[name].append(run["efficiency"].results["validate_epi_j"])
    report = runs["pruned"]["pruning"].report
    one_run = {
        "fit_val_loss_ratio": runs["pruned"]["val_loss"] / runs["unpruned"]["val_loss"],
        "fit_val_loss_unpruned": runs["unpruned"]["val_loss"],
        "fit_val_loss_pruned": runs["pruned"]["val_loss"],
        "fit_params_ratio": report["params_ratio"],
    }
    if "train_j_per_step_before" in report and "train_j_per_step_after" in report:
        one_run["fit_train_j_per_step_ratio"] = report["train_j_per_step_after"] / report["train_j_per_step_before"]
    figures = {k: _common.summarize([v]) for k, v in one_run.items()}
    figures["fit_epi_ratio"] = _common.summarize(a / b for a, b in zip(epi["pruned"], epi["unpruned"], strict=True))
    return figures
