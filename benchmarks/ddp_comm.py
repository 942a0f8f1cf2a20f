"""Gradient traffic of ``strategy="ddp_green"`` with each compression preset, 2 processes, gloo on CPU.

    python benchmarks/ddp_comm.py [--steps 200] [--powersgd-start 10] [--repeats 5]

An MLP of about 2.6 M parameters is trained for the same steps on the same data with ``none``,
``fp16``, ``bf16`` and ``powersgd`` (rank 2), the presets interleaved round by round, ``--repeats``
rounds. Reported per preset (rank 0; every rank sends the same):

* bytes per step as the whole-run mean (every step, PowerSGD's plain all-reduce warm-up included)
  and the ratio to ``none`` (the goal is judged on this: fp16 <= 0.5, powersgd <= 0.1);
* the steady-state bytes per step after ``--powersgd-start`` (steps after the switch) and its ratio,
  with the run length from which the whole-run mean falls under 0.1 of ``none``;
* wall time per step and exposed communication time per step;
* the loss on a fixed held-out set after training, next to ``none``'s.

Bytes are deterministic; times and losses are summarised as min/median/max over the rounds and the
status is decided on the median. The default run is 200 steps: PowerSGD's warm-up is then 5 % of the
run, a realistic share (torch's default warm-up of 1000 steps is 1 % of a 100k-step run, 10 % of a
10k-step one).

Lightning's popen launcher re-runs this script for rank 1; rank 0 prints the table and writes
``benchmarks/results/ddp_comm.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from _common import MIN_REPEATS, interleaved, met, summarize, table, write  # noqa: E402
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


class BytesPerStep(Callback):
    """Cumulative bytes this rank sent, read at the end of every optimizer step."""

    def __init__(self) -> None:
        self.cumulative: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.cumulative.append(trainer.strategy.comm_stats.bytes_sent)


@torch.no_grad()
def held_out_loss(model: MLP) -> float:
    x, y = make_data(2048, seed=99).tensors
    return float(torch.nn.functional.cross_entropy(model.net(x), y))


def run_preset(preset: str, steps: int, powersgd_start: int) -> dict:
    seed_everything(0, verbose=False)
    model, timer, counter = MLP(), StepTimer(), BytesPerStep()
    strategy = EnergyAwareDDPStrategy(comm_compression=preset, powersgd_rank=2, powersgd_start_step=powersgd_start)
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_steps=steps,
        logger=False,
        callbacks=[timer, counter],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model)
    stats = strategy.comm_stats
    # steady state: the steps after the switch, skipping the step on which it happens
    after = counter.cumulative[powersgd_start:]
    steady = (stats.bytes_sent - after[0]) / (stats.steps - powersgd_start - 1)
    return {
        "preset": preset,
        "rank": trainer.global_rank,
        "params": sum(p.numel() for p in model.parameters()),
        "steps": stats.steps,
        "bytes_per_step": stats.bytes_sent_last_step,
        "mean_bytes_per_step": stats.bytes_sent / max(1, stats.steps),
        "steady_bytes_per_step": steady,
        "uncompressed_bytes_per_step": stats.bytes_uncompressed_last_step,
        "exposed_comm_ms_per_step": 1000 * stats.exposed_comm_s_total / max(1, stats.steps),
        "step_ms": 1000 * timer.step_s,
        "train_loss_last": sum(model.train_losses[-5:]) / len(model.train_losses[-5:]),
        "held_out_loss": held_out_loss(model),
    }


def break_even_steps(start: int, steady_ratio: float, goal: float = 0.1) -> float:
    """Run length (steps) from which the whole-run mean ratio is <= ``goal``, with ``start`` plain
    all-reduce steps (ratio 1) and the rest at ``steady_ratio``; infinite if steady state misses."""
    return start * (1 - steady_ratio) / (goal - steady_ratio) if steady_ratio < goal else float("inf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--powersgd-start", type=int, default=10, help="plain all-reduce steps before PowerSGD")
    parser.add_argument("--repeats", type=int, default=MIN_REPEATS, help="interleaved rounds over the presets")
    parser.add_argument("--quick", action="store_true", help="development run: marks the JSON as quick")
    args = parser.parse_args()
    if args.steps < args.powersgd_start + 3:
        parser.error(f"--steps must be >= --powersgd-start + 3 (a steady state to measure), got {args.steps}")
    runs: dict[str, list[dict]] = {p: [] for p in PRESETS}
    for _, preset in interleaved(PRESETS, args.repeats):
        runs[preset].append(run_preset(preset, args.steps, args.powersgd_start))
    if runs["none"][0]["rank"] != 0:
        return
    none = runs["none"]
    rows = []
    for preset, rs in runs.items():
        row = {"preset": preset, "rank": 0, "params": rs[0]["params"], "steps": rs[0]["steps"]}
        for k in (
            "bytes_per_step",
            "mean_bytes_per_step",
            "steady_bytes_per_step",
            "uncompressed_bytes_per_step",
            "exposed_comm_ms_per_step",
            "step_ms",
            "train_loss_last",
            "held_out_loss",
        ):
            row[k] = summarize(r[k] for r in rs)
        row["mean_ratio_to_none"] = summarize(
            r["mean_bytes_per_step"] / n["mean_bytes_per_step"] for r, n in zip(rs, none, strict=False)
        )
        row["steady_ratio_to_none"] = summarize(
            r["steady_bytes_per_step"] / n["steady_bytes_per_step"] for r, n in zip(rs, none, strict=False)
        )
        row["step_time_ratio_to_none"] = summarize(r["step_ms"] / n["step_ms"] for r, n in zip(rs, none, strict=False))
        row["held_out_loss_minus_none"] = summarize(
            r["held_out_loss"] - n["held_out_loss"] for r, n in zip(rs, none, strict=False)
        )
        rows.append(row)
    by = {r["preset"]: r for r in rows}
    psgd_steady = by["powersgd"]["steady_ratio_to_none"]["median"]
    goals = {
        "fp16_le_half_of_none": met(by["fp16"]["mean_ratio_to_none"], "<=", 0.5),
        "powersgd_le_tenth_of_none": met(by["powersgd"]["mean_ratio_to_none"], "<=", 0.1),
    }
    untrained = held_out_loss(MLP())
    print(
        table(
            [{k: v["median"] if isinstance(v, dict) else v for k, v in r.items()} for r in rows],
            [
                "preset",
                "mean_bytes_per_step",
                "mean_ratio_to_none",
                "steady_ratio_to_none",
                "step_ms",
                "step_time_ratio_to_none",
                "exposed_comm_ms_per_step",
                "held_out_loss",
                "held_out_loss_minus_none",
            ],
        )
    )
    print(
        f"medians of {args.repeats} interleaved rounds; {args.steps} steps, PowerSGD from step {args.powersgd_start}; "
        f"params {rows[0]['params']:,}; held-out loss before training {untrained:.4f}; goals {goals}"
    )
    write(
        "ddp_comm",
        {
            "setup": {
                "processes": 2,
                "backend": "gloo",
                "steps": args.steps,
                "powersgd_rank": 2,
                "powersgd_start_step": args.powersgd_start,
                "batch_size_per_rank": 64,
                "optimizer": "Adam(lr=2e-3)",
                "model": f"MLP {IN}->{WIDTH}x{DEPTH}->{CLASSES}",
                "params": rows[0]["params"],
            },
            "rows": rows,
            "held_out_loss_untrained": untrained,
            "powersgd_break_even_steps": break_even_steps(args.powersgd_start, psgd_steady),
            "goals": goals,
        },
        repeats=args.repeats,
        quick=args.quick,
    )


if __name__ == "__main__":
    main()
