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

import time
from collections import deque
from collections.abc import Iterable, Sequence

PHASES = ("data", "compute", "optimizer", "comm", "other")


def split_out(
    interval: tuple[float, float], holes: Sequence[tuple[float, float]]
) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
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
        # between micro-batches (accumulation): the next fetch
        if start > cursor:
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
        rows.append(
            {
                "phase": "memory (dram)",
                "energy_j": memory_j,
                "source": "rapl" if memory_j is not None else "",
                "note": memory_note,
            }
        )
        return rows


PHASE_TIMINGS = ("host", "cuda_events", "sync")


class PhaseRecorder:
    """Edges of the training steps, turned into per-phase energy and time.

    The hooks call :meth:`edge` (a timestamp appended to a list: the only per-edge work) and
    :meth:`close_step` when an optimizer step ends; energy is attributed as soon as the sensors have
    read past an interval, and the window's figures are popped on log steps (:meth:`metrics`).

    Args:
        timing: ``"host"`` (the clock at each edge), ``"sync"`` (synchronise the CUDA device first) or
            ``"cuda_events"`` (CUDA events, mapped onto the host clock a few steps later).
        device: the torch device trained on (``sync`` synchronises it when it is CUDA).
        clock: the host clock, the meter's timeline.
    """

    def __init__(self, timing: str = "host", device=None, clock=time.monotonic) -> None:
        self.timing = timing
        self.device = device
        self.clock = clock
        self.acc = PhaseAccumulator()
        self.edges: dict[str, list] = {}
        # cuda_events: steps whose events may not have run yet
        self._event_steps: list[tuple[dict, float]] = []
        self._anchor = None
        if timing == "cuda_events":
            import torch

            torch.cuda.synchronize()
            anchor = torch.cuda.Event(enable_timing=True)
            anchor.record()
            anchor.synchronize()
            self._anchor = (anchor, self.clock())

    def now(self):
        """A timestamp on this recorder's timeline (a CUDA event under ``cuda_events``)."""
        if self.timing == "host":
            return self.clock()
        import torch

        if self.timing == "sync":
            if self.device is not None and self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            return self.clock()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def edge(self, name: str) -> None:
        self.edges.setdefault(name, []).append(self.now())

    def restart(self, with_edge: bool = True) -> None:
        """A new step begins here (epoch start, end of a validation loop); ``with_edge=False`` when
        what follows belongs to no step (a validation loop)."""
        self.edges = {"prev_end": [self.now()]} if with_edge else {}

    def close_step(self, meter, comm_s: float = 0.0) -> None:
        """The step that just ended (its ``batch_end`` edge recorded) becomes phase intervals."""
        edges = self.edges
        self.edges = {"prev_end": [edges["batch_end"][-1]]}
        if self.timing != "cuda_events":
            self.acc.add(step_intervals(edges, comm_s))
        else:
            self._event_steps.append((edges, comm_s))
            self._resolve_events(block=len(self._event_steps) > 64)
        # attribute what the sensors have already read past, while the meter's history still holds it
        self.acc.resolve(meter, until_s=meter.last_time() or 0.0)

    def _resolve_events(self, block: bool = False) -> None:
        """Turn CUDA events into host times for the steps whose last event has run."""
        anchor, anchor_t = self._anchor
        while self._event_steps:
            edges, comm = self._event_steps[0]
            last = edges["batch_end"][-1]
            if not block and not last.query():
                break
            last.synchronize()
            self._event_steps.pop(0)
            times = {k: [anchor_t + anchor.elapsed_time(e) / 1000.0 for e in v] for k, v in edges.items()}
            self.acc.add(step_intervals(times, comm))

    def flush(self, meter) -> None:
        """Fold everything pending into the totals (end of training)."""
        if self.timing == "cuda_events":
            self._resolve_events(block=True)
        self.acc.resolve(meter)

    def metrics(self, meter, reduce, world_size: int) -> dict[str, float]:
        """``energy/phase/<p>_j`` (summed over processes) and ``time/phase/<p>_s`` (mean over
        processes) of the window since the last call; ``reduce`` is the element-wise sum over processes."""
        if self.timing == "cuda_events":
            self._resolve_events()
        self.acc.resolve(meter)
        seconds, joules = self.acc.pop_window()
        reduced = reduce([joules[p] for p in PHASES] + [seconds[p] for p in PHASES])
        world = max(world_size, 1)
        out = {f"energy/phase/{p}_j": reduced[i] for i, p in enumerate(PHASES)}
        out.update({f"time/phase/{p}_s": reduced[len(PHASES) + i] / world for i, p in enumerate(PHASES)})
        return out

    def rows(self, dram_j: float | None, dram_names: Sequence[str], source: str) -> list[dict]:
        """The summary table (see :meth:`PhaseAccumulator.rows`), with the memory row explained."""
        if dram_j is not None:
            note = f"RAPL dram zone ({', '.join(dram_names)}), whole run, not split by phase"
        else:
            note = "not measurable on this hardware: no RAPL dram zone"
        rows = self.acc.rows(dram_j, note, source=source)
        if self.acc.unattributed_s:
            rows.append(
                {
                    "phase": "(time without energy)",
                    "seconds": self.acc.unattributed_s,
                    "note": "phase intervals beyond the pending limit",
                }
            )
        return rows
