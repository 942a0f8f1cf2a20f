"""Power-limit search on the simulated device: does it pick the cost-optimal limit, and what does it save?

    python benchmarks/power_limit.py [--no-live]

Analytic part: :class:`~lightning_green.strategies.PowerLimitSearch` is fed the exact per-step energy
and time of :class:`~lightning_green.strategies.SimulatedPowerControl`'s documented model (bounds
150-400 W, 25 W grid) for several ``eta`` and ``max_slowdown`` settings. Its choice is compared with
the optimum over a 0.5 W grid (goal: within one grid step), and energy saved and slowdown are
reported against the highest limit.

Live part: the same search inside a Trainer (``strategy=EnergyAwareDDPStrategy(power_limit="search")``,
one process, a PowerSampler reading the simulated sensor, 40 ms simulated steps). Real step time adds
a few milliseconds at the same power, so the measured optimum can sit one grid step off the analytic
one. Prints a table and writes ``benchmarks/results/power_limit.json``; a few seconds.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import table, write  # noqa: E402

from lightning_green.strategies import PowerLimitSearch, SimulatedPowerControl, limit_grid  # noqa: E402

MIN_W, MAX_W, GRID_W, STEP_S = 150.0, 400.0, 25.0, 0.1
SETTINGS = [{"eta": e} for e in (0.0, 0.25, 0.5, 0.75, 1.0)] + [{"max_slowdown": m} for m in (1.05, 1.10, 1.25)]


def analytic(control: SimulatedPowerControl, setting: dict) -> dict:
    eta, max_slowdown = setting.get("eta", 0.5), setting.get("max_slowdown")
    search = PowerLimitSearch(limit_grid(MIN_W, MAX_W, GRID_W), warmup_steps=0, profile_steps=1, eta=eta, max_slowdown=max_slowdown, p_max_w=MAX_W)
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
        best = min(fine, key=lambda w: eta * control.energy_per_step_j(w, STEP_S) + (1 - eta) * MAX_W * control.step_time_s(w, STEP_S))
    else:
        best = min((w for w in fine if control.step_time_s(w, STEP_S) <= max_slowdown * t_max), key=lambda w: control.energy_per_step_j(w, STEP_S))
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

    from lightning_green import PowerSampler
    from lightning_green.strategies import EnergyAwareDDPStrategy

    control = SimulatedPowerControl(min_w=MIN_W, max_w=MAX_W, step_s=0.04)
    sampler = PowerSampler(sensors=[control.sensor()], interval_s=0.01, print_summary=False, summary_dir=tempfile.mkdtemp())
    strategy = EnergyAwareDDPStrategy(power_limit="search", power_control=control, warmup_steps=2, profile_steps=4, limit_step_w=50, power_limit_cache=False)
    trainer = Trainer(
        accelerator="cpu", devices=1, strategy=strategy, max_steps=2 + 6 * 4 + 4, logger=False, callbacks=[sampler],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tempfile.mkdtemp(),
    )
    trainer.fit(BoringModel())
    search = strategy.power_limiter.search
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
    best = min(limit_grid(MIN_W, MAX_W, 50), key=lambda w: 0.5 * control.energy_per_step_j(w) + 0.5 * MAX_W * control.step_time_s(w))
    return {"chosen_w": search.chosen_w, "model_optimum_on_grid_w": best, "grid_w": 50, "rows": rows, "restored_limit_w": control.get_limit_w()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-live", action="store_true", help="skip the Trainer run")
    args = parser.parse_args()
    t0 = time.monotonic()
    control = SimulatedPowerControl(min_w=MIN_W, max_w=MAX_W)
    rows = [analytic(control, s) for s in SETTINGS]
    print(table(rows))
    result = {
        "model": {"min_w": MIN_W, "max_w": MAX_W, "demand_w": control.demand_w, "static_w": control.static_w, "beta": control.beta, "step_s": STEP_S, "grid_w": GRID_W},
        "analytic": rows,
        "goal_within_one_grid_step": all(r["within_one_step"] for r in rows),
    }
    if not args.no_live:
        result["live"] = live()
        print()
        print(table(result["live"]["rows"]))
        print(f"live: chose {result['live']['chosen_w']:g} W; the model's optimum on the 50 W grid is {result['live']['model_optimum_on_grid_w']:g} W")
    print(f"goal (analytic choice within one {GRID_W:g} W step of the optimum): {result['goal_within_one_grid_step']}")
    result["seconds"] = time.monotonic() - t0
    write("power_limit", result)


if __name__ == "__main__":
    main()
