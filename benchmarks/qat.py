"""QAT with the defaults (``scheme="auto"``) on LitGPT's ``GPT``: is the converted model cheaper per token?

Model: LitGPT ``GPT`` (GPT-NeoX style, fused qkv), 2 layers, ``n_embd=512``, ``intermediate_size=2048``,
byte vocabulary (about 6.6 M parameters), trained on the Python standard library's source text.

1. A float baseline trains ``--steps`` steps; PTQ converts a copy of it as it is.
2. From the baseline, a float fine-tune and a QAT fine-tune (``QuantizationAwareTraining()`` with a
   ``PowerSampler`` on the CPU estimate sensor) train ``--finetune-steps`` steps on the same batches.
3. Figures, each over ``--repeats`` repeats, float and converted interleaved side by side:
   seconds and joules per generated token (decode with a KV cache, 64 new tokens, batch 1 and 16);
   prefill (8 x 64 tokens) seconds and joules per sample; decode batch 1 split into the time in the Linear
   layers and outside them (float and converted rerun with their Linear layers replaced by free stand-ins),
   and the best whole-model ratio that split allows; QAT step / float step (a plain loop that
   alternates one step of each); eval loss of float, PTQ and QAT; recovery
   ``(loss_PTQ - loss_QAT) / (loss_PTQ - loss_float)``; size converted / float; the callback's own
   EPI ratio. Energy: ``estimate`` (CPU utilisation model, machine-wide: not a measurement).

Prints the goal table and writes ``benchmarks/results/qat.json`` ({"repeats", "machine", figures each
{"min", "median", "max"}}). About 4 minutes on a 2-core CPU (``--quick``: about 1).
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer, seed_everything

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "examples"), str(ROOT / "benchmarks")]

import _common  # noqa: E402
from tinygpt_model import VOCAB_SIZE, ByteDataModule  # noqa: E402

from lightning_green import PowerSampler  # noqa: E402
from lightning_green.quantization import QuantizationAwareTraining, state_dict_size_bytes  # noqa: E402
from lightning_green.sensors import CpuEstimateSensor  # noqa: E402

GOALS = {
    "decode_ratio_b1": ("<=", 0.4),
    "prefill_ratio": ("<=", 0.7),
    "callback_epi_ratio": ("<=", 1.0),
    "recovery": (">=", 0.70),
    "size_ratio": ("<=", 0.30),
    "qat_step_ratio": ("<=", 1.3),
}


class GPTModule(LightningModule):
    def __init__(self, n_layer: int, n_embd: int, block_size: int, lr: float) -> None:
        super().__init__()
        from litgpt.model import GPT, Config

        config = Config(
            block_size=block_size,
            vocab_size=VOCAB_SIZE,
            padded_vocab_size=VOCAB_SIZE,
            n_layer=n_layer,
            n_head=8,
            n_embd=n_embd,
            intermediate_size=4 * n_embd,
            bias=True,
            parallel_residual=True,
            rotary_percentage=0.25,
            mlp_class_name="GptNeoxMLP",
            norm_class_name="LayerNorm",
        )
        self.gpt, self.lr = GPT(config), lr

    def forward(self, idx: torch.Tensor, input_pos: Any = None) -> torch.Tensor:
        return self.gpt(idx, input_pos=input_pos)

    def loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x).flatten(0, 1), y.flatten())

    def training_step(self, batch, batch_idx):
        return self.loss(batch)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.loss(batch))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def context(args: argparse.Namespace) -> int:
    """The model's context: the training blocks, and a prompt of 8 plus the generated tokens."""
    return max(args.block_size, 8 + args.new_tokens)


class _ZeroLinear(torch.nn.Module):
    """Stands in for a Linear layer at no cost: returns a zero tensor of the output shape (cached)."""

    def __init__(self, out_features: int) -> None:
        super().__init__()
        self.out_features, self.cache = out_features, {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (*x.shape[:-1], self.out_features)
        if shape not in self.cache:
            self.cache[shape] = torch.zeros(shape, dtype=x.dtype)
        return self.cache[shape]


def without_linear(model: GPTModule) -> GPTModule:
    """A copy of ``model`` whose Linear layers (float or converted) cost nothing: what is left of a decode
    step is the work outside them (embedding, norms, rope, attention over the KV cache, Python dispatch),
    whose cost depends on shapes only, not on the values the zero outputs change."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Int8DynamicLinear":
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, _ZeroLinear(module.out_features))
    return model


def decode_split(
    models: dict[str, GPTModule],
    prompt: torch.Tensor,
    new_tokens: int,
    repeats: int,
    kernel_ratio: float | None,
    tries: int = 3,
) -> dict[str, list[float]]:
    """Decode (batch 1) time per token of float and converted, and of both with their Linear layers at no cost,
    interleaved, each the fastest of ``tries`` runs (differences of times need the least disturbed ones on a
    shared machine); per repeat: the share of float's time outside the Linear layers, the Linear layers' own
    converted / float ratio inside the model, the whole model's ratio were the converted Linear layers free
    (Amdahl's limit), and the best ratio the kernel's measured ratio allows (outside share + kernel ratio x
    Linear share)."""
    runs = {**models, **{f"{k}_outside_linear": without_linear(m) for k, m in models.items()}}
    s: dict[str, list[float]] = {k: [] for k in runs}
    for m in runs.values():
        generate(m, prompt, new_tokens)  # warm-up
    for r in range(repeats):
        for name in list(runs) if r % 2 == 0 else list(runs)[::-1]:
            best = float("inf")
            for _ in range(tries):
                t0 = time.perf_counter()
                generate(runs[name], prompt, new_tokens)
                best = min(best, time.perf_counter() - t0)
            s[name].append(best / new_tokens)
    out = {f"decode_b1_split_s_{k}": v for k, v in s.items()}
    f, c, fo, co = s["float"], s["converted"], s["float_outside_linear"], s["converted_outside_linear"]
    out["decode_b1_outside_linear_share"] = [o / t for o, t in zip(fo, f, strict=False)]
    out["decode_b1_linear_ratio"] = [(ct - o2) / (ft - o1) for ct, o2, ft, o1 in zip(c, co, f, fo, strict=False)]
    out["decode_b1_ratio_free_linear"] = [o2 / ft for o2, ft in zip(co, f, strict=False)]
    if kernel_ratio is not None:
        out["decode_b1_ratio_bound"] = [sh + kernel_ratio * (1 - sh) for sh in out["decode_b1_outside_linear_share"]]
    return out


def estimate_energy_j(sensor: CpuEstimateSensor, fn: Callable[[], Any]) -> tuple[float, float]:
    """(joules, seconds) of ``fn`` from the CPU estimate sensor: mean power over the block x its time."""
    sensor.read()
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    return sensor.read().value * seconds, seconds


@torch.inference_mode()
def generate(model: GPTModule, prompt: torch.Tensor, new_tokens: int) -> None:
    batch, t = prompt.shape
    model.gpt.set_kv_cache(batch_size=batch, max_seq_length=t + new_tokens)
    logits = model(prompt, input_pos=torch.arange(t))
    for i in range(new_tokens):
        nxt = logits[:, -1:].argmax(-1)
        logits = model(nxt, input_pos=torch.tensor([t + i]))
    model.gpt.clear_kv_cache()


@torch.inference_mode()
def eval_loss(model: GPTModule, batches: list) -> float:
    model.eval()
    out = sum(float(model.loss(b)) for b in batches) / len(batches)
    model.train()
    return out


def trainer(steps: int, callbacks: list, val_batches: int = 0) -> Trainer:
    return Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=val_batches,
        callbacks=callbacks,
    )


def step_ratio(qat_model: GPTModule, float_model: GPTModule, batches: list, repeats: int) -> list[float]:
    """Per repeat: median over step pairs of QAT step time / float step time (a pair runs back to back)."""
    models = {"qat": qat_model, "float": float_model}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}

    def step(name: str, batch: Any) -> float:
        t0 = time.perf_counter()
        models[name].loss(batch).backward()
        opts[name].step()
        opts[name].zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    step("qat", batches[0]), step("float", batches[0])
    ratios = []
    for r in range(repeats):
        pairs = []
        for i, batch in enumerate(batches):
            order = ("qat", "float") if (i + r) % 2 == 0 else ("float", "qat")
            t = {name: step(name, batch) for name in order}
            pairs.append(t["qat"] / t["float"])
        ratios.append(statistics.median(pairs))
    return ratios


def run(args: argparse.Namespace) -> dict:
    t_start = time.perf_counter()
    seed_everything(args.seed, verbose=False)
    dm = ByteDataModule(
        max_bytes=args.max_bytes, block_size=args.block_size, batch_size=args.batch_size, seed=args.seed
    )
    dm.setup()
    val = [b for _, b in zip(range(args.eval_batches), dm.val_dataloader(), strict=False)]
    base = GPTModule(args.n_layer, args.n_embd, context(args), lr=1e-3)
    trainer(args.steps, []).fit(base, datamodule=dm)
    state = copy.deepcopy(base.state_dict())

    ptq = QuantizationAwareTraining().convert(copy.deepcopy(base))
    ft_float = GPTModule(args.n_layer, args.n_embd, context(args), lr=args.ft_lr)
    ft_float.load_state_dict(state)
    seed_everything(args.seed + 1, verbose=False)
    trainer(args.finetune_steps, []).fit(ft_float, datamodule=dm)
    qat_model = GPTModule(args.n_layer, args.n_embd, context(args), lr=args.ft_lr)
    qat_model.load_state_dict(state)
    sampler = PowerSampler(
        sensors=[CpuEstimateSensor()],
        interval_s=0.05,
        print_summary=False,
        log_trace=False,
        summary_dir=str(Path(args.tmp)),
    )
    qat = QuantizationAwareTraining()
    seed_everything(args.seed + 1, verbose=False)
    trainer(args.finetune_steps, [sampler, qat], val_batches=args.eval_batches).fit(qat_model, datamodule=dm)
    report = qat.report

    losses = {
        "float": eval_loss(ft_float, val),
        "ptq": eval_loss(ptq, val),
        "qat": eval_loss(qat_model, val),
        "float_baseline": eval_loss(base, val),
    }
    denominator = losses["ptq"] - losses["float"]
    recovery = (losses["ptq"] - losses["qat"]) / denominator if denominator > 0 else float("nan")

    # inference: float fine-tune vs converted QAT model, interleaved
    ft_float.eval(), qat_model.eval()
    sensor = CpuEstimateSensor()
    figures: dict[str, list[float]] = {}
    models = {"float": ft_float, "converted": qat_model}
    prompt = {b: torch.randint(0, VOCAB_SIZE, (b, 8)) for b in (1, 16)}
    prefill = torch.randint(0, VOCAB_SIZE, (8, args.block_size))
    regimes = {
        f"decode_b{b}": (lambda m, b=b: generate(m, prompt[b], args.new_tokens), args.new_tokens * b) for b in (1, 16)
    }
    regimes["prefill"] = (lambda m: torch.inference_mode()(m)(prefill), prefill.shape[0])
    for regime, (fn, units) in regimes.items():
        for name in models:
            fn(models[name])  # warm-up
        for r in range(args.repeats):
            for name in list(models) if r % 2 == 0 else list(models)[::-1]:
                joules, seconds = estimate_energy_j(sensor, functools.partial(fn, models[name]))
                figures.setdefault(f"{regime}_s_{name}", []).append(seconds / units)
                figures.setdefault(f"{regime}_j_{name}", []).append(joules / units)
        figures[f"{regime}_ratio"] = [
            c / f for c, f in zip(figures[f"{regime}_s_converted"], figures[f"{regime}_s_float"], strict=False)
        ]

    figures |= decode_split(models, prompt[1], args.new_tokens, args.repeats, report.get("kernel_decode_ratio"))

    train_batches = [b for _, b in zip(range(args.timing_steps), dm.train_dataloader(), strict=False)]
    prepared = QuantizationAwareTraining().prepare(copy.deepcopy(base))
    figures["qat_step_ratio"] = step_ratio(prepared, copy.deepcopy(base), train_batches, args.repeats)

    single = {
        "size_ratio": state_dict_size_bytes(qat_model) / state_dict_size_bytes(ft_float),
        "recovery": recovery,
        "callback_epi_ratio": report.get("epi_ratio"),
        "callback_time_ratio": report.get("time_ratio"),
    }
    return {
        "repeats": args.repeats,
        "config": {
            **vars(args),
            "parameters": sum(p.numel() for p in base.parameters()),
            "scheme": report["scheme"],
            "kernel_decode_ratio": report.get("kernel_decode_ratio"),
            "kernel_prefill_ratio": report.get("kernel_prefill_ratio"),
            "torch_threads": torch.get_num_threads(),
            "converted_linear_layers": sum(type(m).__name__ == "Int8DynamicLinear" for m in qat_model.modules()),
        },
        "energy_source": "estimate",
        "figures": {k: _common.summarize(v) for k, v in figures.items()},
        "single": single,
        "eval_loss": losses,
        "callback_report": report.as_dict(),
        "seconds": time.perf_counter() - t_start,
    }


def goal_table(result: dict) -> list[dict]:
    f, s = result["figures"], result["single"]
    values = {
        "decode_ratio_b1": f["decode_b1_ratio"],
        "prefill_ratio": f["prefill_ratio"],
        "qat_step_ratio": f["qat_step_ratio"],
    }
    rows = []
    for key, (op, goal) in GOALS.items():
        v = values.get(key) or {"median": s[key], "min": s[key], "max": s[key]}
        med = v["median"]
        met = med is not None and (med <= goal if op == "<=" else med >= goal)
        rows.append(
            {"figure": key, "median": med, "min": v["min"], "max": v["max"], "goal": f"{op} {goal}", "met": met}
        )
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=120, help="float baseline steps")
    parser.add_argument("--finetune-steps", type=int, default=30)
    parser.add_argument("--ft-lr", type=float, default=3e-4)
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--n-embd", type=int, default=512)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-bytes", type=int, default=400_000)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--timing-steps", type=int, default=6, help="step pairs per repeat for the step-time ratio")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None, help="JSON path; default benchmarks/results/qat.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.finetune_steps, args.eval_batches, args.timing_steps = 20, 6, 2, 3
    import tempfile

    with tempfile.TemporaryDirectory(prefix="qat_bench_") as args.tmp:
        result = run(args)
    rows = goal_table(result)
    print(
        f"\nQAT benchmark: LitGPT GPT {result['config']['parameters'] / 1e6:.1f} M params, "
        f"scheme={result['config']['scheme']}, {args.repeats} repeats interleaved; energy source: estimate"
    )
    print(_common.table(rows))
    f = result["figures"]
    for regime, unit in (("decode_b1", "token"), ("decode_b16", "token"), ("prefill", "sample")):
        print(
            f"  {regime}: float {f[f'{regime}_s_float']['median'] * 1e3:.3g} ms, "
            f"{f[f'{regime}_j_float']['median']:.3g} J/{unit};"
            f" converted {f[f'{regime}_s_converted']['median'] * 1e3:.3g} ms, "
            f"{f[f'{regime}_j_converted']['median']:.3g} J/{unit}"
            " [estimate]"
        )
    print(
        f"  decode_b1 split: {f['decode_b1_outside_linear_share']['median']:.3f} of float's time per token is "
        "outside the Linear layers; their converted / float ratio in the model "
        f"{f['decode_b1_linear_ratio']['median']:.3f};"
        f" whole-model ratio with free converted Linear layers {f['decode_b1_ratio_free_linear']['median']:.3f},"
        " with the kernel's micro-benchmark ratio "
        f"{f.get('decode_b1_ratio_bound', {}).get('median', float('nan')):.3f}"
    )
    print(f"  eval loss: {result['eval_loss']}")
    result["goals"] = rows
    payload = {k: v for k, v in result.items() if k != "callback_report"} | {
        "callback_report": result["callback_report"]
    }
    if args.out is None:
        _common.write("qat", payload, repeats=args.repeats, quick=args.quick)
    else:
        Path(args.out).write_text(
            json.dumps({"benchmark": "qat", "machine": _common.machine(), **payload}, indent=2, default=str)
        )
    return result


if __name__ == "__main__":
    main()
