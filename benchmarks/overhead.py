"""Overhead of PowerSampler + EfficiencyLogger on training step time, and the cost of their hooks.

The same model and steps run with no callbacks, with both callbacks, and with two callbacks that
override nothing, interleaved round by round (so drift on a shared machine hits all alike). Each
round gives the ratio of the median step times; the JSON keeps min/median/max over the rounds and
the status is decided on the median. The hook cost is timed inside the callbacks' per-step hooks
(log steps included, ``log_every_n_steps=10``), step by step: per round its median and its mean.

Goals: ratio <= 1.005 at a ~10 ms CPU step with 10 Hz sampling; hook cost <= 20 us/step (median,
issue 2) and <= 15 us/step as the mean over all steps including log steps (issue 10).

    python benchmarks/overhead.py [--rounds 6] [--steps 150] [--sensors auto]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from _common import interleaved, met, summarize, table, write
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from lightning_green import EfficiencyLogger, PowerSampler
from lightning_green.sensors import SimulatedSensor

LOG_EVERY_N_STEPS = 10
PER_STEP_HOOKS = (
    "on_train_batch_start",
    "on_train_batch_end",
    "on_before_optimizer_step",
    "on_after_backward",
    "on_before_zero_grad",
    "on_before_backward",
)


class MLP(LightningModule):
    def __init__(self, width: int):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(width, width),
            torch.nn.ReLU(),
            torch.nn.Linear(width, width),
            torch.nn.ReLU(),
            torch.nn.Linear(width, 10),
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class NoOp(Callback):
    """A callback that overrides nothing: what Lightning's hook dispatch costs per callback."""


class EmptyHook(Callback):
    """A callback whose ``on_train_batch_end`` does nothing: the floor of a timed per-step hook (the
    call and the timer, with caches cold after the step's tensor work)."""

    def on_train_batch_end(self, *args, **kwargs):
        pass


class StepTimer(Callback):
    def __init__(self):
        self.times: list[float] = []

    def on_train_batch_end(self, *args, **kwargs):
        self.times.append(time.perf_counter())

    def step_times(self, skip: int = 5) -> list[float]:
        return [b - a for a, b in zip(self.times[skip:], self.times[skip + 1 :], strict=False)]


class HookTimer(Callback):
    """Wraps the per-step hooks of callback instances and adds up, step by step, the time spent in them.

    Placed after those callbacks in the Trainer's list: its own ``on_train_batch_end`` runs after
    theirs and closes the step.
    """

    def __init__(self, callbacks: list[Callback]):
        self.per_step_ns: list[int] = []
        self.current_ns = 0
        #: how many hook methods are timed per step (each pays the timer's floor)
        self.timed_hooks = 0
        for callback in callbacks:
            for name in PER_STEP_HOOKS:
                if getattr(type(callback), name) is getattr(Callback, name):
                    continue  # not overridden: Lightning's no-op
                setattr(callback, name, self.wrap(getattr(callback, name)))
                self.timed_hooks += 1

    def wrap(self, hook):
        def timed(*args, **kwargs):
            t = time.perf_counter_ns()
            try:
                return hook(*args, **kwargs)
            finally:
                self.current_ns += time.perf_counter_ns() - t

        return timed

    def on_train_batch_end(self, *args, **kwargs):
        self.per_step_ns.append(self.current_ns)
        self.current_ns = 0


ONE_TIME_HOOKS = ("setup", "on_fit_start", "on_train_start", "on_train_end", "on_fit_end", "teardown")


def one_time_ms(picture: bool, logdir: str) -> float:
    """Milliseconds spent in the once-per-fit hooks of both callbacks (setup, teardown with the summary
    JSON, and with ``picture`` the report picture), in a short fit with a TensorBoardLogger."""
    spent = [0.0]
    ps = PowerSampler(sensors="estimate", interval_s=0.1, print_summary=False, report_picture=picture)
    callbacks = [ps, EfficiencyLogger()]
    for callback in callbacks:
        for name in ONE_TIME_HOOKS:
            hook = getattr(callback, name)

            def timed(*args, _hook=hook, **kwargs):
                t = time.perf_counter()
                try:
                    return _hook(*args, **kwargs)
                finally:
                    spent[0] += time.perf_counter() - t

            setattr(callback, name, timed)
    data = TensorDataset(torch.randn(64 * 8, 64), torch.randint(0, 10, (64 * 8,)))
    trainer = Trainer(
        max_steps=20,
        accelerator="cpu",
        devices=1,
        logger=TensorBoardLogger(logdir),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=callbacks,
    )
    trainer.fit(MLP(64), DataLoader(data, batch_size=64))
    return spent[0] * 1000


def one_run(
    width: int,
    batch: int,
    steps: int,
    with_energy: bool,
    sensors: str,
    logdir: str,
    accelerator: str = "cpu",
    noop: bool = False,
) -> dict:
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(batch * 64, width), torch.randint(0, 10, (batch * 64,)))
    timer = StepTimer()
    callbacks: list[Callback] = []
    hook_timer = empty_timer = None
    if noop:
        callbacks += [NoOp(), NoOp()]
    if with_energy:
        ps = PowerSampler(
            sensors=[SimulatedSensor(100.0)] if sensors == "simulated" else sensors, interval_s=0.1, print_summary=False
        )
        eff = EfficiencyLogger()
        empty = EmptyHook()
        callbacks += [ps, eff, empty]
        hook_timer, empty_timer = HookTimer([ps, eff]), HookTimer([empty])
        callbacks += [hook_timer, empty_timer]
    trainer = Trainer(
        max_steps=steps,
        accelerator=accelerator,
        devices=1,
        logger=TensorBoardLogger(logdir),
        log_every_n_steps=LOG_EVERY_N_STEPS,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=callbacks + [timer],
    )
    trainer.fit(MLP(width), DataLoader(data, batch_size=batch, shuffle=True))
    out = {
        "step_times": timer.step_times(),
        "hook_ns_per_step": hook_timer.per_step_ns if hook_timer else [],
        "empty_ns_per_step": empty_timer.per_step_ns if hook_timer else [],
        "timed_hooks": hook_timer.timed_hooks if hook_timer else 0,
    }
    if with_energy:
        out["sources"] = callbacks[0].summary["sources"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds (repeats), >= 5 for a full run")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--sensors", default="auto", help="auto | estimate | simulated")
    parser.add_argument("--quick", action="store_true", help="development run: marks the JSON as quick")
    args = parser.parse_args()
    torch.set_num_threads(1)  # leave the second core to the sampler thread and the OS, as on a loaded machine
    per_round = {
        k: []
        for k in (
            "base_ms",
            "energy_ms",
            "noop_ms",
            "ratio",
            "ratio_noop",
            "ratio_vs_noop",
            "hook_median_us",
            "hook_mean_us",
            "hook_max_us",
            "empty_hook_us",
            "hook_mean_above_noop_us",
            "one_time_ms",
            "one_time_picture_ms",
        )
    }
    sources: list[str] = []
    timed_hooks = 0
    with tempfile.TemporaryDirectory() as logdir:
        one_run(args.width, args.batch, 20, False, args.sensors, logdir)  # warm-up, discarded
        medians: dict[str, float] = {}
        for _r, config in interleaved(("base", "energy", "noop"), args.rounds):
            res = one_run(
                args.width, args.batch, args.steps, config == "energy", args.sensors, logdir, noop=config == "noop"
            )
            medians[config] = statistics.median(res["step_times"])
            if config == "energy":
                hook_us = [ns / 1000 for ns in res["hook_ns_per_step"]]
                per_round["hook_median_us"].append(statistics.median(hook_us))
                per_round["hook_mean_us"].append(statistics.mean(hook_us))
                per_round["hook_max_us"].append(max(hook_us))
                empty_us = statistics.median(ns / 1000 for ns in res["empty_ns_per_step"])
                per_round["empty_hook_us"].append(empty_us)
                # Lightning calls every hook of every callback, a no-op where it is not overridden: what
                # our hooks cost above that is their time less one empty hook's (call and timer) each
                above_noop_us = statistics.mean(hook_us) - res["timed_hooks"] * empty_us
                per_round["hook_mean_above_noop_us"].append(above_noop_us)
                timed_hooks = res["timed_hooks"]
                sources = res["sources"]
            if len(medians) == 3:  # the round is complete
                per_round["base_ms"].append(medians["base"] * 1000)
                per_round["energy_ms"].append(medians["energy"] * 1000)
                per_round["noop_ms"].append(medians["noop"] * 1000)
                per_round["ratio"].append(medians["energy"] / medians["base"])
                per_round["ratio_noop"].append(medians["noop"] / medians["base"])
                per_round["ratio_vs_noop"].append(medians["energy"] / medians["noop"])
                medians = {}
        one_time_ms(False, logdir)  # warm-up: first imports, discarded
        for _, picture in interleaved((False, True), args.rounds):
            per_round["one_time_picture_ms" if picture else "one_time_ms"].append(one_time_ms(picture, logdir))
    s = {k: summarize(v) for k, v in per_round.items()}
    figures = [
        ("median step, no callbacks (ms)", "base_ms", "~10 ms"),
        ("median step, PowerSampler+EfficiencyLogger (ms)", "energy_ms", ""),
        ("ratio of medians", "ratio", "<= 1.005"),
        ("median step, two no-op callbacks (ms)", "noop_ms", "reported"),
        ("ratio two no-op callbacks / none (Lightning's dispatch)", "ratio_noop", "reported"),
        ("hook cost per step, median (us)", "hook_median_us", "<= 20"),
        (f"hook cost per step, mean incl. log steps every {LOG_EVERY_N_STEPS} (us)", "hook_mean_us", "<= 15"),
        ("slowest step's hooks (a log step, us)", "hook_max_us", "reported"),
        ("an empty per-step hook, same timer, median (us)", "empty_hook_us", "reported"),
        (
            "hook cost per step above Lightning's no-op dispatch, mean incl. log steps (us)",
            "hook_mean_above_noop_us",
            "<= 15",
        ),
        ("one-time hooks per fit, summary JSON (ms)", "one_time_ms", "<= 50"),
        ("one-time hooks per fit, with the report picture (ms)", "one_time_picture_ms", "<= 1000"),
    ]
    print(
        table(
            [
                {"figure": f, "min": s[k]["min"], "median": s[k]["median"], "max": s[k]["max"], "goal": g}
                for f, k, g in figures
            ]
        )
    )
    print(
        f"sensor sources: {sources}; {args.rounds} interleaved rounds x {args.steps} steps; sampling at 10 Hz; "
        f"log_every_n_steps={LOG_EVERY_N_STEPS}"
    )
    write(
        "overhead",
        {
            "rounds": args.rounds,
            "steps_per_run": args.steps,
            "width": args.width,
            "batch": args.batch,
            "interval_s": 0.1,
            "log_every_n_steps": LOG_EVERY_N_STEPS,
            "sensors": args.sensors,
            "sources": sources,
            "median_step_ms_baseline": s["base_ms"],
            "median_step_ms_with_callbacks": s["energy_ms"],
            "ratio_of_medians": s["ratio"],
            "goal_ratio": 1.005,
            "meets_ratio_goal": met(s["ratio"], "<=", 1.005),
            "median_step_ms_two_noop_callbacks": s["noop_ms"],
            "ratio_noop_callbacks": s["ratio_noop"],
            "ratio_vs_noop_callbacks": s["ratio_vs_noop"],
            "hook_us_per_step_median": s["hook_median_us"],
            "goal_hook_us": 20.0,
            "meets_hook_goal": met(s["hook_median_us"], "<=", 20.0),
            "hook_us_per_step_mean_incl_log_steps": s["hook_mean_us"],
            "goal_hook_mean_us": 15.0,
            "meets_hook_mean_goal": met(s["hook_mean_us"], "<=", 15.0),
            "hook_us_slowest_step": s["hook_max_us"],
            "empty_hook_us_per_step_median": s["empty_hook_us"],
            "timed_hooks_per_step": timed_hooks,
            "hook_us_per_step_mean_above_noop": s["hook_mean_above_noop_us"],
            "meets_hook_mean_above_noop_goal": met(s["hook_mean_above_noop_us"], "<=", 15.0),
            "one_time_ms": s["one_time_ms"],
            "meets_one_time_goal": met(s["one_time_ms"], "<=", 50.0),
            "one_time_ms_with_picture": s["one_time_picture_ms"],
            "meets_picture_goal": met(s["one_time_picture_ms"], "<=", 1000.0),
        },
        repeats=args.rounds,
        quick=args.quick,
    )


if __name__ == "__main__":
    main()
