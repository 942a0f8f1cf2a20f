"""QAT against post-training quantization on a tiny byte-level GPT, on this machine's CPU.

1. A float baseline is trained for ``--steps`` steps.
2. PTQ: for each scheme in ``--schemes``, the baseline is quantized as it is (``torchao.quantize_``
   with the scheme's base config).
3. From the baseline, a plain float fine-tune and one QAT fine-tune per scheme
   (``QuantizationAwareTraining``, embeddings included) train for ``--finetune-steps`` steps,
   interleaved in chunks of ``--chunk`` steps (one ``trainer.fit`` per chunk, rotating who goes
   first), so all see the same machine state; they also see the same batches (data modules with
   the same seed).

Figures, per scheme: eval loss on the same validation batches; recovery
``(loss_PTQ - loss_QAT_converted) / (loss_PTQ - loss_float_finetuned)`` (goal >= 70 %); step time
QAT / float (goal <= 1.3), the median over step pairs of a plain loop that alternates one QAT and
one float step on the same batches (the chunked Lightning figure is kept beside it; both suffer when
other processes load the machine, see the load averages in the JSON); converted / float state-dict size
(goal <= 0.30); energy per inference (EPI, joules per sample) of the converted / float model as the
QAT callback measured it with a ``PowerSampler`` on the CPU estimate sensor (labelled ``estimate``:
a utilisation model, not a measurement); and the fine-tunes' training energy from the same sensor.

Prints a table and writes ``benchmarks/results/qat.json``. About 3 minutes on an idle 2-core CPU
with the defaults (``--quick``: about 1 minute).

    python benchmarks/qat.py [--schemes int8_dynamic_int4_weight,int4_weight_only] [--steps 1000] ...
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "examples"), str(ROOT / "benchmarks")]

import _common  # noqa: E402

from tinygpt_model import ByteDataModule, TinyGPT, count_parameters  # noqa: E402

from lightning_green import PowerSampler  # noqa: E402
from lightning_green.quantization import QuantizationAwareTraining, _torchao, state_dict_size_bytes  # noqa: E402

try:
    from lightning_green.sensors import CpuEstimateSensor as _EnergySensor  # noqa: E402

    SENSOR_KW: dict = {}
except ImportError:  # the estimate sensor is missing: fall back to a labelled simulation
    from lightning_green.sensors import SimulatedSensor as _EnergySensor  # noqa: E402

    SENSOR_KW = {"power_w": 100.0}

LOAD_AT_START = os.getloadavg()[0]  # other processes on the machine skew the timing figures
GOALS = {"recovery": 0.70, "step_time_ratio": 1.30, "size_ratio": 0.30}


class StepTimer(Callback):
    """Wall time of every training step (batch start to batch end), by global step."""

    def __init__(self) -> None:
        self.times_s: list[float] = []
        self._t0 = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times_s.append(time.perf_counter() - self._t0)


class EnergyTally(Callback):
    """Energy of training (fit start to train end) on the Trainer's PowerSampler, summed over fits."""

    def __init__(self, sampler: PowerSampler) -> None:
        self.sampler, self.energy_j, self._start_j = sampler, 0.0, 0.0

    def on_fit_start(self, trainer, pl_module):
        self._start_j = self.sampler.energy_now_j()

    def on_train_end(self, trainer, pl_module):
        self.energy_j += self.sampler.energy_now_j() - self._start_j


def machine_info() -> dict:
    import lightning
    import torchao

    return {
        **_common.machine(),
        "processor": platform.processor(),
        "torch_threads": torch.get_num_threads(),
        "torchao": torchao.__version__,
        "lightning": lightning.__version__,
        "load_average_1min_at_start": LOAD_AT_START,
        "load_average_1min_at_end": os.getloadavg()[0],
    }


def trainer_for(max_steps: int, callbacks: list, eval_batches: int = 0) -> Trainer:
    return Trainer(
        max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=eval_batches, callbacks=callbacks,
    )  # fmt: skip


def interleaved_step_times(qat: QuantizationAwareTraining, float_model: TinyGPT, batches: list, lr: float) -> dict:
    """Step time (forward, backward, AdamW step) of a QAT-prepared copy and a float copy of
    ``float_model``, alternating one step each on the same batches so both see the same machine load.

    ``ratio`` is the median over step pairs of QAT time / float time: a pair runs back to back, so a
    slow spell from other processes mostly hits both sides of a pair and cancels out.
    """
    models = {"float": copy.deepcopy(float_model), "qat": qat.prepare(copy.deepcopy(float_model))}
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=lr) for name, m in models.items()}
    times: dict[str, list[float]] = {"qat": [], "float": []}
    for i, batch in enumerate(batches):
        for name in (("qat", "float") if i % 2 == 0 else ("float", "qat")):
            t0 = time.perf_counter()
            loss = models[name].loss(batch)
            loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            if i >= 3:  # warm-up
                times[name].append(time.perf_counter() - t0)
    return {
        "ratio": statistics.median(q / f for q, f in zip(times["qat"], times["float"])),
        "qat": statistics.median(times["qat"]),
        "float": statistics.median(times["float"]),
        "qat_min": min(times["qat"]),
        "float_min": min(times["float"]),
        "steps_each": len(times["qat"]),
    }


@torch.inference_mode()
def eval_loss(model: TinyGPT, batches: list) -> float:
    model.eval()
    losses = [float(model.loss(batch)) for batch in batches]
    model.train()
    return sum(losses) / len(losses)


def run(args: argparse.Namespace) -> dict:
    t_start = time.perf_counter()
    seed_everything(args.seed, verbose=False)
    schemes = [name.strip() for name in args.schemes.split(",") if name.strip()]
    arch = dict(n_layer=args.n_layer, n_head=args.n_head, d_model=args.d_model, block_size=args.block_size)
    data = dict(max_bytes=args.max_bytes, block_size=args.block_size, batch_size=args.batch_size)

    def datamodule(seed: int) -> ByteDataModule:
        dm = ByteDataModule(seed=seed, **data)
        dm.setup()
        return dm

    dm = datamodule(args.seed)
    val_batches = [b for _, b in zip(range(args.eval_batches), dm.val_dataloader())]
    samples = sum(int(x.shape[0]) for x, _ in val_batches)

    # 1. float baseline
    base = TinyGPT(lr=args.lr, warmup_steps=args.warmup, **arch)
    t0 = time.perf_counter()
    trainer_for(args.steps, []).fit(base, datamodule=dm)
    baseline_s = time.perf_counter() - t0
    state = copy.deepcopy(base.state_dict())
    loss_base = eval_loss(base, val_batches)
    size_float = state_dict_size_bytes(base)
    print(f"baseline: {args.steps} steps in {baseline_s:.0f} s, eval loss {loss_base:.4f}", flush=True)

    per_scheme: dict[str, dict] = {name: {} for name in schemes}
    train_batches = [b for _, b in zip(range(args.timing_steps + 3), datamodule(args.seed + 2).train_dataloader())]
    for name in schemes:
        # 2. PTQ of the baseline
        ptq = copy.deepcopy(base)
        _torchao.quantize(
            ptq, name, args.group_size,
            linear_filter=lambda m, _fqn: isinstance(m, nn.Linear),
            embedding_filter=lambda m, _fqn: isinstance(m, nn.Embedding),
        )  # fmt: skip
        per_scheme[name]["loss_ptq"] = eval_loss(ptq, val_batches)
        per_scheme[name]["size_ptq"] = state_dict_size_bytes(ptq)
        # step time, interleaved step by step (a plain loop: Lightning runs one fit at a time)
        probe = QuantizationAwareTraining(scheme=name, group_size=args.group_size, quantize_embeddings=True)
        per_scheme[name]["step_times"] = interleaved_step_times(probe, base, train_batches, args.ft_lr)

    # 3. float fine-tune and one QAT fine-tune per scheme, interleaved by chunks
    summary_dir = tempfile.mkdtemp(prefix="qat_bench_")
    runs = {}
    for name in ["float", *schemes]:
        model = TinyGPT(lr=args.ft_lr, **arch)
        model.load_state_dict(state)
        sampler = PowerSampler(
            sensors=[_EnergySensor(**SENSOR_KW)], interval_s=0.05, log_trace=False, print_summary=False,
            summary_dir=summary_dir,  # its JSON summaries are not this benchmark's output
        )  # fmt: skip
        timer, tally = StepTimer(), EnergyTally(sampler)
        callbacks = [sampler, timer, tally]
        qat = None
        if name != "float":
            qat = QuantizationAwareTraining(
                scheme=name, group_size=args.group_size, start_step=args.start_step,
                quantize_embeddings=True, convert_on_fit_end=False,
            )  # fmt: skip
            callbacks.append(qat)
        runs[name] = {
            "model": model, "timer": timer, "tally": tally, "qat": qat, "sampler": sampler, "steps": [],
            "trainer": trainer_for(0, callbacks, eval_batches=args.eval_batches), "dm": datamodule(args.seed + 1),
        }  # fmt: skip
    t0 = time.perf_counter()
    chunk_ends = list(range(args.chunk, args.finetune_steps, args.chunk)) + [args.finetune_steps]
    names = list(runs)
    for i, end in enumerate(chunk_ends):
        for name in names[i % len(names) :] + names[: i % len(names)]:  # rotate who goes first
            r = runs[name]
            r["trainer"].fit_loop.epoch_loop.max_steps = end
            if r["qat"] is not None and end == args.finetune_steps:
                r["qat"].convert_on_fit_end = True  # last chunk: convert and measure at the end of fit
            n_before = len(r["timer"].times_s)
            r["trainer"].fit(r["model"], datamodule=r["dm"])
            r["steps"] += r["timer"].times_s[n_before + min(3, end - n_before - 1) :]  # skip the chunk's warm-up
    finetune_s = time.perf_counter() - t0

    float_run = runs["float"]
    loss_ft = eval_loss(float_run["model"], val_batches)
    float_step_s = statistics.median(float_run["steps"])
    results: dict[str, dict] = {}
    goals: dict[str, dict] = {}
    for name in schemes:
        r, pre = runs[name], per_scheme[name]
        report = dict(r["qat"].report)
        loss_qat = eval_loss(r["model"], val_batches)
        denominator = pre["loss_ptq"] - loss_ft
        recovery = (pre["loss_ptq"] - loss_qat) / denominator if denominator > 0 else float("nan")
        step_times = pre["step_times"]
        epi_f, epi_c = report.get("epi_float_j"), report.get("epi_converted_j")
        results[name] = {
            "eval_loss": {
                "ptq": pre["loss_ptq"],
                "qat_float_before_convert": report.get("val_loss_float"),
                "qat_converted": loss_qat,
                "qat_converted_callback": report.get("val_loss_converted"),
            },
            "recovery": recovery,
            "step_time_ratio": step_times["ratio"],
            "step_time_s": {
                "interleaved_loop": step_times,
                "lightning_chunks": {"qat_median": statistics.median(r["steps"]), "float_median": float_step_s},
            },
            "step_time_ratio_lightning_chunks": statistics.median(r["steps"]) / float_step_s,
            "size_bytes": {"ptq": pre["size_ptq"], "qat_converted": report["size_bytes_after"]},
            "size_ratio": report["size_ratio"],
            "size_ratio_ptq": pre["size_ptq"] / size_float,
            "epi_j_per_sample": {"float": epi_f, "converted": epi_c, "samples": report.get("val_samples"),
                                 "source": report.get("epi_converted_source")},
            "epi_ratio": epi_c / epi_f if epi_f and epi_c else float("nan"),
            "train_energy_j": {"qat_finetune": report.get("energy_j"), "qat_finetune_tally": r["tally"].energy_j,
                               "float_finetune": float_run["tally"].energy_j, "source": report.get("energy_source")},
        }  # fmt: skip
        goals[name] = {
            "recovery": {"goal": f">= {GOALS['recovery']}", "met": bool(recovery >= GOALS["recovery"])},
            "step_time_ratio": {"goal": f"<= {GOALS['step_time_ratio']}",
                                "met": bool(results[name]["step_time_ratio"] <= GOALS["step_time_ratio"])},
            "size_ratio": {"goal": f"<= {GOALS['size_ratio']}", "met": bool(report["size_ratio"] <= GOALS["size_ratio"])},
        }  # fmt: skip
    return {
        "benchmark": "qat",
        "machine": machine_info(),
        "config": {**vars(args), "parameters": count_parameters(base), "eval_samples": samples,
                   "eval_tokens": samples * args.block_size, "energy_sensor": _EnergySensor.__name__},
        "figures": {
            "eval_loss": {"float_baseline": loss_base, "float_finetuned": loss_ft},
            "size_bytes_float": size_float,
            "float_finetune_step_s": float_step_s,
            "schemes": results,
        },
        "goals": goals,
        "timing_s": {"baseline": baseline_s, "finetunes": finetune_s, "total": time.perf_counter() - t_start},
    }  # fmt: skip


def print_table(result: dict) -> None:
    f, cfg = result["figures"], result["config"]
    schemes = list(f["schemes"])
    print(
        f"\nQAT benchmark: tiny GPT {cfg['parameters'] / 1e6:.2f} M params, group_size={cfg['group_size']}, "
        f"{cfg['steps']} baseline + {cfg['finetune_steps']} fine-tune steps; "
        f"{result['machine']['cpu']}, {result['machine']['cores']} cores"
    )
    print(f"  eval loss (nats/byte): float baseline {f['eval_loss']['float_baseline']:.4f}, "
          f"float fine-tuned {f['eval_loss']['float_finetuned']:.4f}")  # fmt: skip

    def cell(name: str, key: str) -> str:
        s = f["schemes"][name]
        if key == "ptq":
            return f"{s['eval_loss']['ptq']:.4f}"
        if key == "qat":
            return f"{s['eval_loss']['qat_converted']:.4f}"
        if key == "recovery":
            return f"{s['recovery']:.1%}"
        if key == "step":
            t = s["step_time_s"]["interleaved_loop"]
            return f"{s['step_time_ratio']:.2f} ({t['qat'] * 1e3:.0f}/{t['float'] * 1e3:.0f} ms)"
        if key == "step_l":
            return f"{s['step_time_ratio_lightning_chunks']:.2f}"
        if key == "size":
            return f"{s['size_ratio']:.3f}"
        if key == "epi":
            e = s["epi_j_per_sample"]
            return f"{s['epi_ratio']:.2f} ({e['source']})"
        if key == "energy":
            e = s["train_energy_j"]
            return f"{(e['qat_finetune'] or 0):.0f}/{e['float_finetune']:.0f} J"
        raise KeyError(key)

    rows = [
        ("eval loss, PTQ", "ptq", ""),
        ("eval loss, QAT converted", "qat", ""),
        ("recovery", "recovery", f"goal >= {GOALS['recovery']:.0%}"),
        ("step time QAT/float, interleaved", "step", f"goal <= {GOALS['step_time_ratio']}"),
        ("step time QAT/float, Lightning chunks", "step_l", ""),
        ("size converted/float", "size", f"goal <= {GOALS['size_ratio']}"),
        ("EPI converted/float", "epi", ""),
        ("fine-tune energy QAT/float", "energy", ""),
    ]
    width = max(len(r[0]) for r in rows)
    col = max(24, *(len(n) for n in schemes))
    print(f"  {'':<{width}}  " + "  ".join(f"{n:<{col}}" for n in schemes))
    for label, key, goal in rows:
        print(f"  {label:<{width}}  " + "  ".join(f"{cell(n, key):<{col}}" for n in schemes) + f"  {goal}")
    for name, g in result["goals"].items():
        print(f"  {name}: " + ", ".join(f"{k} {'met' if v['met'] else 'MISSED'}" for k, v in g.items()))
    print(f"  total {result['timing_s']['total']:.0f} s")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--schemes", default="int8_dynamic_int4_weight,int4_weight_only", help="comma-separated")
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--start-step", type=int, default=0)
    parser.add_argument("--steps", type=int, default=1000, help="float baseline steps")
    parser.add_argument("--finetune-steps", type=int, default=300)
    parser.add_argument("--chunk", type=int, default=50, help="fine-tune steps per interleaved fit")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--ft-lr", type=float, default=5e-4)
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-bytes", type=int, default=1_000_000)
    parser.add_argument("--eval-batches", type=int, default=32)
    parser.add_argument("--timing-steps", type=int, default=40, help="interleaved steps timed for each model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a smoke run: fewer steps (about 1 minute)")
    parser.add_argument("--out", default=None, help="JSON path; default benchmarks/results/qat.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.finetune_steps, args.chunk, args.timing_steps, args.eval_batches = 300, 60, 30, 12, 12
    result = run(args)
    print_table(result)
    if args.out is None:
        _common.write("qat", {k: v for k, v in result.items() if k != "benchmark"})
    else:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
