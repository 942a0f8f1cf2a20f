"""The resume rule: which part of a checkpoint's per-process state a process goes on from."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

#: What a process continues from (:func:`continued_part`): its own saved entry, everything saved
#: (summed), or nothing.
OWN = "own"
ALL = "all"
NOTHING = "nothing"


def continued_part(saved_processes: int, world_size: int, rank: int) -> str:
    """The resume rule. Same world size: each process goes on from its own saved entry (``OWN``).
    Another world size: rank 0 carries everything saved (``ALL``), the other ranks start from
    ``NOTHING``; nothing saved is ``NOTHING`` for every rank."""
    if saved_processes == 0:
        return NOTHING
    if saved_processes == world_size:
        return OWN
    return ALL if rank == 0 else NOTHING


def state_for_rank(
    per_rank: Sequence[Mapping[str, Any]], world_size: int, rank: int, sum_keys: Iterable[str]
) -> dict | None:
    """The part of a checkpoint's per-process state that this process continues from.

    Same world size: this rank's own entry. Another world size: rank 0 carries the sums of
    ``sum_keys`` over every saved process and the other ranks start from nothing (``None``).
    """
    part = continued_part(len(per_rank), world_size, rank)
    if part == OWN:
        return dict(per_rank[rank])
    if part == ALL:
        return {k: sum(float(r.get(k, 0.0)) for r in per_rank) for k in sum_keys}
    return None
