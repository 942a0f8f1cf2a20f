"""Energy per generated token of LitGPT's ``GPT`` with its KV cache: float against QAT-converted and pruned.

Model: LitGPT ``GPT`` (GPT-NeoX style, fused qkv), ``--n-layer`` layers, ``n_embd=512``, ``intermediate_size=2048``,
byte vocabulary (as ``benchmarks/qat.py``), random weights: the cost of a token does not depend on their values.

Variants (``--variants``, a comma-separated list; each is built by one function of :data:`VARIANTS`):

* ``float``: the model as it is;
* ``qat``: ``QuantizationAwareTraining().prepare()`` (the scheme its kernel timing picks here), ``--qat-steps``
  training steps on random tokens with fake quantization on, then ``convert()``: the deployed model;
* ``pruned``: ``StructuredPruner(mode="width")`` (the Trainer-free pruner, magnitude importance, ``round_to=8``)
  removes ``--prune-amount`` (30 %, as ``benchmarks/pruning.py``) of the prunable block parameters in one event:
  MLP hidden units and attention query groups, the same share in every block; no fine-tune (the cost of a token
  depends on the shapes).

Loop: a prompt of ``--prompt-tokens`` tokens in one forward pass (prefill), then ``--new-tokens`` greedy
decode steps of one token each with the KV cache, at batch 1 and 16. The measurement is the package's
Trainer-free path: an ``EnergySession`` over the ``auto`` sensors (NVML, else RAPL, else the CPU estimate:
the JSON says which, and an estimate is labelled as one) and ``GenerationPhases`` marking the prefill and
the decode block of every run. ``--device cuda`` runs it on a GPU, NVML measuring it and every block
synchronising the device at its edges (not run here: this work had no GPU).

Figures per variant and batch size, each over ``--repeats`` repeats, the variants interleaved (A B, B A, ...):
``j_per_generated_token`` and ``s_per_generated_token`` (prefill and decode over the generated tokens),
``prefill_j_per_prompt_token``, ``decode_j_per_generated_token`` and ``steady_tokens_per_s`` (generated tokens
per second over the second half of the decode steps, where the KV cache is warm); and per batch size the
ratio of each variant to ``float``.

Writes ``benchmarks/results/generation.json`` (``{"figures": {name: {"min", "median", "max", "values"}}}``).
``--quick``: 2 repeats, 16 new tokens, 1 layer (seconds).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import _common  # noqa: E402

from lightning_green.energy.generation import GenerationPhases  # noqa: E402
from lightning_green.energy.session import EnergySession  # noqa: E402
from lightning_green.pruning import StructuredPruner  # noqa: E402
from lightning_green.quantization import QuantizationAwareTraining  # noqa: E402
from lightning_green.sensors.auto import build_sensors  # noqa: E402

VOCAB_SIZE = 256  # bytes
BATCHES = (1, 16)


def build_float(args: argparse.Namespace) -> torch.nn.Module:
    from litgpt.model import GPT, Config  # heavy optional dependency (litgpt)

    config = Config(
        block_size=args.prompt_tokens + args.new_tokens,
        vocab_size=VOCAB_SIZE,
        padded_vocab_size=VOCAB_SIZE,
        n_layer=args.n_layer,
        n_head=8,
        n_embd=args.n_embd,
        intermediate_size=4 * args.n_embd,
        bias=True,
        parallel_residual=True,
        rotary_percentage=0.25,
        mlp_class_name="GptNeoxMLP",
        norm_class_name="LayerNorm",
    )
    torch.manual_seed(args.seed)
    return GPT(config).to(args.device).eval()


def build_qat(args: argparse.Namespace, float_model: torch.nn.Module) -> tuple[torch.nn.Module, dict]:
    """A QAT-trained and converted copy of ``float_model``, and what the callback reported."""
    qat = QuantizationAwareTraining()
    model = qat.prepare(copy.deepcopy(float_model).train(), device=args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(args.seed)
    for _ in range(args.qat_steps):
        tokens = torch.randint(0, VOCAB_SIZE, (4, args.prompt_tokens + 1), generator=g).to(args.device)
        loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model = qat.convert(model).eval()
    return model, {"scheme": qat.resolved_scheme, "size_ratio": qat.report.get("size_ratio"), "steps": args.qat_steps}


def build_pruned(args: argparse.Namespace, float_model: torch.nn.Module) -> tuple[torch.nn.Module, dict]:
    """A copy of ``float_model`` pruned by width (one event of ``StructuredPruner``), and what it removed."""
    model = copy.deepcopy(float_model)
    example = torch.randint(0, VOCAB_SIZE, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(args.seed))
    pruner = StructuredPruner(mode="width")
    pruner.discover(model, example.to(args.device))
    event = pruner.prune_to(model, args.prune_amount)
    after = pruner.parameter_counts(model)
    prunable_before = pruner.params_before["mlp"] + pruner.params_before["heads"]
    return model.eval(), {
        "amount": args.prune_amount,
        "prunable_removed": 1 - (after["mlp"] + after["heads"]) / prunable_before,
        "params_ratio": after["total"] / pruner.params_before["total"],
        "intermediate_size": model.config.intermediate_size,
        "n_query_groups": model.config.n_query_groups,
        "event_s": event.seconds,
    }


#: ``name -> build(args, float_model) -> (model, facts)``.
VARIANTS: dict[str, Callable[[argparse.Namespace, torch.nn.Module], tuple[torch.nn.Module, dict]]] = {
    "float": lambda args, float_model: (float_model, {}),
    "qat": build_qat,
    "pruned": build_pruned,
}


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously: a block's edges must hold its work)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def generate(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int, phases: GenerationPhases) -> list[float]:
    """Greedy generation with the KV cache, its prefill and decode marked; the seconds of each decode step."""
    batch, width = prompt.shape
    device = prompt.device
    model.set_kv_cache(batch_size=batch, max_seq_length=width + new_tokens, device=device)
    positions = torch.arange(width + new_tokens, device=device)
    step_s = []
    sync(device)
    with phases.phase("prefill", tokens=prompt.numel()):
        logits = model(prompt, input_pos=positions[:width])
        sync(device)
    with phases.phase("decode", tokens=batch * new_tokens):
        for i in range(new_tokens):
            t0 = time.perf_counter()
            token = logits[:, -1:].argmax(-1)
            logits = model(token, input_pos=positions[width + i : width + i + 1])
            sync(device)
            step_s.append(time.perf_counter() - t0)
    model.clear_kv_cache()
    return step_s


def one_run(session: EnergySession, model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> dict:
    """The figures of one generation."""
    phases = GenerationPhases(session)
    step_s = generate(model, prompt, new_tokens, phases)
    phases.loop_ended()
    prefill, decode = phases.cluster["prefill"], phases.cluster["decode"]
    generated = decode["tokens"]
    steady = step_s[len(step_s) // 2 :]
    return {
        "j_per_generated_token": (prefill["energy_j"] + decode["energy_j"]) / generated,
        "s_per_generated_token": (prefill["seconds"] + decode["seconds"]) / generated,
        "prefill_j_per_prompt_token": prefill["j_per_token"],
        "decode_j_per_generated_token": decode["j_per_token"],
        "steady_tokens_per_s": prompt.shape[0] * len(steady) / sum(steady),
    }


def run(args: argparse.Namespace) -> dict:
    float_model = build_float(args)
    models, facts = {}, {}
    for name in args.variants:
        models[name], facts[name] = VARIANTS[name](args, float_model)
    device = torch.device(args.device)
    gpu = [device.index or 0] if device.type == "cuda" else []  # a CPU run does not count an idle GPU
    sensors, skipped = build_sensors(["auto"], gpu, host_level=True)
    session = EnergySession(interval_s=args.interval_s)
    session.start(sensors, owned=sensors)
    g = torch.Generator().manual_seed(args.seed)
    prompts = {b: torch.randint(0, VOCAB_SIZE, (b, args.prompt_tokens), generator=g).to(device) for b in BATCHES}
    values: dict[str, list[float]] = {}
    try:
        for model in models.values():  # warm-up
            generate(model, prompts[1], 2, GenerationPhases(session))
        for _, name in _common.interleaved(list(models), args.repeats):
            for b in BATCHES:
                for figure, value in one_run(session, models[name], prompts[b], args.new_tokens).items():
                    values.setdefault(f"b{b}_{name}_{figure}", []).append(value)
        source = session.sources()
    finally:
        session.finish()
    for name in models:
        if name == "float":
            continue
        for b in BATCHES:
            for figure in ("j_per_generated_token", "s_per_generated_token"):
                ours, base = values[f"b{b}_{name}_{figure}"], values[f"b{b}_float_{figure}"]
                values[f"b{b}_{name}_{figure}_ratio"] = [o / f for o, f in zip(ours, base, strict=True)]
    return {
        "config": {
            **{k: v for k, v in vars(args).items() if k != "variants"},
            "variants": list(args.variants),
            "batches": list(BATCHES),
            "parameters": sum(p.numel() for p in float_model.parameters()),
            "torch_threads": torch.get_num_threads(),
            "variant_facts": facts,
        },
        "energy_source": source,
        "sensors_skipped": skipped,
        "figures": {k: _common.summarize(v) for k, v in values.items()},
    }


def variants(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"unknown variant(s) {unknown or text!r}; allowed: {', '.join(VARIANTS)}")
    return list(dict.fromkeys(["float", *names]))  # float is the baseline of every ratio


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", type=variants, default=list(VARIANTS), help=f"of {', '.join(VARIANTS)}")
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--n-embd", type=int, default=512)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--qat-steps", type=int, default=8)
    parser.add_argument("--prune-amount", type=float, default=0.3, help="share of the prunable block parameters")
    parser.add_argument("--repeats", type=int, default=_common.MIN_REPEATS)
    parser.add_argument("--interval-s", type=float, default=0.05, help="seconds between sensor readings")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda[:i] (blocks synchronise at their edges)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.new_tokens, args.n_layer, args.qat_steps = 2, 16, 1, 1
    result = run(args)
    f = result["figures"]
    rows = [
        {
            "variant": name,
            "batch": b,
            **{
                figure: f[f"b{b}_{name}_{figure}"]["median"]
                for figure in (
                    "j_per_generated_token",
                    "s_per_generated_token",
                    "prefill_j_per_prompt_token",
                    "steady_tokens_per_s",
                )
            },
        }
        for name in args.variants
        for b in BATCHES
    ]
    print(
        f"\nGeneration benchmark: LitGPT GPT {result['config']['parameters'] / 1e6:.1f} M params, {args.new_tokens} new"
        f" tokens after {args.prompt_tokens}, {args.repeats} repeats interleaved;"
        f" energy source: {result['energy_source']}"
    )
    print(_common.table(rows))
    for name, facts in result["config"]["variant_facts"].items():
        if facts:
            print(f"{name}: {facts}")
    _common.write("generation", result, repeats=args.repeats, quick=args.quick)
    return result


if __name__ == "__main__":
    main()
