"""Gradient communication for :class:`~lightning_green.strategies.EnergyAwareDDPStrategy`: compression
presets built on torch's DDP communication hooks, and a byte/time counter wrapped around them.

Every ``torch`` DDP-hook import of the package lives here, so an API move costs one file.

What is counted (per rank, per optimizer step):

* **bytes sent**: the payload this rank hands to the collectives, ``numel * element_size`` of every
  tensor it all-reduces. For ``"none"`` that is the gradient bucket itself; for ``"fp16"``/``"bf16"``
  the half-precision copy (``numel * 2``); for ``"powersgd"`` the ``P`` and ``Q`` factors plus the
  tensors PowerSGD leaves uncompressed (vectors, and matrices too small to gain), and the whole bucket
  on the steps before ``start_powerSGD_iter``. Wire bytes of the collective algorithm (a ring sends
  ``2 (n - 1) / n`` times the payload) are not modelled: the figures compare presets, not links.
* **bytes uncompressed**: what the same step would send without compression.
* **exposed communication time**: from the last bucket's hook call (backward is done computing) to the
  completion of the last bucket's collective. It is the part of communication that backward did not
  hide. Host clock (``time.perf_counter``); on CUDA it is the time the host sees the work as done.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from enum import Enum
from typing import Any

import torch


class CommCompression(str, Enum):
    """Gradient compression presets. Plain strings work (``"fp16"``); ``None`` means ``"none"``."""

    NONE = "none"
    FP16 = "fp16"
    BF16 = "bf16"
    POWERSGD = "powersgd"

    @classmethod
    def parse(cls, value: Any) -> CommCompression:
        """``None``/a member/a string (any case) to a member.

        Raises:
            ValueError: ``value`` names no preset; the message lists the allowed values.
        """
        if value is None:
            return cls.NONE
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                return cls(value.lower())
            except ValueError:
                pass
        allowed = ", ".join([repr(None)] + [repr(m.value) for m in cls])
        raise ValueError(f"`comm_compression` must be one of {allowed}, got {value!r}")


class CommStats:
    """Counters fed by the communication hook: cheap to update, read by the strategy at log time and by
    anyone who wants communication figures (for example energy by phase).

    All byte figures are this rank's. Thread-safe: collectives may complete on a backend thread.

    Attributes:
        steps: synchronising backward passes seen (one per optimizer step without accumulation).
        bytes_sent: cumulative bytes this rank sent.
        bytes_uncompressed: cumulative bytes the same steps would have sent without compression.
        bytes_sent_last_step: bytes sent in the most recent step.
        bytes_uncompressed_last_step: uncompressed bytes of the most recent step.
        exposed_comm_s_last_step: exposed communication seconds of the most recent completed step.
        exposed_comm_s_total: cumulative exposed communication seconds.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        """Zero every counter."""
        with self._lock:
            self.steps = 0
            self.bytes_sent = 0
            self.bytes_uncompressed = 0
            self.bytes_sent_last_step = 0
            self.bytes_uncompressed_last_step = 0
            self.exposed_comm_s_last_step = 0.0
            self.exposed_comm_s_total = 0.0
            self._exposed_unpopped_s = 0.0
            self._step_sent = 0
            self._step_full = 0
            self._pending = 0
            self._closing = False
            self._t_last_call = 0.0

    @property
    def compression_ratio(self) -> float:
        """Cumulative uncompressed bytes / bytes sent (``1.0`` before any step)."""
        return self.bytes_uncompressed / self.bytes_sent if self.bytes_sent else 1.0

    @property
    def compression_ratio_last_step(self) -> float:
        """Uncompressed bytes / bytes sent in the most recent step (``1.0`` before any step)."""
        return self.bytes_uncompressed_last_step / self.bytes_sent_last_step if self.bytes_sent_last_step else 1.0

    def pop_exposed_comm_s(self) -> float:
        """Exposed communication seconds accumulated since the previous call; resets the accumulator."""
        with self._lock:
            value = self._exposed_unpopped_s
            self._exposed_unpopped_s = 0.0
        return value

    def track(
        self, fut: torch.futures.Future, bytes_sent: int, bytes_uncompressed: int, is_last: bool
    ) -> torch.futures.Future:
        """Count one bucket and return a future that completes with ``fut`` and records its completion."""
        with self._lock:
            self._step_sent += bytes_sent
            self._step_full += bytes_uncompressed
            self._pending += 1
            if is_last:
                self._t_last_call = self._clock()
                self._closing = True
                self.steps += 1
                self.bytes_sent += self._step_sent
                self.bytes_uncompressed += self._step_full
                self.bytes_sent_last_step = self._step_sent
                self.bytes_uncompressed_last_step = self._step_full
                self._step_sent = self._step_full = 0
        return fut.then(self._on_done)

    def _on_done(self, fut: torch.futures.Future) -> torch.Tensor:
        now = self._clock()
        with self._lock:
            self._pending -= 1
            if self._closing and self._pending == 0:
                exposed = max(0.0, now - self._t_last_call)
                self.exposed_comm_s_last_step = exposed
                self.exposed_comm_s_total += exposed
                self._exposed_unpopped_s += exposed
                self._closing = False
        return fut.value()

    def as_dict(self) -> dict:
        """The counters as plain numbers (for JSON and tests)."""
        return {
            "steps": self.steps,
            "bytes_sent": self.bytes_sent,
            "bytes_uncompressed": self.bytes_uncompressed,
            "bytes_sent_last_step": self.bytes_sent_last_step,
            "bytes_uncompressed_last_step": self.bytes_uncompressed_last_step,
            "compression_ratio": self.compression_ratio,
            "exposed_comm_s_last_step": self.exposed_comm_s_last_step,
            "exposed_comm_s_total": self.exposed_comm_s_total,
        }

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


# ------------------------------------------------------------------------------------- accounting
def powersgd_payload_numel(shapes: list[torch.Size], rank: int, min_compression_rate: float = 2.0) -> int:
    """Elements one rank all-reduces for one bucket in a compressed PowerSGD step.

    Mirrors ``torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook``: each gradient is viewed as an
    ``n x m`` matrix (``n = shape[0]``); with ``r = min(n, m, rank)`` it is compressed into ``P`` (``n x r``)
    and ``Q`` (``m x r``) when ``(n + m) r * min_compression_rate < n m``, else sent whole.
    """
    total = 0
    for shape in shapes:
        numel = int(torch.Size(shape).numel())
        n = int(shape[0]) if len(shape) else 1
        m = numel // n if n else 0
        r = min(n, m, rank)
        compressed = (n + m) * r
        total += compressed if compressed * min_compression_rate < n * m else n * m
    return total


def _bucket_numel_and_size(bucket: Any) -> tuple[int, int]:
    buffer = bucket.buffer()
    return int(buffer.numel()), int(buffer.element_size())


def _account_plain(_state: Any, bucket: Any) -> tuple[int, int]:
    numel, size = _bucket_numel_and_size(bucket)
    return numel * size, numel * size


def _account_half(_state: Any, bucket: Any) -> tuple[int, int]:
    numel, size = _bucket_numel_and_size(bucket)
    return numel * 2, numel * size


def _account_powersgd(state: Any, bucket: Any) -> tuple[int, int]:
    numel, size = _bucket_numel_and_size(bucket)
    # vanilla allreduce on these steps
    if state.iter < state.start_powerSGD_iter:
        return numel * size, numel * size
    shapes = [g.shape for g in bucket.gradients()]
    sent = powersgd_payload_numel(shapes, state.matrix_approximation_rank, state.min_compression_rate)
    return sent * size, numel * size


def build_comm_hook(
    compression: CommCompression,
    stats: CommStats,
    process_group: Any | None = None,
    powersgd_rank: int = 2,
    powersgd_start_step: int = 10,
    serialize_buckets: bool = False,
) -> tuple[Any, Callable]:
    """The ``(state, hook)`` pair to pass to ``DistributedDataParallel.register_comm_hook``.

    The hook is torch's own (``allreduce_hook``, ``fp16_compress_hook``, ``bf16_compress_hook``,
    ``powerSGD_hook``) wrapped so that ``stats`` counts every bucket. It works on any backend that can
    all-reduce the dtype (gloo does fp32, fp16 and bf16 on CPU).

    ``serialize_buckets`` (PowerSGD only; the strategy sets it for every backend but NCCL): PowerSGD
    issues its second all-reduce (``Q``) from the completion callback of the first (``P``). Gloo
    completes work on a pool of threads, so with several buckets two ranks can issue those all-reduces
    in different orders and the collectives mismatch (a crash, or worse). Serialized, a bucket's hook
    first waits for the previous bucket's future, so every rank issues the same sequence; the cost is
    the overlap between buckets, which CPU training hardly has.
    """
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    if compression is CommCompression.POWERSGD:
        state: Any = powerSGD_hook.PowerSGDState(
            process_group=process_group,
            matrix_approximation_rank=powersgd_rank,
            start_powerSGD_iter=powersgd_start_step,
        )
        inner, account = powerSGD_hook.powerSGD_hook, _account_powersgd
    else:
        state = process_group
        inner, account = {
            CommCompression.NONE: (default_hooks.allreduce_hook, _account_plain),
            CommCompression.FP16: (default_hooks.fp16_compress_hook, _account_half),
            CommCompression.BF16: (default_hooks.bf16_compress_hook, _account_half),
        }[compression]

    # No annotations: DDP compares them with the real classes, and this module's annotations are strings.
    # The name is also not one of torch's bf16 hook names, which DDP refuses outside CUDA/NCCL even though
    # gloo all-reduces bf16 on CPU.
    serialize = serialize_buckets and compression is CommCompression.POWERSGD
    # the last bucket's future, when serializing
    previous: list = [None]

    def counting_hook(state, bucket):  # type: ignore[no-untyped-def]
        if serialize and previous[0] is not None and not previous[0].done():
            previous[0].wait()
        # before the hook: PowerSGD advances its iteration inside
        sent, full = account(state, bucket)
        is_last = bucket.is_last()
        fut = stats.track(inner(state, bucket), sent, full, is_last)
        if serialize:
            previous[0] = None if is_last else fut
        return fut

    return state, counting_hook
