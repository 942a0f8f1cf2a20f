"""Energy by phase: does the data share follow a dataloader delay, and what does phases=True cost?

A ~100 ms training step is built from sleeps: the dataloader sleeps ``d`` ms per batch (swept from 0
to 50 ms), the training step ``90 - d`` ms, the optimizer 10 ms. With a SimulatedSensor (source
``simulated``, 100 W) the data phase's energy share should be ``d / step`` within 5 points. Then the
same model runs interleaved with phases=True and phases=False: ratio of median step times, and the
time spent in the phase hooks as a share of the step. The sweep runs ``--repeats`` times (each
repeat walks all delays) and the on/off comparison ``--rounds`` interleaved rounds; the JSON keeps
min/median/max over them and the status is decided on the median.

    python benchmarks/phases.py [--steps 20] [--repeats 5] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import MIN_REPEATS, interleaved, met, summarize, table, write
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.utils.data import DataLoader, Dataset

from lightning_green import PowerSampler
from lightning_green.sensors import SimulatedSensor


class SlowData(Dataset):
    def __init__(self, sleep_s: float):
        self.sleep_s = sleep_s

    def __len__(self):
        return 100_000

    def __getitem__(self, i):
        if self.sleep_s:
            time.sleep(self.sleep_s)
        return torch.randn(16)


class SleepyOptimizer(torch.optim.SGD):
    def __init__(self, params, sleep_s):
        super().__init__(params, lr=0.01)
        self.sleep_s = sleep_s

    def step(self, closure=None):
        loss = closure() if closure is not None else None
        time.sleep(self.sleep_s)
        super().step()
        return loss


class Model(LightningModule):
    def __init__(self, data_s: float, compute_s: float, opt_s: float):
        super().__init__()
        self.layer = torch.nn.Linear(16, 1)
        self.data_s, self.compute_s, self.opt_s = data_s, compute_s, opt_s

    def training_step(self, batch, batch_idx):
        time.sleep(self.compute_s)
        return self.layer(batch).pow(2).mean()

    def train_dataloader(self):
        return DataLoader(SlowData(self.data_s), batch_size=1)

    def configure_optimizers(self):
        return SleepyOptimizer(self.parameters(), self.opt_s)


class StepTimer(Callback):
    def __init__(self):
        self.t: list[float] = []

    def on_train_batch_end(self, *args, **kwargs):
        self.t.append(time.perf_counter())


def fit(data_ms: float, steps: int, phases: bool) -> tuple[PowerSampler, list[float]]:
    ps = PowerSampler(
        sensors=[SimulatedSensor(100.0)],
        interval_s=0.1,
        phases=phases,
        print_summary=False,
        summary_dir="/tmp/lightning_green_phases",
    )
    timer = StepTimer()
    hook_ns = [0]
    if phases:  # time the phase hooks themselves
        for name in (
            "on_train_batch_start",
            "on_before_zero_grad",
            "on_before_backward",
            "on_after_backward",
            "on_before_optimizer_step",
        ):
            hook = getattr(ps, name)

            def timed(*a, _h=hook, **k):
                t = time.perf_counter_ns()
                _h(*a, **k)
                hook_ns[0] += time.perf_counter_ns() - t

            setattr(ps, name, timed)
    trainer = Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        log_every_n_steps=10,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[ps, timer],
    )
    d = data_ms / 1000
    trainer.fit(Model(d, 0.090 - d, 0.010))
    return ps, [b - a for a, b in zip(timer.t[2:], timer.t[3:], strict=False)], hook_ns[0]


DELAYS_MS = (0, 10, 20, 30, 40, 50)


def sweep_once(steps: int) -> dict[int, dict]:
    out = {}
    for data_ms in DELAYS_MS:
        ps, times, _ = fit(data_ms, steps, True)
        rows = {r["phase"]: r for r in ps.summary["sections"]["phases"]["rows"]}
        step_ms = statistics.median(times) * 1000
        expected = 100 * data_ms / step_ms
        out[data_ms] = {
            "median_step_ms": step_ms,
            "expected_data_share_pct": expected,
            "data_energy_share_pct": rows["data"]["energy_share_pct"],
            "compute_share_pct": rows["compute"]["energy_share_pct"],
            "optimizer_share_pct": rows["optimizer"]["energy_share_pct"],
            "error_points": rows["data"]["energy_share_pct"] - expected,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=MIN_REPEATS, help="sweeps over all delays")
    parser.add_argument("--rounds", type=int, default=MIN_REPEATS, help="interleaved on/off rounds")
    parser.add_argument("--quick", action="store_true", help="development run: marks the JSON as quick")
    args = parser.parse_args()
    sweeps = [sweep_once(args.steps) for _ in range(args.repeats)]
    sweep = []
    for data_ms in DELAYS_MS:
        row = {"data_sleep_ms": data_ms, **{k: summarize(s[data_ms][k] for s in sweeps) for k in sweeps[0][data_ms]}}
        row["within_5_points"] = abs(row["error_points"]["median"]) <= 5.0
        sweep.append(row)
    worst = summarize(max(abs(s[d]["error_points"]) for d in DELAYS_MS) for s in sweeps)
    print(
        table(
            [
                {
                    "data_sleep_ms": r["data_sleep_ms"],
                    **{
                        k: r[k]["median"]
                        for k in ("median_step_ms", "expected_data_share_pct", "data_energy_share_pct")
                    },
                    "error_points_min": r["error_points"]["min"],
                    "error_points_max": r["error_points"]["max"],
                }
                for r in sweep
            ]
        )
    )
    per_round = {k: [] for k in ("off_ms", "on_ms", "ratio", "hook_us", "hook_pct")}
    medians: dict[bool, float] = {}
    for _, phases in interleaved((True, False), args.rounds):
        _, times, ns = fit(20, args.steps, phases)
        medians[phases] = statistics.median(times)
        if phases:
            hook_us = ns / args.steps / 1000
        if len(medians) == 2:
            per_round["off_ms"].append(medians[False] * 1000)
            per_round["on_ms"].append(medians[True] * 1000)
            per_round["ratio"].append(medians[True] / medians[False])
            per_round["hook_us"].append(hook_us)
            per_round["hook_pct"].append(hook_us / 1e6 / medians[False] * 100)
            medians = {}
    s = {k: summarize(v) for k, v in per_round.items()}
    overhead = {
        "median_step_ms_phases_off": s["off_ms"],
        "median_step_ms_phases_on": s["on_ms"],
        "ratio_of_medians": s["ratio"],
        "phase_hook_us_per_step": s["hook_us"],
        "phase_hook_pct_of_step": s["hook_pct"],
        "goal_pct": 1.0,
        "meets_goal": met(s["hook_pct"], "<=", 1.0) and met(s["ratio"], "<=", 1.01),
    }
    print(
        table(
            [
                {"figure": k, "min": v["min"], "median": v["median"], "max": v["max"]}
                for k, v in overhead.items()
                if isinstance(v, dict)
            ]
        )
    )
    write(
        "phases",
        {
            "source": "simulated",
            "sweep": sweep,
            "worst_error_points": worst,
            "overhead": overhead,
            "steps": args.steps,
            "sweeps": args.repeats,
            "rounds": args.rounds,
            "all_within_5_points": met(worst, "<=", 5.0),
        },
        repeats=min(args.repeats, args.rounds),
        quick=args.quick,
    )


if __name__ == "__main__":
    main()
