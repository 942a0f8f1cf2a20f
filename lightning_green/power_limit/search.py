"""The power-limit search and its policy, Trainer-free: which limits to profile, when, and which one to
keep. The Lightning glue is the callback :class:`lightning_green.callbacks.PowerLimitSearch` (any
strategy), which feeds it the energy and time it measures.

The search (:class:`LimitSearch`) in the spirit of Zeus's ``GlobalPowerLimitOptimizer``: after
``warmup_steps`` optimizer steps, each candidate limit (from the highest down in ``limit_step_w``
steps) is profiled for ``profile_steps`` steps; at the end of each window every rank's energy is summed
and the slowest rank's time is taken; the limit with the lowest cost

    ``cost = eta * E + (1 - eta) * P_max * T``     (per step; ``P_max`` = highest limit x world size)

is chosen, or, with ``max_slowdown``, the lowest-energy limit whose step time is within
``max_slowdown`` x the step time at the highest limit. Every rank applies the same limit.

The profiles are cached (:class:`~lightning_green.power_limit.cache.PowerLimitCache`) by GPU model and
world size, so the next run skips profiling; the choice is recomputed from the profiles
(:meth:`LimitSearch.from_profiles`), so a new ``eta`` needs no new profile.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lightning_green.checks import check_int, check_number


@dataclass
class LimitProfile:
    """What one candidate limit cost, per optimizer step, over all ranks."""

    limit_w: float
    # summed over ranks
    energy_per_step_j: float
    # the slowest rank
    time_per_step_s: float
    steps: int


def limit_grid(min_w: float, max_w: float, step_w: float) -> list[float]:
    """Candidates from ``max_w`` down to ``min_w`` in steps of ``step_w`` (``min_w`` not added off-grid)."""
    if step_w <= 0:
        raise ValueError(f"`limit_step_w` must be > 0, got {step_w}")
    n = int(math.floor((max_w - min_w) / step_w + 1e-9))
    return [max_w - i * step_w for i in range(n + 1)]


def choose_limit(
    profiles: Sequence[LimitProfile], eta: float = 0.5, max_slowdown: float | None = None, p_max_w: float | None = None
) -> tuple[float, list[dict]]:
    """Pick a limit from measured profiles. Returns the limit and a table (one dict per profile).

    Args:
        profiles: one per candidate; the highest limit is the reference for ``max_slowdown``.
        eta: weight of energy against time in the cost.
        max_slowdown: if given, choose the lowest-energy limit with ``T <= max_slowdown * T(highest limit)``
            instead of the cost.
        p_max_w: the ``P_max`` of the cost (default: the highest profiled limit).
    """
    if not profiles:
        raise ValueError("no profiles to choose from")
    # ties resolve to the higher limit
    ordered = sorted(profiles, key=lambda p: -p.limit_w)
    p_max = p_max_w if p_max_w is not None else ordered[0].limit_w
    t_ref = ordered[0].time_per_step_s
    rows = []
    for p in ordered:
        rows.append(
            {
                "limit_w": p.limit_w,
                "energy_per_step_j": p.energy_per_step_j,
                "time_per_step_s": p.time_per_step_s,
                "slowdown": p.time_per_step_s / t_ref if t_ref > 0 else float("nan"),
                "cost": eta * p.energy_per_step_j + (1.0 - eta) * p_max * p.time_per_step_s,
                "chosen": False,
            }
        )
    if max_slowdown is not None:
        eligible = [r for r in rows if r["time_per_step_s"] <= max_slowdown * t_ref + 1e-12] or rows[:1]
        best = min(eligible, key=lambda r: r["energy_per_step_j"])
    else:
        best = min(rows, key=lambda r: r["cost"])
    best["chosen"] = True
    return best["limit_w"], rows


class LimitSearch:
    """Schedules the profiling windows and picks the limit; fed with measurements, knows no Trainer.

    Call :meth:`due` with the number of optimizer steps done; when it says so, :meth:`record` the window
    that just closed (if :attr:`profiling_w` is set) and :meth:`start_next` the next one.

    Args:
        candidates_w: limits to profile, highest first (see :func:`limit_grid`).
        warmup_steps: steps before the first window.
        profile_steps: steps measured per window.
        settle_steps: steps after each limit change that are not measured (the device settles;
            Zeus does the same), so a window spans ``settle_steps + profile_steps``.
        eta: weight of energy in the cost, in ``[0, 1]``.
        max_slowdown: choose by slowdown instead of cost (``>= 1``), or ``None``.
        p_max_w: ``P_max`` of the cost (default: the highest candidate).

    Example::

        search = LimitSearch([300, 250, 200], warmup_steps=2, profile_steps=5, settle_steps=2)
        for step in range(100):
            if search.due(step):
                if search.profiling_w is not None:
                    search.record(energy_j=..., time_s=..., steps=5)  # measured from search.measure_from
                limit = search.start_next(step)  # None once done: apply search.chosen_w
    """

    def __init__(
        self,
        candidates_w: Sequence[float],
        warmup_steps: int = 10,
        profile_steps: int = 10,
        eta: float = 0.5,
        max_slowdown: float | None = None,
        p_max_w: float | None = None,
        settle_steps: int = 0,
    ) -> None:
        if not candidates_w:
            raise ValueError("`candidates_w` is empty")
        check_eta(eta)
        check_max_slowdown(max_slowdown)
        check_int("warmup_steps", warmup_steps, 0)
        check_int("profile_steps", profile_steps, 1)
        self.settle_steps = check_int("settle_steps", settle_steps, 0)
        #: The step from which the open window is measured (its limit has settled).
        self.measure_from: int | None = None
        self.candidates_w = sorted((float(c) for c in candidates_w), reverse=True)
        self.warmup_steps = warmup_steps
        self.profile_steps = profile_steps
        self.eta = eta
        self.max_slowdown = max_slowdown
        self.p_max_w = p_max_w
        self.profiles: list[LimitProfile] = []
        self.profiling_w: float | None = None
        self.chosen_w: float | None = None
        self.table: list[dict] = []
        self._next = 0
        self._next_edge_step = warmup_steps

    @property
    def next_edge_step(self) -> int:
        """The step at which the next window edge falls."""
        return self._next_edge_step

    @property
    def done(self) -> bool:
        return self.chosen_w is not None

    def due(self, steps_done: int) -> bool:
        """Whether a window edge falls at ``steps_done`` (or was passed)."""
        return not self.done and steps_done >= self._next_edge_step

    def record(self, energy_j: float, time_s: float, steps: int) -> None:
        """The window of :attr:`profiling_w` closed: ``energy_j`` over all ranks, ``time_s`` of the slowest."""
        if self.profiling_w is None:
            raise RuntimeError("no window is open")
        if steps <= 0:
            raise ValueError(f"`steps` must be > 0, got {steps}")
        self.profiles.append(LimitProfile(self.profiling_w, energy_j / steps, time_s / steps, steps))
        self.profiling_w = None

    def start_next(self, steps_done: int) -> float | None:
        """Open the next window and return its limit; ``None`` when every candidate is done (then
        :attr:`chosen_w` is set)."""
        if self.profiling_w is not None:
            raise RuntimeError(f"the window of {self.profiling_w:g} W was not recorded")
        if self._next < len(self.candidates_w):
            self.profiling_w = self.candidates_w[self._next]
            self._next += 1
            self.measure_from = steps_done + self.settle_steps
            self._next_edge_step = self.measure_from + self.profile_steps
            return self.profiling_w
        self.finish()
        return None

    def finish(self) -> float:
        """Choose from what was profiled (also from a cache via :meth:`from_profiles`)."""
        self.chosen_w, self.table = choose_limit(self.profiles, self.eta, self.max_slowdown, self.p_max_w)
        return self.chosen_w

    @classmethod
    def from_profiles(cls, profiles: Sequence[LimitProfile], **kwargs: Any) -> LimitSearch:
        """A finished search over known profiles (the cache)."""
        search = cls([p.limit_w for p in profiles], **kwargs)
        search.profiles = list(profiles)
        search._next = len(search.candidates_w)
        search.finish()
        return search


def check_eta(eta: float) -> float:
    """``eta`` (the weight of energy in the cost) in ``[0, 1]``, else ``ValueError`` naming it."""
    return check_number("eta", eta, 0.0, high=1.0)


def check_max_slowdown(max_slowdown: float | None) -> float | None:
    """``max_slowdown`` ``None`` or a number ``>= 1``, else ``ValueError`` naming it."""
    if max_slowdown is not None and not (
        isinstance(max_slowdown, (int, float)) and not isinstance(max_slowdown, bool) and max_slowdown >= 1.0
    ):
        raise ValueError(
            f"`max_slowdown` must be None or a number >= 1 (1.05 allows 5% slower steps), got {max_slowdown!r}"
        )
    return max_slowdown


__all__ = ["LimitProfile", "LimitSearch", "check_eta", "check_max_slowdown", "choose_limit", "limit_grid"]
