"""The resume rule: which part of a checkpoint's per-process state a process goes on from."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any


def state_for_rank(
    per_rank: Sequence[Mapping[str, Any]], world_size: int, rank: int, sum_keys: Iterable[str]
) -> dict | None:
    """The part of a checkpoint's per-process state that this process continues from.

    Same world size: this rank's own entry. Another world size: rank 0 carries the sums of
    ``sum_keys`` over every saved process and the other ranks start from nothing (``None``).
    """
    if not per_rank:
        return None
    if len(per_rank) == world_size:
        return dict(per_rank[rank])
    if rank == 0:
        return {k: sum(float(r.get(k, 0.0)) for r in per_rank) for k in sum_keys}
    return None
