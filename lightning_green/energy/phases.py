"""Energy by phase of a training step: ``data``, ``compute``, ``optimizer``, ``comm``, ``other``.

The attribution rule. Hooks mark edges on one timeline (host ``time.monotonic()``, or CUDA events
mapped onto it); each optimizer step is cut into intervals between the edges:

* ``data``: from the end of the previous step (or the start of the epoch, or the end of a validation
  loop) to the start of this batch: dataloader fetch and host-to-device transfer;
* ``compute``: from the batch start to ``zero_grad`` (forward) and from ``backward`` start to its end,
  less the exposed communication;
* ``optimizer``: ``zero_grad`` (to the start of backward) and from ``on_before_optimizer_step`` to the
  end of the batch (the optimizer's update and what follows it in Lightning);
* ``comm``: gradient all-reduce time not hidden under backward, as reported by the strategy's
  communication hook (``ddp_green``); it is the tail of the last backward pass, where DDP waits for
  its last buckets, so it is cut from the end of that backward interval;
* ``other``: between the end of backward and ``on_before_optimizer_step`` (gradient clipping,
  unscaling, hooks), and any step whose edges were incomplete.

The energy of a phase is the meter's energy integrated over that phase's intervals: every sensor's
power is attributed by time. This is exact for the sensors' own resolution (a 10 Hz sampler cannot
tell 5 ms phases apart by power: it attributes the power it saw around them by duration).
"""

from __future__ import annotations

from collections import deque
from typing import Iterable, Sequence

PHASES = ("data", "compute", "optimizer", "comm", "other")


def split_out(interval: tuple[float, float], holes: Sequence[tuple[float, float]]) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """Split ``interval`` into the parts outside and inside ``holes`` (each clipped to the interval)."""
    a, b = interval
    inside = sorted((max(a, h0), min(b, h1)) for h0, h1 in holes if min(b, h1) > max(a, h0))
    outside, cursor = [], a
    for h0, h1 in inside:
        if h0 > cursor:
            outside.append((cursor, h0))
        cursor = max(cursor, h1)
    if b > cursor:
        outside.append((cursor, b))
    return outside, inside


def step_intervals(edges: dict[str, list[float]], comm_s: float = 0.0) -> list[tuple[str, float, float]]:
    """Cut one optimizer step into ``(phase, t0, t1)`` intervals from its edges.

    ``edges`` maps an edge name to its timestamps within the step (several with gradient
    accumulation): ``prev_end``, ``batch_start``, ``zero_grad``, ``backward_start``, ``backward_end``,
    ``optimizer_start``, ``batch_end``. ``comm_s`` is the step's exposed communication time, cut from
    the end of the last backward pass.
    """
    out: list[tuple[str, float, float]] = []
    prev_end = edges.get("prev_end", [None])[0]
    starts = edges.get("batch_start", [])
    end = edges.get("batch_end", [None])[-1]
    if prev_end is None or not starts or end is None:
        return out
    out.append(("data", prev_end, starts[0]))
    # forward/backward of each micro-batch: batch_start -> zero_grad -> backward_start -> backward_end
    zero = list(edges.get("zero_grad", []))
    bwd0 = list(edges.get("backward_start", []))
    bwd1 = list(edges.get("backward_end", []))
    comm = [(bwd1[-1] - comm_s, bwd1[-1])] if comm_s > 0 and bwd1 else []
    cursor = starts[0]
    for i, start in enumerate(starts):
        if start > cursor:  # between micro-batches (accumulation): the next fetch
            out.append(("data", cursor, start))
        b0 = bwd0[i] if i < len(bwd0) else None
        b1 = bwd1[i] if i < len(bwd1) else None
        if b0 is None or b1 is None:
            cursor = start
            continue
        z = zero[i] if i < len(zero) and start <= zero[i] <= b0 else None
        if z is None:
            out.append(("compute", start, b0))
        else:
            out += [("compute", start, z), ("optimizer", z, b0)]
        outside, inside = split_out((b0, b1), comm)
        out += [("compute", a, b) for a, b in outside] + [("comm", a, b) for a, b in inside]
        cursor = b1
    opt = edges.get("optimizer_start", [])
    if opt and cursor <= opt[-1] <= end:
        out += [("other", cursor, opt[-1]), ("optimizer", opt[-1], end)]
    else:
        out.append(("other", cursor, end))
    return [(p, a, b) for p, a, b in out if b > a]


class PhaseAccumulator:
    """Phase intervals waiting for energy attribution, the current logging window and the run totals.

    Intervals are attributed as soon as the sensors have a reading past their end (so the meter's
    bounded history still covers them), and the rest at log time.

    Args:
        max_pending: intervals kept waiting; past that the oldest keep their time but not their energy
            (counted in ``unattributed_s``), so memory stays bounded.
    """

    def __init__(self, max_pending: int = 50_000) -> None:
        self.pending: deque[tuple[str, float, float]] = deque()
        self.max_pending = max_pending
        self.unattributed_s = 0.0
        self.total_s = dict.fromkeys(PHASES, 0.0)
        self.total_j = dict.fromkeys(PHASES, 0.0)
        self._window_s = dict.fromkeys(PHASES, 0.0)
        self._window_j = dict.fromkeys(PHASES, 0.0)

    def _count(self, phase: str, seconds: float, joules: float) -> None:
        self._window_s[phase] += seconds
        self._window_j[phase] += joules
        self.total_s[phase] += seconds
        self.total_j[phase] += joules

    def add(self, intervals: Iterable[tuple[str, float, float]]) -> None:
        self.pending.extend(intervals)
        while len(self.pending) > self.max_pending:
            phase, a, b = self.pending.popleft()
            self._count(phase, b - a, 0.0)
            self.unattributed_s += b - a

    def resolve(self, meter, until_s: float = float("inf")) -> None:
        """Attribute the energy of the pending intervals that end by ``until_s``, oldest first."""
        while self.pending and self.pending[0][2] <= until_s:
            phase, a, b = self.pending.popleft()
            self._count(phase, b - a, meter.energy_between(a, b) if meter is not None else 0.0)

    def pop_window(self) -> tuple[dict[str, float], dict[str, float]]:
        """(seconds, joules) per phase attributed since the previous call."""
        out = (self._window_s, self._window_j)
        self._window_s = dict.fromkeys(PHASES, 0.0)
        self._window_j = dict.fromkeys(PHASES, 0.0)
        return out

    def rows(self, memory_j: float | None, memory_note: str, source: str = "") -> list[dict]:
        """The summary table: each phase's time, energy (from ``source``) and share, then memory access."""
        total_s, total_j = sum(self.total_s.values()), sum(self.total_j.values())
        rows = [
            {
                "phase": p,
                "seconds": self.total_s[p],
                "energy_j": self.total_j[p],
                "time_share_pct": 100 * self.total_s[p] / total_s if total_s else float("nan"),
                "energy_share_pct": 100 * self.total_j[p] / total_j if total_j else float("nan"),
                "source": source,
            }
            for p in PHASES
        ]
        rows.append({"phase": "memory (dram)", "energy_j": memory_j, "source": "rapl" if memory_j is not None else "", "note": memory_note})
        return rows
