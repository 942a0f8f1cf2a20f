"""Print the README's Results section (markdown) from benchmarks/results/*.json.

    python benchmarks/report.py            # paste under "## Results"
"""

from __future__ import annotations

import json
import os

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def load(name: str) -> dict | None:
    path = os.path.join(RESULTS, f"{name}.json")
    return json.load(open(path)) if os.path.exists(path) else None


def yes(ok) -> str:
    return "met" if ok else "**missed**"


def main() -> None:
    lines = []
    machines = {}
    for name in ("overhead", "integration", "phases", "ddp_comm", "power_limit", "qat", "gpu_check"):
        d = load(name)
        if d:
            m = d["machine"]
            machines[name] = f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['device']}, {m['date']}"
    lines.append("| figure | goal | measured | status | where |")
    lines.append("|---|---|---|---|---|")
    if (d := load("overhead")):
        lines.append(f"| step-time ratio with PowerSampler + EfficiencyLogger, ~10 ms CPU step, 10 Hz | ≤ 1.005 | {d['ratio_of_medians']:.4f} (median {d['median_step_ms_with_callbacks']:.2f} vs {d['median_step_ms_baseline']:.2f} ms, {d['rounds']} interleaved rounds) | {yes(d['meets_ratio_goal'])} | CPU, sensor `{'+'.join(d['sources'])}` |")
        if "ratio_vs_noop_callbacks" in d:
            lines.append(f"| same, against two callbacks that override nothing (Lightning's own dispatch cost, {d['ratio_noop_callbacks']:.4f} × no callbacks) | reported | {d['ratio_vs_noop_callbacks']:.4f} | reported | CPU |")
        lines.append(f"| hook cost per training step (median; mean with log steps) | ≤ 20 µs | {d['hook_us_per_step_median']:.1f} µs; {d['hook_us_per_step_mean_incl_log_steps']:.1f} µs | {yes(d['meets_hook_goal'])} | CPU |")
    if (d := load("integration")):
        smooth = [r for r in d["rows"] if r["smooth"]]
        worst = max(r["error_pct"] for r in smooth)
        sq = "; ".join(f"{r['trace'].split(', ')[1]}: {r['error_pct']:.2f} %" for r in d["rows"] if not r["smooth"])
        lines.append(f"| energy error vs analytic integral, smooth traces (constant, ramp, sine) at {d['interval_s']} s | ≤ 0.5 % | worst {worst:.3f} % | {yes(worst <= 0.5)} | `simulated` |")
        lines.append(f"| same, square wave 50/250 W near the sampling period | as is | {sq} | reported | `simulated` |")
    if (d := load("phases")):
        errs = [abs(r["error_points"]) for r in d["sweep"]]
        o = d["overhead"]
        lines.append(f"| data share follows a 0–50 ms dataloader sleep in a ~100 ms step | ±5 points | worst {max(errs):.1f} points | {yes(d['all_within_5_points'])} | `simulated` |")
        lines.append(f"| cost of `phases=True` | ≤ 1 % of step | hooks {o['phase_hook_us_per_step']:.1f} µs/step = {o['phase_hook_pct_of_step']:.3f} %; step ratio {o['ratio_of_medians']:.3f} | {yes(o['meets_goal'])} | CPU |")
    if (d := load("ddp_comm")):
        rows = {r["preset"]: r for r in d["rows"] if r.get("rank", 0) == 0}
        none = rows["none"]["bytes_per_step"]
        fp16 = rows["fp16"]["bytes_per_step"] / none
        psgd = rows["powersgd"]["bytes_per_step"] / none
        losses = ", ".join(f"{k} {v['held_out_loss']:.3f}" for k, v in rows.items())
        lines.append(f"| bytes per step, fp16 / none ({d['setup']['params']/1e6:.2f} M params, 2 ranks, gloo) | ≤ 0.5 | {fp16:.3f} | {yes(fp16 <= 0.5)} | CPU |")
        lines.append(f"| bytes per step, PowerSGD rank {d['setup']['powersgd_rank']} / none | ≤ 0.1 | {psgd:.4f} | {yes(psgd <= 0.1)} | CPU |")
        lines.append(f"| held-out loss after {d['setup']['steps']} steps (untrained {d['held_out_loss_untrained']:.3f}) | reported | {losses} | reported | CPU |")
    if (d := load("power_limit")):
        eta = next(r for r in d["analytic"] if r["setting"] == "eta=0.5")
        ok = all(r["within_one_step"] for r in d["analytic"])
        lines.append(f"| power-limit search picks the cost-optimal limit within one grid step ({d['model']['grid_w']:g} W), {len(d['analytic'])} settings | all | {sum(r['within_one_step'] for r in d['analytic'])}/{len(d['analytic'])}; eta 0.5: {eta['chosen_w']:g} W (optimum {eta['optimum_w']:g} W), {eta['energy_saved_pct']:.1f} % energy saved, slowdown {eta['slowdown']:.3f}× | {yes(ok)} | simulated power control |")
        live = d["live"]
        lines.append(f"| same, live in a Trainer with `ddp_green` | optimum on grid | chose {live['chosen_w']:g} W (optimum {live['model_optimum_on_grid_w']:g} W), restored to {live['restored_limit_w']:g} W | {yes(live['chosen_w'] == live['model_optimum_on_grid_w'])} | simulated power control |")
    if (d := load("qat")):
        scheme, src = d["config"]["scheme"], d["energy_source"]
        labels = {"decode_ratio_b1": "decode time per token converted / float (batch 1, 64 new tokens)",
                  "prefill_ratio": "prefill time converted / float (8 x 64 tokens)", "callback_epi_ratio": "the callback's EPI converted / float",
                  "recovery": "loss recovery vs PTQ", "size_ratio": "converted size / float", "qat_step_ratio": "QAT step / float step"}
        for g in d["goals"]:
            spread = f" (min {g['min']:.3g}, max {g['max']:.3g}, {d['repeats']} repeats)" if g["min"] != g["max"] else ""
            lines.append(f"| QAT `{scheme}`, LitGPT GPT 512 wide: {labels[g['figure']]} | {g['goal']} | {g['median']:.3g}{spread} | {yes(g['met'])} | CPU{', `' + src + '`' if 'epi' in g['figure'] else ''} |")
    if (d := load("gpu_check")):
        lines.append(f"| GPU check | — | see benchmarks/results/gpu_check.json | — | {machines.get('gpu_check')} |")
    else:
        lines.append("| GPU: NVML counter vs polled power, power limits, overhead with real NVML, QAT on CUDA | — | not measured: no GPU was available to this work; `python benchmarks/gpu_check.py` does it | — | — |")
    lines.append("")
    lines.append("Machines: " + "; ".join(f"{k}: {v}" for k, v in machines.items()))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
