"""Structured pruning: is the pruned model cheaper per token, and what does one pruning event cost?

Model: LitGPT ``GPT`` in two styles, 4 layers, ``n_embd=512``, MLP 2048: GPT-NeoX (``GptNeoxMLP``,
LayerNorm, 8 heads) and LLaMA (gated ``LLaMAMLP``, RMSNorm, 8 heads in 4 query groups), byte vocabulary,
random weights (time per token depends on shapes, not values).

For each style, side by side and interleaved over ``--repeats`` repeats:
- ``unpruned``;
- ``width``: :class:`~lightning_green.pruning.StructuredPruner` removes 30 % of the MLP units and of the
  query groups in every block (``amount=0.3``, ``round_to=8``);
- ``depth``: 1 of the 4 blocks removed (``mode="depth"``, ranked on one held-out batch);
- ``width_qat``: the width-pruned model converted by ``QuantizationAwareTraining().convert`` (the
  scheme ``"auto"`` picks for this device; post-training here, no QAT fine-tune);
- ``masked``: what Lightning's ``ModelPruning("ln_structured", amount=0.3)`` does: ``torch.nn.utils.prune``
  masks 30 % of the rows of every block Linear; shapes and FLOPs unchanged.

Figures (per repeat, ratio to ``unpruned``): prefill time (``--prefill-batch`` x ``--prefill-tokens``),
decode time (batch 1, KV cache, ``--new-tokens`` tokens), parameters; a training step (AdamW) of the
width-pruned model against the unpruned one; the time of one pruning event
on a fresh model, graph trace included (also on a 2-layer model); and ``StructuredPruning`` in a
Lightning fit against an unpruned fit of the same steps (``benchmarks/pruning_fit.py``: validation
loss at the end, the callbacks' EPI, training J per step after / before). Prints a table and writes
``benchmarks/results/pruning.json``. Run ``--quick`` for a smoke run (seconds).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from torch.nn.utils import prune as torch_prune

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import _common  # noqa: E402
import pruning_fit  # noqa: E402

from lightning_green.pruning import StructuredPruner  # noqa: E402
from lightning_green.quantization import QuantizationAwareTraining  # noqa: E402

VOCAB = 256
GOALS = {
    "width_prefill_ratio": ("<=", 0.75),
    "width_decode_ratio": ("<=", 0.85),
    "depth_prefill_ratio": ("<=", 0.8),
    "depth_decode_ratio": ("<=", 0.8),
    "event_s": ("<=", 1.0),
    "width_train_step_ratio": ("<=", 0.8),
    "width_qat_prefill_ratio": ("<=", 0.45),
    "fit_val_loss_ratio": ("<=", 1.03),
    "fit_epi_ratio": ("<=", 0.8),
}


def make_model(style: str, n_layer: int, context: int) -> torch.nn.Module:
    from litgpt.model import GPT, Config

    common = dict(
        n_layer=n_layer,
        n_embd=512,
        n_head=8,
        block_size=context,
        vocab_size=VOCAB,
        padded_vocab_size=VOCAB,
        intermediate_size=2048,
    )
    if style == "neox":
        config = Config(**common, bias=True, parallel_residual=True, rotary_percentage=0.25)
    else:
        config = Config(
            **common,
            n_query_groups=4,
            bias=False,
            parallel_residual=False,
            rotary_percentage=1.0,
            mlp_class_name="LLaMAMLP",
            norm_class_name="RMSNorm",
        )
    torch.manual_seed(0)
    return GPT(config).eval()


def masked(model: torch.nn.Module, amount: float) -> torch.nn.Module:
    """``ModelPruning("ln_structured")``'s effect: a mask on 30 % of the rows of every block Linear."""
    model = copy.deepcopy(model)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".h." in name:
            torch_prune.ln_structured(module, "weight", amount=amount, n=1, dim=0)
    return model


def timed_event(style: str, n_layer: int, mode: str, amount: float, x: torch.Tensor) -> tuple[torch.nn.Module, float]:
    """A fresh model pruned by one event; seconds of discover (graph trace) + prune."""
    model = make_model(style, n_layer, x.shape[1] + 8)
    pruner = StructuredPruner(mode=mode)
    start = time.perf_counter()
    pruner.discover(model, x)
    pruner.prune_to(model, amount, held_out=[x])
    return model.eval(), time.perf_counter() - start


@torch.inference_mode()
def prefill_s(model: torch.nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    model(x)
    return time.perf_counter() - start


@torch.inference_mode()
def decode_s(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> float:
    """Seconds per generated token, batch 1, with the KV cache."""
    t = prompt.shape[1]
    model.set_kv_cache(batch_size=1, max_seq_length=t + new_tokens)
    logits = model(prompt, input_pos=torch.arange(t))
    start = time.perf_counter()
    for i in range(new_tokens):
        logits = model(logits[:, -1:].argmax(-1), input_pos=torch.tensor([t + i]))
    seconds = (time.perf_counter() - start) / new_tokens
    model.clear_kv_cache()
    return seconds


def train_step_s(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor) -> float:
    """Seconds of one training step (forward, backward, AdamW step) on ``x`` as its own targets."""
    start = time.perf_counter()
    logits = model(x)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), x.flatten()).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def train_step_ratios(models: dict[str, torch.nn.Module], x: torch.Tensor, repeats: int) -> list[float]:
    """Per repeat: a training step of the width-pruned model / of the unpruned one, interleaved."""
    copies = {k: copy.deepcopy(models[k]).train() for k in ("unpruned", "width")}
    optimizers = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in copies.items()}
    for name in copies:
        train_step_s(copies[name], optimizers[name], x)
    steps: dict[str, list[float]] = {k: [] for k in copies}
    for _, name in _common.interleaved(list(copies), repeats):
        steps[name].append(train_step_s(copies[name], optimizers[name], x))
    return [a / b for a, b in zip(steps["width"], steps["unpruned"], strict=True)]


def run_style(style: str, args: argparse.Namespace) -> dict:
    context = max(args.prefill_tokens, 8 + args.new_tokens)
    x = torch.randint(0, VOCAB, (args.prefill_batch, args.prefill_tokens), generator=torch.Generator().manual_seed(0))
    prompt = x[:1, :8]
    base = make_model(style, args.n_layer, context)
    models = {"unpruned": base, "masked": masked(base, args.amount)}
    events: dict[str, list[float]] = {"event_s": [], "event_s_2_layers": []}
    models["width"], seconds = timed_event(style, args.n_layer, "width", args.amount, x)
    models["depth"], _ = timed_event(style, args.n_layer, "depth", 1 / args.n_layer, x)
    models["width_qat"] = QuantizationAwareTraining().convert(copy.deepcopy(models["width"]))
    for _ in range(args.repeats):
        events["event_s"].append(timed_event(style, args.n_layer, "width", args.amount, x)[1])
        events["event_s_2_layers"].append(timed_event(style, 2, "width", args.amount, x)[1])
    for model in models.values():
        prefill_s(model, x)
        decode_s(model, prompt, 2)
    prefill: dict[str, list[float]] = {k: [] for k in models}
    decode: dict[str, list[float]] = {k: [] for k in models}
    for _, name in _common.interleaved(list(models), args.repeats):
        prefill[name].append(prefill_s(models[name], x))
        decode[name].append(decode_s(models[name], prompt, args.new_tokens))
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    figures = {k: _common.summarize(v) for k, v in events.items()}
    for name in ("width", "depth", "masked", "width_qat"):
        figures[f"{name}_prefill_ratio"] = _common.summarize(
            a / b for a, b in zip(prefill[name], prefill["unpruned"], strict=True)
        )
        figures[f"{name}_decode_ratio"] = _common.summarize(
            a / b for a, b in zip(decode[name], decode["unpruned"], strict=True)
        )
        if name != "width_qat":
            # the converted model's int8 weights are buffers, not parameters
            figures[f"{name}_params_ratio"] = _common.summarize([params[name] / params["unpruned"]])
    figures["width_train_step_ratio"] = _common.summarize(train_step_ratios(models, x, args.repeats))
    figures["unpruned_prefill_s"] = _common.summarize(prefill["unpruned"])
    figures["unpruned_decode_s_per_token"] = _common.summarize(decode["unpruned"])
    figures |= pruning_fit.fit_figures(lambda: make_model(style, args.n_layer, context), VOCAB, args)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 repeats, short prompts")
    parser.add_argument("--repeats", type=int, default=_common.MIN_REPEATS)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--amount", type=float, default=0.3)
    parser.add_argument("--prefill-batch", type=int, default=8)
    parser.add_argument("--prefill-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--fit-steps", type=int, default=40, help="optimizer steps of each fit (pruned, unpruned)")
    parser.add_argument("--fit-val-batches", type=int, default=4, help="validation batches of each EPI loop")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.prefill_batch, args.prefill_tokens, args.new_tokens = 2, 2, 32, 4
        args.fit_steps, args.fit_val_batches = 8, 1
    results = {style: run_style(style, args) for style in ("neox", "llama")}
    rows = []
    for style, figures in results.items():
        for key, summary in figures.items():
            goal = GOALS.get(key.replace("_2_layers", "") if key.startswith("event_s") else key)
            status = "" if goal is None else ("met" if _common.met(summary, *goal) else "missed")
            rows.append(
                {
                    "style": style,
                    "figure": key,
                    "median": summary["median"],
                    "min": summary["min"],
                    "max": summary["max"],
                    "goal": "" if goal is None else f"{goal[0]} {goal[1]}",
                    "status": status,
                }
            )
    print(_common.table(rows))
    goals = {k: {"op": op, "value": v} for k, (op, v) in GOALS.items()}
    config = {
        k: getattr(args, k)
        for k in ("n_layer", "amount", "prefill_batch", "prefill_tokens", "new_tokens", "fit_steps", "fit_val_batches")
    }
    payload = {"config": config, "energy_source": "estimate", "goals": goals, "figures": results}
    _common.write("pruning", payload, repeats=args.repeats, quick=args.quick)


if __name__ == "__main__":
    main()
