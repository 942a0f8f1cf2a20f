"""Which quantized kernel is really faster on this device: a micro-benchmark on the model's own shapes.

:func:`time_schemes` builds, for each candidate scheme, converted copies of the model's largest
Linear shapes and times them against float at one token (decode) and at ``prefill_tokens`` tokens
(prefill), a few tens of milliseconds in all. The timing function is injectable (``timer(label,
fn) -> seconds``), so tests decide the outcome without wall time.

A busy machine must not turn the timing into nonsense (a neighbour's load once made an int8 kernel
look 1886x slower than float; timed alone it was 1.59x). On CPU the kernels are therefore timed on
one thread (:func:`one_thread`: a ratio of per-core kernel costs, which threads waiting on a
preempted sibling cannot inflate), and :class:`KernelTimer` rejects every block of calls whose wall
time exceeds this thread's CPU time (the block was preempted), timing it again up to a bound.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_green.checks import check_callable, check_int, check_number
from lightning_green.quantization import _torchao, int8, layers
from lightning_green.quantization.schemes import (
    AUTO,
    SCHEMES,
    auto_candidates,
    device_can_run,
    schemes_for_device,
)

Timer = Callable[[str, Callable[[], Any]], float]
"""``timer(label, fn) -> seconds`` for one call of ``fn``; ``label`` is ``"float"`` or a scheme name."""

Clock = Callable[[], float]


class KernelTimer:
    """Seconds per call of ``fn`` (a :data:`Timer`), timed so that other processes cannot inflate it.

    Calls run in blocks of at least ``min_block_s``. On CPU each block is timed with the wall clock and
    with this thread's CPU clock: a block whose wall time exceeds its CPU time by more than
    ``tolerance`` (as a fraction) was preempted by another process, so it is rejected and timed
    again. The fastest of ``repeats`` clean blocks counts. When ``max_blocks`` blocks yield fewer
    clean ones, the fastest clean block counts, or without any, the least CPU time of a block (what
    the calls cost this thread, which preemption does not add to). On CUDA the device is
    synchronised around each block and the fastest of ``repeats`` wall times counts.

    Args:
        device: where the timed calls run.
        repeats: clean blocks wanted.
        max_blocks: blocks timed at most, clean or not (at least ``repeats``).
        min_block_s: the least wall time of a block (calls per block follow from one first call).
        tolerance: how much longer than its CPU time a block's wall time may be and stay clean.
        wall_clock: seconds, monotonic; ``time.perf_counter`` unless a test drives time itself.
        cpu_clock: this thread's CPU seconds; ``time.thread_time`` unless a test drives it.

    Raises:
        ValueError: a count or a duration out of range; ``TypeError``: a clock that is not callable.

    Attributes:
        rejected_blocks: blocks rejected as preempted, over every call.
        unclean_timings: timings that had no clean block and counted CPU time instead.
    """

    def __init__(
        self,
        device: torch.device,
        repeats: int = 5,
        max_blocks: int = 25,
        min_block_s: float = 1e-3,
        tolerance: float = 0.25,
        wall_clock: Clock = time.perf_counter,
        cpu_clock: Clock = time.thread_time,
    ) -> None:
        self.device = torch.device(device)
        self.repeats = check_int("repeats", repeats, 1)
        self.max_blocks = check_int("max_blocks", max_blocks, repeats)
        self.min_block_s = check_number("min_block_s", min_block_s, 0.0, strict=True, unit="seconds")
        self.tolerance = check_number("tolerance", tolerance, 0.0, unit="a fraction")
        self.wall_clock = check_callable("wall_clock", wall_clock, optional=False)
        self.cpu_clock = check_callable("cpu_clock", cpu_clock, optional=False)
        self.rejected_blocks = 0
        self.unclean_timings = 0

    def __call__(self, label: str, fn: Callable[[], Any]) -> float:
        with torch.inference_mode():
            fn()
            calls = self._calls_per_block(fn)
            if self.device.type == "cuda":
                return min(self._cuda_block_s(fn, calls) for _ in range(self.repeats))
            return self._cpu_seconds(fn, calls)

    def _calls_per_block(self, fn: Callable[[], Any]) -> int:
        self._sync()
        t0 = self.wall_clock()
        fn()
        self._sync()
        one_s = max(self.wall_clock() - t0, 1e-7)
        return max(1, min(1000, int(self.min_block_s / one_s)))

    def _cpu_seconds(self, fn: Callable[[], Any], calls: int) -> float:
        clean: list[float] = []
        least_cpu_s = float("inf")
        for _ in range(self.max_blocks):
            wall_s, cpu_s = self._cpu_block_s(fn, calls)
            least_cpu_s = min(least_cpu_s, cpu_s)
            if wall_s <= cpu_s * (1 + self.tolerance):
                clean.append(wall_s)
            else:
                self.rejected_blocks += 1
            if len(clean) >= self.repeats:
                break
        if clean:
            return min(clean)
        self.unclean_timings += 1
        return least_cpu_s

    def _cpu_block_s(self, fn: Callable[[], Any], calls: int) -> tuple[float, float]:
        """Wall and CPU seconds per call over one block."""
        wall_0 = self.wall_clock()
        cpu_0 = self.cpu_clock()
        for _ in range(calls):
            fn()
        cpu_s = self.cpu_clock() - cpu_0
        wall_s = self.wall_clock() - wall_0
        return wall_s / calls, cpu_s / calls

    def _cuda_block_s(self, fn: Callable[[], Any], calls: int) -> float:
        self._sync()
        t0 = self.wall_clock()
        for _ in range(calls):
            fn()
        self._sync()
        return (self.wall_clock() - t0) / calls

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


@contextlib.contextmanager
def one_thread(device: torch.device) -> Iterator[None]:
    """On CPU, torch's intra-op work runs on the calling thread alone within the block (restored after)."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass(frozen=True)
class KernelTiming:
    """Time of the converted layers over float, per regime, for one scheme (below 1: faster).

    Attributes:
        scheme: the scheme timed.
        decode_ratio: converted / float time at one token.
        prefill_ratio: converted / float time at ``prefill_tokens`` tokens.
        prefill_tokens: tokens per call in the prefill regime.
    """

    scheme: str
    decode_ratio: float
    prefill_ratio: float
    prefill_tokens: int = 64

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


def _is_linear(module: nn.Module, _fqn: str) -> bool:
    return isinstance(module, nn.Linear)


def _converted(scheme: str, linear: nn.Linear, group_size: int) -> nn.Module | None:
    if SCHEMES[scheme].backend == "torch":
        return int8.Int8DynamicLinear.from_float(linear.weight, linear.bias)
    if SCHEMES[scheme].grouped and linear.in_features % group_size:
        return None
    seq = nn.Sequential(linear)
    _torchao.quantize(seq, scheme, group_size, linear_filter=_is_linear)
    return seq


def time_schemes(
    schemes: list[str],
    shapes: list[tuple[int, int]],
    device: torch.device,
    group_size: int = 32,
    timer: Timer | None = None,
    prefill_tokens: int = 64,
    rounds: int = 3,
) -> list[KernelTiming]:
    """Converted / float time of each scheme on ``shapes``, at 1 and ``prefill_tokens`` tokens.

    Float and the schemes are timed in turn, ``rounds`` times, and each keeps its fastest round: a
    burst of load on a busy machine then slows one round of one side, not the whole ratio. On CPU
    every call runs on one thread (:func:`one_thread`). ``timer=None`` times with a
    :class:`KernelTimer`. A scheme whose conversion or kernel fails on this device is left out of
    the result.
    """
    timer = KernelTimer(device) if timer is None else timer
    float_s = {"decode": 0.0, "prefill": 0.0}
    quant_s = {s: {"decode": 0.0, "prefill": 0.0} for s in schemes}
    failed: set[str] = set()
    with one_thread(device):
        for in_f, out_f in shapes:
            inputs = {
                "decode": torch.randn(1, 1, in_f, device=device),
                "prefill": torch.randn(1, prefill_tokens, in_f, device=device),
            }
            models: dict[str, nn.Module] = {"float": nn.Linear(in_f, out_f, device=device)}
            for scheme in schemes:
                try:
                    model = _converted(scheme, nn.Linear(in_f, out_f, device=device), group_size)
                except Exception:  # noqa: BLE001 - a scheme that cannot convert here is simply not a candidate
                    failed.add(scheme)
                    continue
                if model is not None:
                    models[scheme] = model
            for regime, x in inputs.items():
                best = _fastest_rounds(models, x, timer, rounds, failed)
                float_s[regime] += best["float"]
                for scheme in schemes:
                    if scheme in best and scheme not in failed:
                        quant_s[scheme][regime] += best[scheme]
    return [
        KernelTiming(
            s, quant_s[s]["decode"] / float_s["decode"], quant_s[s]["prefill"] / float_s["prefill"], prefill_tokens
        )
        for s in schemes
        if s not in failed and float_s["decode"] > 0 and float_s["prefill"] > 0 and quant_s[s]["decode"] > 0
    ]


def _fastest_rounds(
    models: dict[str, nn.Module], x: torch.Tensor, timer: Timer, rounds: int, failed: set[str]
) -> dict[str, float]:
    """Each model's fastest of ``rounds`` timings on ``x``, timed in turn (``"float"`` first); a
    scheme whose kernel raises goes into ``failed``."""
    best = {label: float("inf") for label in models}
    for _ in range(rounds):
        for label, model in models.items():
            if label in failed:
                continue
            try:
                best[label] = min(best[label], timer(label, functools.partial(model, x)))
            except Exception:  # noqa: BLE001 - a kernel that fails here is not a candidate
                if label == "float":
                    raise
                failed.add(label)
    return best


def fastest(timings: list[KernelTiming]) -> KernelTiming | None:
    """The timing with the lowest mean ratio, or ``None``."""
    return min(timings, key=lambda t: t.ratio, default=None)


def slow_kernel_warning(timing: KernelTiming, device: torch.device, explicit: bool) -> str | None:
    """What a user must know when the converted layers are slower than float in a regime, or ``None``.

    It gives both regimes' ratios and says in which one the converted model wins, if any.
    """
    decode_slow = timing.decode_ratio >= 1.0
    prefill_slow = timing.prefill_ratio >= 1.0
    if not decode_slow and not prefill_slow:
        return None
    measured = (
        f"its converted Linear layers took {timing.decode_ratio:.2f}x float time at 1 token (decoding) and"
        f" {timing.prefill_ratio:.2f}x at {timing.prefill_tokens} tokens (prefill, training-sized batches)"
        f" on {device}"
    )
    if decode_slow and prefill_slow:
        verdict = "the converted model will be slower than float in both regimes"
    elif decode_slow:
        verdict = (
            f"the converted model wins on calls of many tokens (about {timing.prefill_tokens} and more) and"
            " will be slower when decoding one token at a time"
        )
    else:
        verdict = (
            "the converted model wins when decoding one token at a time and will be slower on calls of"
            f" many tokens (about {timing.prefill_tokens} and more)"
        )
    hint = "; on this device try scheme='auto'" if explicit else ""
    return f"scheme {timing.scheme!r}: {measured}, so {verdict}{hint}"


def resolve_scheme(
    requested: str,
    model: nn.Module,
    device: torch.device,
    group_size: int,
    embeddings: bool,
    timer: Timer | None = None,
) -> tuple[str, KernelTiming | None, str | None]:
    """The scheme to use on ``device``, its measured kernel timing and a warning (or ``None``).

    ``requested="auto"`` times :func:`~.schemes.auto_candidates` on the model's Linear shapes and
    takes the fastest; an explicit scheme is timed too, so that a slow one is reported.
    ``timer=None`` times with a :class:`KernelTimer`.

    Raises:
        ValueError: the explicit scheme cannot run on ``device``; the message lists those that can.
    """
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
    return best.scheme, best, slow_kernel_warning(best, device, explicit=requested != AUTO)
