"""What only an NVIDIA GPU can show: one script, a few minutes.

1. NVML energy counter against integrated polled power over the same windows, while the GPU runs a
   load that changes (idle, full, bursts), both sensors read by the same sampler thread.
2. Whether power limits can be set here (read bounds and the limit, lower it, restore it).
3. Overhead of PowerSampler + EfficiencyLogger with real NVML: interleaved runs, ratio of medians.
4. QAT on CUDA: the callback prepares, trains, converts a tiny GPT (needs torchao).

Where there is no NVIDIA GPU (or no NVML) it says so and exits with status 0. Results go to
benchmarks/results/gpu_check.json.

Checks 1 and 3 run ``--repeats`` times (3 as interleaved rounds); the JSON keeps min/median/max.

    python benchmarks/gpu_check.py [--seconds 12] [--repeats 5] [--skip-qat]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import traceback

from _common import MIN_REPEATS, summarize, table, write


def _gpu_load(seconds: float, duty: float, size: int = 8192) -> None:
    """Matmuls on cuda:0 for ``seconds``, busy ``duty`` of each 200 ms period."""
    import torch

    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        busy_until = time.monotonic() + 0.2 * duty
        while time.monotonic() < busy_until:
            a = (a @ a).clamp_(-1, 1)
            torch.cuda.synchronize()
        time.sleep(0.2 * (1 - duty))


def counter_vs_polled_repeated(seconds: float, repeats: int) -> dict:
    runs = [counter_vs_polled(seconds) for _ in range(repeats)]
    rows = [
        {
            "window": row["window"],
            **{
                k: summarize(r["rows"][i][k] for r in runs)
                for k in ("seconds", "counter_j", "polled_j", "polled_over_counter", "mean_w_counter")
            },
        }
        for i, row in enumerate(runs[0]["rows"])
    ]
    return {**runs[0], "rows": rows}


def counter_vs_polled(seconds: float) -> dict:
    from lightning_green.energy import EnergyMeter, Sampler
    from lightning_green.sensors import NvmlSensor

    counter = NvmlSensor(0)
    polled = NvmlSensor(0, name="gpu0_polled", use_counter=False)
    meter = EnergyMeter(extrapolate_s=0.05)
    sampler = Sampler([counter, polled], meter, interval_s=0.05)
    sampler.start()
    marks = [("start", time.monotonic())]
    phases = [("idle", 0.0), ("full", 1.0), ("bursts 50%", 0.5), ("bursts 20%", 0.2)]
    for name, duty in phases:
        if duty == 0:
            time.sleep(seconds / len(phases))
        else:
            _gpu_load(seconds / len(phases), duty)
        marks.append((name, time.monotonic()))
    time.sleep(0.3)
    sampler.stop()
    rows = []
    for (_, t0), (name, t1) in zip(marks, marks[1:], strict=False):
        c = meter.energy_between(t0, t1, ["gpu0"])
        p = meter.energy_between(t0, t1, ["gpu0_polled"])
        rows.append(
            {
                "window": name,
                "seconds": t1 - t0,
                "counter_j": c,
                "polled_j": p,
                "polled_over_counter": p / c if c else float("nan"),
                "mean_w_counter": c / (t1 - t0),
            }
        )
    t0, t1 = marks[0][1], marks[-1][1]
    c, p = meter.energy_between(t0, t1, ["gpu0"]), meter.energy_between(t0, t1, ["gpu0_polled"])
    rows.append(
        {
            "window": "all",
            "seconds": t1 - t0,
            "counter_j": c,
            "polled_j": p,
            "polled_over_counter": p / c if c else float("nan"),
            "mean_w_counter": c / (t1 - t0),
        }
    )
    model = getattr(counter, "model", "")
    counter.close()
    polled.close()
    return {"gpu": model, "interval_s": 0.05, "rows": rows, "source": "counter vs polled"}


def power_limits() -> dict:
    import torch

    from lightning_green.power_limit import NvmlPowerControl

    control = NvmlPowerControl(0)
    control.attach(torch.device("cuda", 0))
    out = {}
    try:
        lo, hi = control.bounds_w()
        now = control.get_limit_w()
        out.update(bounds_w=[lo, hi], limit_w=now)
        target = max(lo, now - 50.0)
        control.set_limit_w(target)
        out["set_to_w"] = control.get_limit_w()
        out["restored"] = control.restore()
        out["after_restore_w"] = control.get_limit_w()
        out["can_set"] = abs(out["set_to_w"] - target) < 1.0
    except Exception as err:  # noqa: BLE001 - the point is to report what happens
        out.update(can_set=False, error=f"{type(err).__name__}: {err}")
        try:
            control.restore()
        except Exception:  # noqa: BLE001
            pass
    finally:
        control.close()
    return out


def overhead(rounds: int, steps: int) -> dict:
    sys.argv = sys.argv[:1]
    import tempfile

    import overhead as ov

    base, energy, ratios, sources = [], [], [], []
    with tempfile.TemporaryDirectory() as logdir:
        ov.one_run(2048, 256, 20, False, "auto", logdir, accelerator="cuda")
        for r in range(rounds):
            medians = {}
            for with_energy in (False, True) if r % 2 == 0 else (True, False):
                res = ov.one_run(2048, 256, steps, with_energy, "auto", logdir, accelerator="cuda")
                medians[with_energy] = statistics.median(res["step_times"])
                if with_energy:
                    sources = res["sources"]
            base.append(medians[False] * 1000)
            energy.append(medians[True] * 1000)
            ratios.append(medians[True] / medians[False])
    return {
        "median_step_ms_baseline": summarize(base),
        "median_step_ms_with_callbacks": summarize(energy),
        "ratio_of_medians": summarize(ratios),
        "sources": sources,
    }


def qat_on_cuda(steps: int) -> dict:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
    import lightning as L
    from tinygpt_model import ByteDataModule, TinyGPT

    from lightning_green import PowerSampler, QuantizationAwareTraining

    L.seed_everything(0)
    data = ByteDataModule(max_bytes=400_000, block_size=128, batch_size=32)
    model = TinyGPT(block_size=128)
    qat = QuantizationAwareTraining(start_step=steps // 2)
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cuda",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_val_batches=5,
        val_check_interval=steps,
        num_sanity_val_steps=0,
        callbacks=[PowerSampler(print_summary=False), qat],
    )
    trainer.fit(model, datamodule=data)
    return {k: v for k, v in qat.report.items() if isinstance(v, (int, float, str))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=12.0, help="length of the counter-vs-polled load")
    parser.add_argument(
        "--repeats", type=int, default=MIN_REPEATS, help="counter-vs-polled runs and interleaved overhead rounds"
    )
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--skip-qat", action="store_true")
    args = parser.parse_args()
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if not has_gpu:
        print("gpu_check: no CUDA GPU on this machine; nothing to check (exit 0).")
        return
    try:
        from lightning_green.sensors.nvml import visible_gpu_indices

        visible_gpu_indices()
    except Exception as err:  # noqa: BLE001
        print(f"gpu_check: CUDA is present but NVML is not usable ({err}); nothing to check (exit 0).")
        return
    results: dict = {}
    for name, fn in (
        ("counter_vs_polled", lambda: counter_vs_polled_repeated(args.seconds, args.repeats)),
        ("power_limits", power_limits),
        ("overhead", lambda: overhead(args.repeats, args.steps)),
        ("qat_cuda", None if args.skip_qat else lambda: qat_on_cuda(args.steps)),
    ):
        if fn is None:
            continue
        t = time.monotonic()
        try:
            results[name] = fn()
        except Exception as err:  # noqa: BLE001 - report each check, keep going
            results[name] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(limit=3)}
        results[name]["check_seconds"] = time.monotonic() - t
        print(f"\n== {name} ==")
        res = results[name]
        rows = res["rows"] if "rows" in res else [{"figure": k, "value": v} for k, v in res.items() if k != "traceback"]
        print(table([{k: v["median"] if isinstance(v, dict) else v for k, v in row.items()} for row in rows]))
    write("gpu_check", results, repeats=args.repeats)


if __name__ == "__main__":
    main()
