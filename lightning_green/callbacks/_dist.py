"""Cross-process helpers for the callbacks: called at log time or stage end only, never per step."""

from __future__ import annotations

from typing import Any

import torch


def distributed(trainer) -> bool:
    """Whether a process group of more than one process is up (it is gone after ddp_green's teardown)."""
    return trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()


def reduce_sum(trainer, values: list[float]) -> list[float]:
    """Element-wise sum of ``values`` over all processes (a collective: every rank must call it)."""
    if not distributed(trainer):
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=trainer.strategy.root_device)
    return trainer.strategy.reduce(tensor, reduce_op="sum").tolist()


def gather_objects(trainer, obj: Any) -> list[Any]:
    """``obj`` from every process, in rank order (a collective)."""
    if not distributed(trainer):
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out
