"""Talking across processes: called at log time, window edges or stage ends only, never per step.

Every function takes the Trainer and goes through its strategy's collectives (``reduce``,
``all_gather``, ``broadcast``), so it works the same under single-device, DDP, ``ddp_green``, FSDP
or DeepSpeed. A Lightning ``Fabric`` has the same ``world_size``, ``global_rank``, ``node_rank`` and
``strategy.root_device``, so every function but :func:`reduce_sum` takes one too; its sum is
:func:`fabric_sum_reducer` (a Fabric strategy has ``all_reduce``, not ``reduce``). A collective must
be called by every rank at the same point.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch


def distributed(trainer: Any) -> bool:
    """Whether a process group of more than one process is up (it is gone after ddp_green's teardown)."""
    return trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()


def reduce_sum(trainer: Any, values: Sequence[float]) -> list[float]:
    """Element-wise sum of ``values`` over all processes."""
    if not distributed(trainer):
        return local_sum(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=trainer.strategy.root_device)
    return trainer.strategy.reduce(tensor, reduce_op="sum").tolist()


def local_sum(values: Sequence[float]) -> list[float]:
    """:func:`reduce_sum` of a single process: the values as floats."""
    return [float(v) for v in values]


def sum_reducer(trainer: Any) -> Callable[[Sequence[float]], list[float]]:
    """:func:`reduce_sum` bound to ``trainer``, for a log step: a single process gets :func:`local_sum`,
    which reads no Trainer property per call (call it once the strategy is set up)."""
    return local_sum if trainer.world_size == 1 else functools.partial(reduce_sum, trainer)


def fabric_reduce_sum(fabric: Any, values: Sequence[float]) -> list[float]:
    """:func:`reduce_sum` over the processes of a Lightning ``Fabric`` (its ``all_reduce``)."""
    if not distributed(fabric):
        return local_sum(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=fabric.device)
    return fabric.all_reduce(tensor, reduce_op="sum").tolist()


def fabric_sum_reducer(fabric: Any) -> Callable[[Sequence[float]], list[float]]:
    """:func:`sum_reducer` for a Lightning ``Fabric``: :func:`local_sum` for a single process."""
    return local_sum if fabric.world_size == 1 else functools.partial(fabric_reduce_sum, fabric)


def gather_floats(trainer: Any, values: Sequence[float]) -> list[list[float]]:
    """``values`` of every process, in rank order: one row per rank."""
    if not distributed(trainer):
        return [[float(v) for v in values]]
    local = torch.tensor(values, dtype=torch.float64, device=trainer.strategy.root_device)
    return trainer.strategy.all_gather(local).reshape(trainer.world_size, -1).cpu().tolist()


def gather_objects(trainer: Any, obj: Any) -> list[Any]:
    """``obj`` (picklable) from every process, in rank order."""
    if not distributed(trainer):
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def broadcast(trainer: Any, obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every process."""
    if not distributed(trainer):
        return obj
    return trainer.strategy.broadcast(obj, src=src)


def shared_owners(keys_by_rank: Sequence[Sequence[str]]) -> dict[str, int]:
    """For each shared sensor key (one physical device seen by several processes), the lowest rank
    that reads it: that rank alone counts it."""
    owners: dict[str, int] = {}
    for rank, keys in enumerate(keys_by_rank):
        for key in keys:
            owners.setdefault(key, rank)
    return owners


def cluster_figures(per_rank: Sequence[dict]) -> dict:
    """Cluster totals (cumulative and this stage's) and imbalance (max / mean of the per-process device
    energy: GPUs, not the host-level sensors that only one process per node reads)."""
    energies = [r["device_energy_j"] for r in per_rank]
    mean = sum(energies) / len(energies)
    return {
        "world_size": len(per_rank),
        "num_nodes": len({r["node_rank"] for r in per_rank}),
        # cumulative, every stage
        "total_j": sum(r["energy_j"] for r in per_rank),
        # this stage only
        "stage_total_j": sum(r["stage_energy_j"] for r in per_rank),
        "per_rank": list(per_rank),
        # every process's: an estimate anywhere shows
        "sources": sorted({s for r in per_rank for s in r["sources"]}),
        "imbalance": max(energies) / mean if mean > 0 else float("nan"),
    }
