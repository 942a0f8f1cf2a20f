"""Cost of FabricEnergy's per-step hook in a plain Fabric training loop, log steps included.

A Fabric loop (the MLP of overhead.py, SGD, a TensorBoardLogger) runs with FabricEnergy logging every
``--log-every`` optimizer steps (10, as overhead.py's Trainer run, so the two compare). The time spent
inside ``on_after_optimizer_step`` is taken step by step; per round its median, its mean over all steps
(log steps included) and its slowest step, with an empty hook under the same timer as the floor. The
step time with and without the callback is reported too (their ratio, interleaved rounds).

Goal: mean hook cost per step, log steps included, <= 15 us (the Trainer callbacks' budget).

    python benchmarks/fabric_overhead.py [--rounds 6] [--steps 300] [--sensors auto] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from _common import interleaved, met, summarize, table, write
from lightning.fabric import Fabric
from lightning.fabric.loggers import TensorBoardLogger

from lightning_green.fabric import FabricEnergy
from lightning_green.sensors import SimulatedSensor

GOAL_MEAN_US = 15.0


class EmptyHook:
    """A Fabric callback whose ``on_after_optimizer_step`` does nothing: the timer's floor."""

    def on_after_optimizer_step(self, strategy, optimizer):
        pass


def timed_hook(callback, spent_ns: list[int]) -> None:
    """Replace ``callback.on_after_optimizer_step`` by a wrapper that appends each call's nanoseconds."""
    hook = callback.on_after_optimizer_step

    def timed(strategy, optimizer):
        t = time.perf_counter_ns()
        hook(strategy=strategy, optimizer=optimizer)
        spent_ns.append(time.perf_counter_ns() - t)

    callback.on_after_optimizer_step = timed


def one_run(width: int, batch: int, steps: int, with_energy: bool, sensors: str, every: int, logdir: str) -> dict:
    torch.manual_seed(0)
    hook_ns: list[int] = []
    empty_ns: list[int] = []
    callbacks = []
    energy = None
    if with_energy:
        energy = FabricEnergy(
            sensors=[SimulatedSensor(100.0)] if sensors == "simulated" else sensors,
            interval_s=0.1,
            log_every_n_steps=every,
            print_summary=False,
            summary_dir=logdir,
        )
        empty = EmptyHook()
        timed_hook(energy, hook_ns)
        timed_hook(empty, empty_ns)
        callbacks = [energy, empty]
    fabric = Fabric(accelerator="cpu", devices=1, callbacks=callbacks, loggers=[TensorBoardLogger(logdir)])
    model = torch.nn.Sequential(
        torch.nn.Linear(width, width),
        torch.nn.ReLU(),
        torch.nn.Linear(width, width),
        torch.nn.ReLU(),
        torch.nn.Linear(width, 10),
    )
    model, optimizer = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=0.01))
    x, y = torch.randn(batch, width), torch.randint(0, 10, (batch,))
    stamps = []
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        stamps.append(time.perf_counter())
    out = {"step_s": [b - a for a, b in zip(stamps[5:], stamps[6:], strict=False)], "hook_ns": hook_ns}
    out["empty_ns"] = empty_ns
    if energy is not None:
        energy.finish()
        out["sources"] = energy.summary["sources"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds (repeats), >= 5 for a full run")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--sensors", default="auto", help="auto | estimate | simulated")
    parser.add_argument("--quick", action="store_true", help="development run: 2 rounds of 60 steps, marked quick")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.steps = min(args.rounds, 2), min(args.steps, 60)
    torch.set_num_threads(1)  # the second core to the sampler thread and the OS, as in overhead.py
    keys = ("base_ms", "energy_ms", "ratio", "hook_median_us", "hook_mean_us", "hook_max_us", "empty_hook_us")
    per_round: dict[str, list[float]] = {k: [] for k in keys}
    sources: list[str] = []
    with tempfile.TemporaryDirectory() as logdir:
        one_run(args.width, args.batch, 20, True, args.sensors, args.log_every, logdir)  # warm-up, discarded
        medians: dict[bool, float] = {}
        for _r, with_energy in interleaved((False, True), args.rounds):
            res = one_run(args.width, args.batch, args.steps, with_energy, args.sensors, args.log_every, logdir)
            medians[with_energy] = statistics.median(res["step_s"])
            if with_energy:
                hook_us = [ns / 1000 for ns in res["hook_ns"]]
                per_round["hook_median_us"].append(statistics.median(hook_us))
                per_round["hook_mean_us"].append(statistics.mean(hook_us))
                per_round["hook_max_us"].append(max(hook_us))
                per_round["empty_hook_us"].append(statistics.median(ns / 1000 for ns in res["empty_ns"]))
                sources = res["sources"]
            if len(medians) == 2:
                per_round["base_ms"].append(medians[False] * 1000)
                per_round["energy_ms"].append(medians[True] * 1000)
                per_round["ratio"].append(medians[True] / medians[False])
                medians = {}
    s = {k: summarize(v) for k, v in per_round.items()}
    figures = [
        ("median step, no callback (ms)", "base_ms", "reported"),
        ("median step, FabricEnergy (ms)", "energy_ms", "reported"),
        ("ratio of medians", "ratio", "reported"),
        ("hook cost per step, median (us)", "hook_median_us", "reported"),
        (f"hook cost per step, mean incl. log steps every {args.log_every} (us)", "hook_mean_us", f"<= {GOAL_MEAN_US}"),
        ("slowest step's hook (a log step, us)", "hook_max_us", "reported"),
        ("an empty hook, same timer, median (us)", "empty_hook_us", "reported"),
    ]
    rows = [
        {"figure": f, "min": s[k]["min"], "median": s[k]["median"], "max": s[k]["max"], "goal": g}
        for f, k, g in figures
    ]
    print(table(rows))
    print(f"sensor sources: {sources}; {args.rounds} interleaved rounds x {args.steps} steps; sampling at 10 Hz")
    write(
        "fabric_overhead",
        {
            "rounds": args.rounds,
            "steps_per_run": args.steps,
            "width": args.width,
            "batch": args.batch,
            "interval_s": 0.1,
            "log_every_n_steps": args.log_every,
            "sensors": args.sensors,
            "sources": sources,
            "median_step_ms_baseline": s["base_ms"],
            "median_step_ms_with_callback": s["energy_ms"],
            "ratio_of_medians": s["ratio"],
            "hook_us_per_step_median": s["hook_median_us"],
            "hook_us_per_step_mean_incl_log_steps": s["hook_mean_us"],
            "goal_hook_mean_us": GOAL_MEAN_US,
            "meets_hook_mean_goal": met(s["hook_mean_us"], "<=", GOAL_MEAN_US),
            "hook_us_slowest_step": s["hook_max_us"],
            "empty_hook_us_per_step_median": s["empty_hook_us"],
        },
        repeats=args.rounds,
        quick=args.quick,
    )


if __name__ == "__main__":
    main()
