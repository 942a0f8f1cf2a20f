"""How much each unit matters: weight magnitude, or first-order Taylor ``|w * grad|`` accumulated over
the steps before an event; blocks by ``1 - cos(input, output)`` of their hidden states."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

IMPORTANCES = ("magnitude", "taylor")


class TaylorScores:
    """``sum |w * grad|`` per weight element, accumulated each optimizer step until :meth:`reset`."""

    def __init__(self) -> None:
        self.sums: dict[nn.Parameter, torch.Tensor] = {}
        self.steps = 0

    @torch.no_grad()
    def accumulate(self, params: Iterable[nn.Parameter]) -> None:
        for param in params:
            if param.grad is None:
                continue
            score = (param.detach() * param.grad.detach()).abs().float()
            total = self.sums.get(param)
            if total is None or total.shape != score.shape:
                self.sums[param] = score
            else:
                total.add_(score)
        self.steps += 1

    def reset(self) -> None:
        self.sums = {}
        self.steps = 0


def element_scores(param: nn.Parameter, taylor: TaylorScores | None) -> torch.Tensor:
    """The per-element score of ``param``: accumulated Taylor when there is one, else ``w**2``."""
    if taylor is not None:
        total = taylor.sums.get(param)
        if total is not None and total.shape == param.shape:
            return total
    return param.detach().float().pow(2)


def linear_row_scores(layer: nn.Linear, taylor: TaylorScores | None) -> torch.Tensor:
    """One score per output feature: its weight row (and bias) summed."""
    scores = element_scores(layer.weight, taylor).sum(dim=1)
    if layer.bias is not None:
        scores = scores + element_scores(layer.bias, taylor)
    return scores


def linear_column_scores(layer: nn.Linear, taylor: TaylorScores | None) -> torch.Tensor:
    """One score per input feature: its weight column summed."""
    return element_scores(layer.weight, taylor).sum(dim=0)


@torch.no_grad()
def block_influence(blocks: nn.ModuleList, run: Callable[[Any], Any], batches: Iterable[Any]) -> torch.Tensor:
    """``1 - cos`` between each block's input and output hidden states, averaged over tokens and
    ``batches``; ``run(batch)`` runs the model forward. A block that barely changes its input
    scores near 0 and goes first."""
    totals = torch.zeros(len(blocks), dtype=torch.float64)
    counts = torch.zeros(len(blocks), dtype=torch.float64)

    def hook_for(index: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            before = args[0] if args else None
            after = output[0] if isinstance(output, (tuple, list)) else output
            if not isinstance(before, torch.Tensor) or not isinstance(after, torch.Tensor):
                return
            if before.shape != after.shape:
                return
            cos = torch.nn.functional.cosine_similarity(before.float(), after.float(), dim=-1)
            totals[index] += (1 - cos).sum().item()
            counts[index] += cos.numel()

        return hook

    handles = [block.register_forward_hook(hook_for(i)) for i, block in enumerate(blocks)]
    try:
        for batch in batches:
            run(batch)
    finally:
        for handle in handles:
            handle.remove()
    if not bool((counts > 0).all()):
        raise ValueError("depth mode: the blocks' inputs and outputs could not be read (tensors of one shape)")
    return totals / counts
