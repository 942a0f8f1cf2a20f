"""Overhead of PowerSampler + EfficiencyLogger on training step time, and the cost of their hooks.

The same model and steps run with and without both callbacks, interleaved round by round (so drift
on a shared machine hits both alike); the figure is the ratio of the median step times. The hook
cost is timed inside the callbacks' per-step hooks and divided by the steps.

Goals: ratio <= 1.005 at a ~10 ms CPU step with 10 Hz sampling; hook cost <= 15 us per training step,
the mean over all steps including the log steps, at log_every_n_steps=10 (issue 10).

    python benchmarks/overhead.py [--rounds 8] [--steps 150] [--sensors auto]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from _common import table, write
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from lightning_green import EfficiencyLogger, PowerSampler, SimulatedSensor

LOG_EVERY_N_STEPS = 10  # the hook cost is the mean per step, log steps included, at this cadence
PER_STEP_HOOKS = ("on_train_batch_start", "on_train_batch_end", "on_before_optimizer_step", "on_after_backward", "on_before_zero_grad", "on_before_backward")


class MLP(LightningModule):
    def __init__(self, width: int):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class NoOp(Callback):
    """A callback that overrides nothing: what Lightning's hook dispatch costs per callback."""


class StepTimer(Callback):
    def __init__(self):
        self.times: list[float] = []

    def on_train_batch_end(self, *args, **kwargs):
        self.times.append(time.perf_counter())

    def step_times(self, skip: int = 5) -> list[float]:
        return [b - a for a, b in zip(self.times[skip:], self.times[skip + 1 :])]


class HookTimer:
    """Wraps the per-step hooks of callback instances and adds up, step by step, the time spent in them."""

    def __init__(self, callbacks: list[Callback]):
        self.per_step_ns: list[int] = []
        self._current = 0
        for callback in callbacks:
            for name in PER_STEP_HOOKS:
                if getattr(type(callback), name) is getattr(Callback, name):
                    continue  # not overridden: Lightning's no-op
                setattr(callback, name, self._wrap(getattr(callback, name), closes_step=name == "on_train_batch_end"))

    def _wrap(self, hook, closes_step: bool):
        def timed(*args, **kwargs):
            t = time.perf_counter_ns()
            try:
                return hook(*args, **kwargs)
            finally:
                self._current += time.perf_counter_ns() - t
                if closes_step:
                    self.per_step_ns.append(self._current)
                    self._current = 0

        return timed


def one_run(width: int, batch: int, steps: int, with_energy: bool, sensors: str, logdir: str, accelerator: str = "cpu", noop: bool = False) -> dict:
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(batch * 64, width), torch.randint(0, 10, (batch * 64,)))
    timer = StepTimer()
    callbacks: list[Callback] = []
    hook_timer = None
    if noop:
        callbacks += [NoOp(), NoOp()]
    if with_energy:
        ps = PowerSampler(sensors=[SimulatedSensor(100.0)] if sensors == "simulated" else sensors, interval_s=0.1, print_summary=False)
        eff = EfficiencyLogger()
        callbacks += [ps, eff]
        hook_timer = HookTimer([ps, eff])  # both on_train_batch_end hooks close a step: pair them up below
    trainer = Trainer(
        max_steps=steps, accelerator=accelerator, devices=1, logger=TensorBoardLogger(logdir), log_every_n_steps=LOG_EVERY_N_STEPS,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, callbacks=callbacks + [timer],
    )
    trainer.fit(MLP(width), DataLoader(data, batch_size=batch, shuffle=True))
    per_step = []
    if hook_timer is not None:  # two callbacks each close a step in on_train_batch_end: add the pairs
        ns = hook_timer.per_step_ns
        per_step = [a + b for a, b in zip(ns[0::2], ns[1::2])]
    out = {"step_times": timer.step_times(), "hook_ns_per_step": per_step}
    if with_energy:
        out["sources"] = callbacks[0].summary["sources"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--sensors", default="auto", help="auto | estimate | simulated")
    args = parser.parse_args()
    torch.set_num_threads(1)  # leave the second core to the sampler thread and the OS, as on a loaded machine
    base_times, energy_times, noop_times, hook_ns, sources = [], [], [], [], []
    with tempfile.TemporaryDirectory() as logdir:
        one_run(args.width, args.batch, 20, False, args.sensors, logdir)  # warm-up, discarded
        for r in range(args.rounds):
            order = ("base", "energy", "noop") if r % 2 == 0 else ("noop", "energy", "base")
            for config in order:
                res = one_run(args.width, args.batch, args.steps, config == "energy", args.sensors, logdir, noop=config == "noop")
                if config == "energy":
                    energy_times += res["step_times"]
                    hook_ns += res["hook_ns_per_step"]
                    sources = res["sources"]
                else:
                    (noop_times if config == "noop" else base_times).extend(res["step_times"])
    base_med, energy_med, noop_med = statistics.median(base_times), statistics.median(energy_times), statistics.median(noop_times)
    ratio = energy_med / base_med
    hook_us = statistics.median(hook_ns) / 1000
    hook_mean_us = statistics.mean(hook_ns) / 1000
    log_step_us = max(hook_ns) / 1000
    rows = [
        {"figure": "median step, no callbacks (ms)", "value": base_med * 1000, "goal": "~10 ms"},
        {"figure": "median step, PowerSampler+EfficiencyLogger (ms)", "value": energy_med * 1000, "goal": ""},
        {"figure": "ratio of medians", "value": ratio, "goal": "<= 1.005"},
        {"figure": "median step, two no-op callbacks (ms)", "value": noop_med * 1000, "goal": "reported"},
        {"figure": "ratio two no-op callbacks / none (Lightning's dispatch)", "value": noop_med / base_med, "goal": "reported"},
        {"figure": f"hook cost per step, mean incl. log steps at log_every_n_steps={LOG_EVERY_N_STEPS} (us)", "value": hook_mean_us, "goal": "<= 15"},
        {"figure": "hook cost per step, median (us)", "value": hook_us, "goal": "reported"},
        {"figure": "slowest step's hooks (a log step, us)", "value": log_step_us, "goal": "reported"},
    ]
    print(table(rows))
    print(f"sensor sources: {sources}; {args.rounds} interleaved rounds x {args.steps} steps; sampling at 10 Hz")
    write(
        "overhead",
        {
            "rounds": args.rounds, "steps_per_run": args.steps, "width": args.width, "batch": args.batch, "interval_s": 0.1,
            "sensors": args.sensors, "sources": sources,
            "median_step_ms_baseline": base_med * 1000, "median_step_ms_with_callbacks": energy_med * 1000,
            "ratio_of_medians": ratio, "goal_ratio": 1.005, "meets_ratio_goal": ratio <= 1.005,
            "median_step_ms_two_noop_callbacks": noop_med * 1000, "ratio_noop_callbacks": noop_med / base_med,
            "ratio_vs_noop_callbacks": energy_med / noop_med,
            "hook_us_per_step_median": hook_us, "hook_us_per_step_mean_incl_log_steps": hook_mean_us,
            "hook_us_slowest_step": log_step_us, "log_every_n_steps": LOG_EVERY_N_STEPS,
            "goal_hook_us": 15.0, "meets_hook_goal": hook_mean_us <= 15.0,
        },
    )


if __name__ == "__main__":
    main()
