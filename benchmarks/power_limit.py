"""Power-limit search on the simulated device: does it pick the cost-optimal limit, and what does it save?

    python benchmarks/power_limit.py [--no-live] [--repeats 5]

Analytic part: the Trainer-free :class:`~lightning_green.power_limit.LimitSearch` is fed the exact per-step energy
and time of :class:`~lightning_green.power_limit.SimulatedPowerControl`'s documented model (bounds
150-400 W, 25 W grid) for several ``eta`` and ``max_slowdown`` settings. Its choice is compared with
the optimum over a 0.5 W grid (goal: within one grid step), and energy saved and slowdown are
reported against the highest limit.

Live part: the same search inside a Trainer
(``strategy=EnergyAwareDDPStrategy(power_limit=PowerLimitSearch("search", ...))``,
which installs the PowerLimitSearch callback; one process, a PowerSampler reading the simulated sensor,
simulated steps of ``STEP_S`` (100 ms) at the highest limit, ``SETTLE_STEPS`` unmeasured steps after
every limit change as Zeus does). Real step time adds a few milliseconds at the same power to every
step, which favours lower limits: on the 50 W grid the model's costs at 300 W and 250 W differ by
0.5 %, so with 40 ms steps those milliseconds decided the choice; at 100 ms the model's optimum
holds against up to about 8 ms of overhead per step. The analytic part is exact arithmetic (one run
says it all); the live part runs ``--repeats`` times and the JSON keeps min/median/max of its figures
and how many runs chose the optimum. Prints a table and writes ``benchmarks/results/power_limit.json``; a few seconds.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import MIN_REPEATS, summarize, table, write  # noqa: E402

from lightning_green.power_limit import LimitSearch, SimulatedPowerControl, limit_grid  # noqa: E402

MIN_W, MAX_W, GRID_W, STEP_S = 150.0, 400.0, 25.0, 0.1
LIVE_GRID_W, WARMUP_STEPS, SETTLE_STEPS, PROFILE_STEPS, AFTER_STEPS = 50.0, 2, 2, 4, 4  # the live search's schedule
SETTINGS = [{"eta": e} for e in (0.0, 0.25, 0.5, 0.75, 1.0)] + [{"max_slowdown": m} for m in (1.05, 1.10, 1.25)]


def analytic(control: SimulatedPowerControl, setting: dict) -> dict:
    eta, max_slowdown = setting.get("eta", 0.5), setting.get("max_slowdown")
    # exact model figures: nothing to settle
    search = LimitSearch(
        limit_grid(MIN_W, MAX_W, GRID_W),
        warmup_steps=0,
        profile_steps=1,
        settle_steps=0,
        eta=eta,
        max_slowdown=max_slowdown,
        p_max_w=MAX_W,
    )
    steps = 0
    while not search.done:
        if search.due(steps):
            if search.profiling_w is not None:
                w = search.profiling_w
                search.record(control.energy_per_step_j(w, STEP_S), control.step_time_s(w, STEP_S), 1)
            search.start_next(steps)
        steps += 1
    fine = [MIN_W + 0.5 * i for i in range(int((MAX_W - MIN_W) / 0.5) + 1)]
    t_max = control.step_time_s(MAX_W, STEP_S)
    if max_slowdown is None:
        best = min(
            fine,
            key=lambda w: (
                eta * control.energy_per_step_j(w, STEP_S) + (1 - eta) * MAX_W * control.step_time_s(w, STEP_S)
            ),
        )
    else:
        best = min(
            (w for w in fine if control.step_time_s(w, STEP_S) <= max_slowdown * t_max),
            key=lambda w: control.energy_per_step_j(w, STEP_S),
        )
    chosen = search.chosen_w
    e_max, e = control.energy_per_step_j(MAX_W, STEP_S), control.energy_per_step_j(chosen, STEP_S)
    return {
        "setting": ", ".join(f"{k}={v}" for k, v in setting.items()),
        "chosen_w": chosen,
        "optimum_w": best,
        "within_one_step": abs(chosen - best) <= GRID_W,
        "energy_saved_pct": 100 * (1 - e / e_max),
        "slowdown": control.step_time_s(chosen, STEP_S) / t_max,
        "profiled_limits": len(search.profiles),
    }


def live() -> dict:
    from lightning.pytorch import Trainer
    from lightning.pytorch.demos.boring_classes import BoringModel

    from lightning_green import PowerLimitSearch, PowerSampler
    from lightning_green.strategies import EnergyAwareDDPStrategy

    control = SimulatedPowerControl(min_w=MIN_W, max_w=MAX_W, step_s=STEP_S)
    sampler = PowerSampler(
        sensors=[control.sensor()], interval_s=0.01, print_summary=False, summary_dir=tempfile.mkdtemp()
    )
    search_cb = PowerLimitSearch(
        "search",
        power_control=control,
        warmup_steps=WARMUP_STEPS,
        settle_steps=SETTLE_STEPS,
        profile_steps=PROFILE_STEPS,
        limit_step_w=LIVE_GRID_W,
        cache=False,
    )
    strategy = EnergyAwareDDPStrategy(power_limit=search_cb)
    n_limits = len(limit_grid(MIN_W, MAX_W, LIVE_GRID_W))
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        strategy=strategy,
        max_steps=WARMUP_STEPS + n_limits * (SETTLE_STEPS + PROFILE_STEPS) + AFTER_STEPS,
        logger=False,
        callbacks=[sampler],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tempfile.mkdtemp(),
    )
    trainer.fit(BoringModel())
    search = search_cb.search  # the PowerLimitSearch callback's LimitSearch
    if not search.done:
        raise RuntimeError(f"the live search did not finish in {trainer.global_step} steps: raise max_steps")
    rows = [
        {
            "limit_w": p.limit_w,
            "measured_j_per_step": p.energy_per_step_j,
            "model_j_per_step": control.energy_per_step_j(p.limit_w),
            "measured_s_per_step": p.time_per_step_s,
            "model_s_per_step": control.step_time_s(p.limit_w),
        }
        for p in search.profiles
    ]
    best = min(
        limit_grid(MIN_W, MAX_W, LIVE_GRID_W),
        key=lambda w: 0.5 * control.energy_per_step_j(w) + 0.5 * MAX_W * control.step_time_s(w),
    )
    return {
        "chosen_w": search.chosen_w,
        "model_optimum_on_grid_w": best,
        "grid_w": LIVE_GRID_W,
        "rows": rows,
        "restored_limit_w": control.get_limit_w(),
        "steps": trainer.global_step,
    }


def live_repeated(repeats: int) -> dict:
    runs = [live() for _ in range(repeats)]
    optimum = runs[0]["model_optimum_on_grid_w"]
    return {
        "chosen_w": summarize(r["chosen_w"] for r in runs),
        "model_optimum_on_grid_w": optimum,
        "grid_w": runs[0]["grid_w"],
        "runs_choosing_optimum": sum(r["chosen_w"] == optimum for r in runs),
        "restored_limit_w": summarize(r["restored_limit_w"] for r in runs),
        "schedule": {
            "warmup_steps": WARMUP_STEPS,
            "settle_steps": SETTLE_STEPS,
            "profile_steps": PROFILE_STEPS,
            "steps": runs[0]["steps"],
        },
        "rows": runs[-1]["rows"],
        "runs": [{"chosen_w": r["chosen_w"], "restored_limit_w": r["restored_limit_w"]} for r in runs],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-live", action="store_true", help="skip the Trainer run")
    parser.add_argument("--repeats", type=int, default=MIN_REPEATS, help="live runs")
    parser.add_argument("--quick", action="store_true", help="development run: marks the JSON as quick")
    args = parser.parse_args()
    control = SimulatedPowerControl(min_w=MIN_W, max_w=MAX_W)
    rows = [analytic(control, s) for s in SETTINGS]
    print(table(rows))
    result = {
        "model": {
            "min_w": MIN_W,
            "max_w": MAX_W,
            "demand_w": control.demand_w,
            "static_w": control.static_w,
            "beta": control.beta,
            "step_s": STEP_S,
            "grid_w": GRID_W,
        },
        "analytic": rows,
        "goal_within_one_grid_step": all(r["within_one_step"] for r in rows),
    }
    if not args.no_live:
        result["live"] = live = live_repeated(args.repeats)
        print()
        print(table(live["rows"]))
        chosen_w = [r["chosen_w"] for r in live["runs"]]
        optimum_w = live["model_optimum_on_grid_w"]
        print(f"live, {args.repeats} runs: chose {chosen_w} W; the model's optimum on the 50 W grid is {optimum_w:g} W")
    print(f"goal (analytic choice within one {GRID_W:g} W step of the optimum): {result['goal_within_one_grid_step']}")
    write("power_limit", result, repeats=args.repeats, quick=args.quick)


if __name__ == "__main__":
    main()
