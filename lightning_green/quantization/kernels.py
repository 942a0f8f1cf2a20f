"""Which quantized kernel is really faster on this device: a micro-benchmark on the model's own shapes.

:func:`time_schemes` builds, for each candidate scheme, converted copies of the model's largest
Linear shapes and times them against float at one token (decode) and at ``prefill_tokens`` tokens
(prefill), a few tens of milliseconds in all. The timing function is injectable (``timer(label,
fn) -> seconds``), so tests decide the outcome without wall time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_green.quantization import int8
from lightning_green.quantization.schemes import SCHEMES

Timer = Callable[[str, Callable[[], Any]], float]
"""``timer(label, fn) -> seconds`` for one call of ``fn``; ``label`` is ``"float"`` or a scheme name."""


def wall_timer(label: str, fn: Callable[[], Any], repeats: int = 5, min_block_s: float = 1e-3) -> float:
    """Seconds per call of ``fn``: calls run in blocks of at least ``min_block_s``, and the fastest of
    ``repeats`` blocks counts (the least disturbed by other processes on a shared machine)."""
    with torch.inference_mode():
        fn()
        n, t0 = 1, time.perf_counter()
        fn()
        one_s = max(time.perf_counter() - t0, 1e-7)
        n = max(1, min(1000, int(min_block_s / one_s)))
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            best = min(best, (time.perf_counter() - t0) / n)
    return best


@dataclass(frozen=True)
class KernelTiming:
    """Time of the converted layers over float, per regime, for one scheme (below 1: faster)."""

    scheme: str
    decode_ratio: float
    prefill_ratio: float

    @property
    def ratio(self) -> float:
        """The mean of the decode and prefill ratios."""
        return (self.decode_ratio + self.prefill_ratio) / 2


def linear_shapes(model: nn.Module, names: set[str], limit: int = 3) -> list[tuple[int, int]]:
    """The ``limit`` largest distinct ``(in_features, out_features)`` among the named Linear layers."""
    shapes = {
        (m.in_features, m.out_features) for n, m in model.named_modules() if n in names and isinstance(m, nn.Linear)
    }
    return sorted(shapes, key=lambda s: -s[0] * s[1])[:limit]


def _converted(scheme: str, linear: nn.Linear, group_size: int) -> nn.Module | None:
    if SCHEMES[scheme].backend == "torch":
        return int8.Int8DynamicLinear.from_float(linear.weight, linear.bias)
    if SCHEMES[scheme].grouped and linear.in_features % group_size:
        return None
    from lightning_green.quantization import _torchao

    seq = nn.Sequential(linear)
    _torchao.quantize(seq, scheme, group_size, linear_filter=lambda m, _fqn: isinstance(m, nn.Linear))
    return seq


def time_schemes(
    schemes: list[str],
    shapes: list[tuple[int, int]],
    device: torch.device,
    group_size: int = 32,
    timer: Timer = wall_timer,
    prefill_tokens: int = 64,
    rounds: int = 3,
) -> list[KernelTiming]:
    """Converted / float time of each scheme on ``shapes``, at 1 and ``prefill_tokens`` tokens.

    Float and the schemes are timed in turn, ``rounds`` times, and each keeps its fastest round: a
    burst of load on a busy machine then slows one round of one side, not the whole ratio. A scheme
    whose conversion or kernel fails on this device is left out of the result.
    """
    float_s = {"decode": 0.0, "prefill": 0.0}
    quant_s = {s: {"decode": 0.0, "prefill": 0.0} for s in schemes}
    failed: set[str] = set()
    for in_f, out_f in shapes:
        inputs = {
            "decode": torch.randn(1, 1, in_f, device=device),
            "prefill": torch.randn(1, prefill_tokens, in_f, device=device),
        }
        linear = nn.Linear(in_f, out_f, device=device)
        models = {}
        for scheme in schemes:
            try:
                models[scheme] = _converted(scheme, nn.Linear(in_f, out_f, device=device), group_size)
            except Exception:  # noqa: BLE001 - a scheme that cannot convert here is simply not a candidate
                failed.add(scheme)
        for regime, x in inputs.items():
            best = {label: float("inf") for label in ("float", *models)}
            for _ in range(rounds):
                best["float"] = min(best["float"], timer("float", lambda: linear(x)))
                for scheme, model in models.items():
                    if model is None or scheme in failed:
                        continue
                    try:
                        best[scheme] = min(best[scheme], timer(scheme, lambda m=model: m(x)))
                    except Exception:  # noqa: BLE001
                        failed.add(scheme)
            float_s[regime] += best["float"]
            for scheme in models:
                if scheme not in failed and models[scheme] is not None:
                    quant_s[scheme][regime] += best[scheme]
    return [
        KernelTiming(s, quant_s[s]["decode"] / float_s["decode"], quant_s[s]["prefill"] / float_s["prefill"])
        for s in schemes
        if s not in failed and float_s["decode"] > 0 and float_s["prefill"] > 0 and quant_s[s]["decode"] > 0
    ]


def fastest(timings: list[KernelTiming]) -> KernelTiming | None:
    """The timing with the lowest mean ratio, or ``None``."""
    return min(timings, key=lambda t: t.ratio, default=None)


def resolve_scheme(
    requested: str,
    model: nn.Module,
    device: torch.device,
    group_size: int,
    embeddings: bool,
    timer: Timer = wall_timer,
) -> tuple[str, KernelTiming | None, str | None]:
    """The scheme to use on ``device``, its measured kernel timing and a warning (or ``None``).

    ``requested="auto"`` times :func:`~.schemes.auto_candidates` on the model's Linear shapes and
    takes the fastest; an explicit scheme is timed too, so that a slow one is reported.

    Raises:
        ValueError: the explicit scheme cannot run on ``device``; the message lists those that can.
    """
    from lightning_green.quantization import layers
    from lightning_green.quantization.schemes import AUTO, auto_candidates, device_can_run, schemes_for_device

    if requested != AUTO and not device_can_run(requested, device):
        raise ValueError(
            f"`scheme={requested!r}` cannot run on device {device} ({SCHEMES[requested].requires});"
            f" schemes that can: {schemes_for_device(device)}"
        )
    candidates = [requested] if requested != AUTO else auto_candidates(device)
    if embeddings:
        candidates = [s for s in candidates if SCHEMES[s].embeddings] or candidates
    names = layers.select_layers(model, "int8_dynamic", group_size, None, False).linears
    shapes = linear_shapes(model, names)
    if not shapes:
        return candidates[0], None, None
    best = fastest(time_schemes(candidates, shapes, device, group_size, timer))
    if best is None:
        return candidates[0], None, f"no quantized kernel of {candidates} ran on {device} in the micro-benchmark"
    if best.decode_ratio >= 1.0 or best.prefill_ratio >= 1.0:
        return (
            best.scheme,
            best,
            (
                f"scheme {best.scheme!r} has no kernel faster than float on {device}: its converted Linear layers took"
                f" {best.decode_ratio:.2f}x float time at 1 token and {best.prefill_ratio:.2f}x at 64 tokens, so the"
                " converted model will be slower" + ("; on this device try scheme='auto'" if requested != AUTO else "")
            ),
        )
    return best.scheme, best, None
