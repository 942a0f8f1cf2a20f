"""Train a tiny byte-level GPT and watch its energy: the lightning_green main example.

Defaults run on a CPU and need no download: the corpus is the Python standard library's own source
text. On a machine with an NVIDIA GPU the run uses it and reads its
energy counter through NVML; on a CPU without RAPL the CPU power is an *estimate*, and the summary
says so.

    python examples/tiny_gpt.py                         # CPU or one GPU
    python examples/tiny_gpt.py --devices 2 --strategy ddp_green   # two processes, energy summed
    python examples/tiny_gpt.py --max-steps 2000 --d-model 384 --n-layer 6   # bigger
    python examples/tiny_gpt.py --energy-budget-kj 5    # stop the fit when it has used 5 kJ
    python examples/tiny_gpt.py --prune 0.3             # remove 30 % of the MLP units during the fit
    tensorboard --logdir lightning_logs                 # energy, power, efficiency curves

What it adds to an unchanged LightningModule: PowerSampler (energy and power, by phase),
EfficiencyLogger (EER, EPI, tokens per joule, carbon, and the energy until val_loss first reaches
--target-val-loss), QuantizationAwareTraining (fake quantization from --qat-start-step on; scheme
"auto" picks the kernel that is measured fastest on this device, int8 on x86 CPU, and converts at
the end) and a TensorBoardLogger; with --energy-budget-kj, EnergyBudget (stops the fit at the budget
and logs the forecast of its total energy); with --prune, StructuredPruning (removes that share of the
prunable parameters, the MLP hidden units here, in --prune-events events from --prune-start-step to
--prune-end-step, before QAT starts, and reports training J per step before and after).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402
from tinygpt_model import ByteDataModule, TinyGPT  # noqa: E402

import lightning_green  # noqa: E402,F401  (registers "ddp_green")
from lightning_green import (  # noqa: E402
    EfficiencyLogger,
    EnergyBudget,
    PowerSampler,
    QuantizationAwareTraining,
    StructuredPruning,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--data", default=None, help="a text file to train on (default: the Python standard library's source)"
    )
    p.add_argument("--max-bytes", type=int, default=1_000_000, help="bytes of corpus to use")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--n-layer", type=int, default=3)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--val-every", type=int, default=250, help="validate every N training steps")
    p.add_argument("--val-batches", type=int, default=10)
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--devices", default="1")
    p.add_argument("--strategy", default="auto", help="auto | ddp_green | ddp_green_spawn | any Lightning strategy")
    p.add_argument("--interval-s", type=float, default=0.1, help="power sampling interval")
    p.add_argument("--no-phases", action="store_true", help="do not split energy by phase")
    p.add_argument("--no-qat", action="store_true", help="train in float only")
    p.add_argument("--qat-scheme", default="auto", help="auto | int8_dynamic | int8_dynamic_int4_weight | ...")
    p.add_argument("--qat-start-step", type=int, default=700, help="fake quantization starts at this step")
    p.add_argument("--carbon-intensity", type=float, default=475.0, help="gCO2e per kWh of your grid")
    p.add_argument("--pue", type=float, default=1.0, help="data-centre power usage effectiveness")
    p.add_argument(
        "--target-val-loss",
        type=float,
        default=2.5,
        help="report the energy and time until val_loss (nats per byte; ln 256 = 5.5 untrained) first reaches this",
    )
    p.add_argument(
        "--energy-budget-kj",
        type=float,
        default=None,
        help="stop the fit when all processes have used this many kJ (EnergyBudget); default: no budget",
    )
    p.add_argument(
        "--prune",
        type=float,
        default=None,
        help="share of the prunable parameters to remove during the fit, in (0, 1) (StructuredPruning); default: off",
    )
    p.add_argument("--prune-start-step", type=int, default=200, help="optimizer step of the first pruning event")
    p.add_argument("--prune-end-step", type=int, default=500, help="optimizer step of the last pruning event")
    p.add_argument("--prune-events", type=int, default=3, help="pruning events from the start step to the end step")
    p.add_argument("--log-dir", default="lightning_logs")
    args = p.parse_args(argv)
    if args.prune is not None and not args.no_qat and args.prune_end_step >= args.qat_start_step:
        p.error("--prune-end-step must be below --qat-start-step: QAT converts the layers pruning has shrunk")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    L.seed_everything(args.seed, workers=True)
    torch.set_float32_matmul_precision("high")
    data = ByteDataModule(
        text_file=args.data,
        max_bytes=args.max_bytes,
        block_size=args.block_size,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    model = TinyGPT(
        n_layer=args.n_layer,
        n_head=args.n_head,
        d_model=args.d_model,
        block_size=args.block_size,
        lr=args.lr,
        warmup_steps=20,
    )

    power = PowerSampler(sensors="auto", interval_s=args.interval_s, phases=not args.no_phases)
    efficiency = EfficiencyLogger(
        carbon_intensity_g_per_kwh=args.carbon_intensity,
        pue=args.pue,
        tokens_per_batch="numel",
        targets={"val_loss": args.target_val_loss},
    )
    callbacks = [power, efficiency]
    if args.energy_budget_kj is not None:
        callbacks.append(EnergyBudget(max_j=args.energy_budget_kj * 1000.0))
    pruning = None
    if args.prune is not None:
        # before QAT in the list: at a step where both act, pruning shrinks the layers QAT then wraps
        pruning = StructuredPruning(
            amount=args.prune,
            start_step=args.prune_start_step,
            end_step=args.prune_end_step,
            events=args.prune_events,
        )
        callbacks.append(pruning)
    qat = None
    if not args.no_qat:
        qat = QuantizationAwareTraining(scheme=args.qat_scheme, start_step=args.qat_start_step)
        callbacks.append(qat)
    logger = TensorBoardLogger(args.log_dir, name="tiny_gpt")
    devices = int(args.devices) if args.devices.isdigit() else args.devices
    trainer = L.Trainer(
        max_steps=args.max_steps,
        accelerator=args.accelerator,
        devices=devices,
        strategy=args.strategy,
        callbacks=callbacks,
        logger=logger,
        log_every_n_steps=20,
        val_check_interval=args.val_every,
        limit_val_batches=args.val_batches,
        limit_test_batches=args.val_batches,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        deterministic=False,
    )
    trainer.fit(model, datamodule=data)
    trainer.test(model, datamodule=data, verbose=False)  # every rank: the test loop is distributed too
    headline = _headline(args, model, power, efficiency, qat, logger)
    if pruning is not None:
        headline["pruning"] = pruning.report
    if trainer.is_global_zero:
        _print_headline(headline)
    return headline


def _headline(args, model, power, efficiency, qat, logger) -> dict:
    fit_summary = power.summary_by_stage.get("fit", {})
    r = efficiency.results
    out = {
        "parameters": efficiency.n_params,  # counted when training started: the float model EER divides by
        "sensors": [(s["name"], s["source"], s["cumulative_energy_j"]) for s in fit_summary.get("sensors", [])],
        "sources": fit_summary.get("sources", []),
        "train_energy_j": r.get("train_energy_j"),
        "eer_j_per_param": r.get("eer_j_per_param"),
        "tokens_per_j": r.get("tokens_per_j"),
        "carbon_gco2e": r.get("carbon_gco2e"),
        "test_epi_j": r.get("test_epi_j"),
        "test_epi_j_per_token": r.get("test_epi_j_per_token"),
        "log_dir": logger.log_dir,
        "target_val_loss": args.target_val_loss,
        "to_target": efficiency.targets.reached.get("val_loss"),  # {"step", "energy_j", "time_s", ...} or None
    }
    if qat is not None:
        keys = (
            "scheme",
            "epi_float_j",
            "epi_converted_j",
            "epi_ratio",
            "time_float_s",
            "time_converted_s",
            "val_loss_float",
            "val_loss_converted",
            "size_ratio",
            "kernel_decode_ratio",
            "kernel_prefill_ratio",
        )
        out.update({k: qat.report.get(k) for k in keys})
        out["block_size"] = args.block_size
    return out


def _print_headline(h: dict) -> None:
    def f(x, unit=""):
        return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4g}{unit}"

    src = "+".join(h["sources"]) or "none"
    print("\n=== tiny_gpt: energy headline ===")
    for name, source, joules in h["sensors"]:
        print(f"  {name:<14} {joules:10.1f} J   source: {source}")
    print(f"  parameters:            {h['parameters']:,}")
    print(f"  training energy:       {f(h['train_energy_j'], ' J')}  [{src}]")
    print(f"  EER:                   {f(h['eer_j_per_param'], ' J/parameter')}  [{src}]")
    print(f"  tokens per joule:      {f(h['tokens_per_j'])}  [{src}]")
    print(f"  carbon:                {f(h['carbon_gco2e'], ' gCO2e')}  [{src}] (energy so far x PUE x grid intensity)")
    if "epi_float_j" in h:
        per_token = {
            k: (h[k] / h["block_size"] if h.get(k) is not None else None) for k in ("epi_float_j", "epi_converted_j")
        }
        ms = {
            k: (h[k] * 1e3 / h["block_size"] if h.get(k) is not None else None)
            for k in ("time_float_s", "time_converted_s")
        }
        print(
            f"  QAT scheme:            {h['scheme']} (the fastest quantized kernel measured here: "
            f"{f(h['kernel_decode_ratio'], 'x')} float"
            f" time at 1 token, {f(h['kernel_prefill_ratio'], 'x')} at 64 tokens)"
        )
        print(
            f"  EPI float -> int8:     {f(per_token['epi_float_j'], ' J')} -> {f(per_token['epi_converted_j'], ' J')} "
            "per token"
            f" (ratio {f(h['epi_ratio'])})  [{src}]"
        )
        print(
            f"  time float -> int8:    {f(ms['time_float_s'], ' ms')} -> {f(ms['time_converted_s'], ' ms')} per token"
        )
        print(
            f"  val loss float -> int8:{f(h['val_loss_float'])} -> {f(h['val_loss_converted'])}; size ratio "
            f"{f(h['size_ratio'])}"
        )
        if h["epi_ratio"] is not None and h["epi_ratio"] >= 1.0:
            print(
                "  note: at this width the int8 kernels' fixed cost per call outweighs the smaller weights, so the "
                "converted"
                " model costs more per token than float; README Results show a 512-wide model where it costs less."
            )
    print(
        f"  test EPI (converted):  {f(h['test_epi_j'], ' J/sample')}, {f(h['test_epi_j_per_token'], ' J/token')}  "
        f"[{src}]"
    )
    if "pruning" in h:
        _print_pruning(h["pruning"], f)
    t = h["to_target"]
    reached = f"{f(t['energy_j'], ' J')} in {f(t['time_s'], ' s')}, step {t['step']}  [{src}]" if t else "not reached"
    print(f"  to val_loss <= {h['target_val_loss']:g}:   {reached}")
    if "estimate" in h["sources"]:
        print("  note: 'estimate' figures come from a CPU utilisation model, not a measurement.")
    print(f"\nTensorBoard: tensorboard --logdir {h['log_dir']}")


def _print_pruning(report: dict, f) -> None:
    if "params_ratio" not in report:
        print("  pruning:               no event ran (the fit ended before --prune-start-step)")
        return
    src = report.get("train_energy_source") or "no sensor"
    print(
        f"  pruning:               parameters x{f(report['params_ratio'])}, FLOPs per token x{f(report['flops_ratio'])}"
    )
    print(
        f"  training J per step:   {f(report.get('train_j_per_step_before'), ' J')} before the first event -> "
        f"{f(report.get('train_j_per_step_after'), ' J')} in the last steps  [{src}]"
    )
    print(
        f"  EER, pruned model:     {f(report.get('eer_j_per_initial_param'), ' J')} per initial parameter, "
        f"{f(report.get('eer_j_per_final_param'), ' J')} per parameter kept  [{src}]"
    )


if __name__ == "__main__":
    main()
