"""``StructuredPruner``: one pruning event at a time, on a plain ``nn.Module`` (no Trainer).

Width mode removes the same share of units from every group (MLP hidden units rounded to
``round_to``, attention query groups), choosing in each group the units of lowest importance: every
block keeps the same shapes, which LitGPT's shared config requires. Depth mode removes the blocks
whose output is most like their input on held-out batches.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from lightning_green.checks import check_callable, check_choice, check_int
from lightning_green.pruning.groups import (
    FilterFn,
    ForwardFn,
    HeadGroup,
    MlpGroup,
    block_list,
    default_forward,
    head_groups,
    mlp_groups,
    never_pruned,
    query_group_rows,
)
from lightning_green.pruning.importance import (
    IMPORTANCES,
    TaylorScores,
    block_influence,
    linear_column_scores,
    linear_row_scores,
)
from lightning_green.pruning.shrink import (
    remove_blocks,
    shrink_linear_columns,
    shrink_linear_rows,
    sync_shape_fields,
)

MODES = ("width", "depth")
#: ``reduce(tensor) -> tensor`` summed over processes
Reduce = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class PruneEvent:
    """What one event did: the share of the prunable parameters removed so far, and which units each
    group lost (indices in that group's numbering just before the event)."""

    fraction: float
    seconds: float
    removed: dict[str, list[int]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"fraction": self.fraction, "seconds": self.seconds, "removed": self.removed}


def kept_units(original: int, fraction: float, multiple: int) -> int:
    """Units to keep of ``original`` after removing ``fraction``: a multiple of ``multiple``, at least
    ``multiple`` (or all of ``original`` when it is not larger)."""
    if original <= multiple:
        return original
    keep = int(round(original * (1 - fraction) / multiple)) * multiple
    return min(original, max(multiple, keep))


def linear_flops_per_token(model: nn.Module) -> int:
    """Analytic FLOPs per token of the matrix products: 2 per weight of every Linear (and of
    ``nn.MultiheadAttention``'s input projection). Attention over the context is not included."""
    total = 0
    for module in model.modules():
        if isinstance(module, nn.Linear):
            total += 2 * module.weight.numel()
        elif isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
            total += 2 * module.in_proj_weight.numel()
    return total


class StructuredPruner:
    """Find what can be removed from a model, then remove it in events.

    Args:
        mode: ``"width"`` (MLP hidden units and attention query groups) or ``"depth"`` (whole blocks).
        importance: ``"magnitude"`` (sum of squared weights) or ``"taylor"`` (``|w * grad|`` fed
            through :attr:`taylor`; magnitude until a step was accumulated).
        round_to: MLP widths stay a multiple of this.
        filter_fn: ``filter_fn(module, name) -> bool``; a group is prunable only when every Linear in it is kept.
        forward_fn: ``forward_fn(model, batch)`` runs the model (graph tracing, depth ranking).

    Raises:
        ValueError: a bad argument; in :meth:`discover`, a model with nothing prunable in ``mode``.
    """

    def __init__(
        self,
        mode: str = "width",
        importance: str = "magnitude",
        round_to: int = 8,
        filter_fn: FilterFn | None = None,
        forward_fn: ForwardFn = default_forward,
    ) -> None:
        self.mode = check_choice("mode", mode, MODES)
        self.importance = check_choice("importance", importance, IMPORTANCES)
        self.round_to = check_int("round_to", round_to, 1)
        self.filter_fn = check_callable("filter_fn", filter_fn)
        self.forward_fn = check_callable("forward_fn", forward_fn, optional=False)
        self.taylor = TaylorScores() if importance == "taylor" else None
        self.mlp: list[MlpGroup] = []
        self.heads: list[HeadGroup] = []
        self.blocks_name: str | None = None
        self.blocks_at_start = 0
        self.removed_blocks = 0
        self.params_before: dict[str, int] = {}
        self.flops_before = 0
        self.events: list[PruneEvent] = []
        self.notes: list[str] = []
        self._restored: dict[str, Any] = {}
        self._reduce: Reduce | None = None

    @property
    def discovered(self) -> bool:
        return bool(self.params_before)

    def discover(self, model: nn.Module, example_batch: Any) -> None:
        """Find the groups (width) or the block list (depth) of ``model``, tracing it on ``example_batch``."""
        found = block_list(model)
        if self.filter_fn is not None:
            for name in never_pruned(model, found[0] if found else None):
                if self.filter_fn(model.get_submodule(name), name):
                    self._note(f"filter_fn selects {name}: embeddings and the output head are never pruned")
        if found is not None:
            self.blocks_name = found[0]
            self.blocks_at_start = len(found[1])
        if self.mode == "depth":
            if found is None or self.blocks_at_start < 2:
                raise ValueError(
                    "`mode='depth'` is not supported for this model: it has no nn.ModuleList of at least two"
                    " blocks of one class; use mode='width'"
                )
        else:
            self.heads = head_groups(model, self.filter_fn)
            skip = frozenset(n for g in self.heads for n in (f"{g.attention}.qkv", f"{g.attention}.proj"))
            self.mlp = mlp_groups(model, example_batch, self.forward_fn, self.filter_fn, skip)
            self._apply_restored_sizes()
            self.heads = [g for g in self.heads if g.query_groups > 1]
            if not self.mlp and not self.heads:
                raise ValueError(
                    "nothing prunable in `mode='width'`: no Linear -> activation -> Linear pair and no fused-qkv"
                    " attention with more than one query group (check `filter_fn`)"
                )
        if self._restored:
            self.blocks_at_start = self._restored["blocks_at_start"]
            self.removed_blocks = self._restored["removed_blocks"]
            self.params_before = dict(self._restored["params_before"])
            self.flops_before = self._restored["flops_before"]
        else:
            self.params_before = self.parameter_counts(model)
            self.flops_before = linear_flops_per_token(model)

    def state_dict(self) -> dict[str, Any]:
        """The sizes before any event (to go on with a schedule from a checkpoint) and the events."""
        return {
            "mlp_widths": {",".join(g.outputs): g.width for g in self.mlp},
            "query_groups": {g.attention: g.query_groups for g in self.heads},
            "blocks_at_start": self.blocks_at_start,
            "removed_blocks": self.removed_blocks,
            "params_before": dict(self.params_before),
            "flops_before": self.flops_before,
            "events": [e.as_dict() for e in self.events],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take the sizes of :meth:`state_dict`: :meth:`discover` (of the model, pruned as the file
        says) counts from them, not from the model's present sizes."""
        self._restored = dict(state)
        self.events = [PruneEvent(**e) for e in state.get("events", [])]
        self.params_before = {}

    def _apply_restored_sizes(self) -> None:
        if not self._restored:
            return
        widths, query_groups = self._restored["mlp_widths"], self._restored["query_groups"]
        self.mlp = [replace(g, width=widths.get(",".join(g.outputs), g.width)) for g in self.mlp]
        self.heads = [replace(g, query_groups=query_groups.get(g.attention, g.query_groups)) for g in self.heads]

    def prunable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """The parameters the groups cut (what Taylor importance accumulates over)."""
        names = [n for g in self.mlp for n in g.outputs + g.inputs]
        names += [n for g in self.heads for n in (f"{g.attention}.qkv", f"{g.attention}.proj")]
        return [p for n in names for p in model.get_submodule(n).parameters()]

    def parameter_counts(self, model: nn.Module) -> dict[str, int]:
        """Parameters by kind: ``mlp`` and ``heads`` (the layers of the groups), ``blocks`` (the block
        list), and ``total``."""
        mlp_names = {n for g in self.mlp for n in g.outputs + g.inputs}
        head_names = {n for g in self.heads for n in (f"{g.attention}.qkv", f"{g.attention}.proj")}
        counts = {
            "mlp": sum(p.numel() for n in mlp_names for p in model.get_submodule(n).parameters()),
            "heads": sum(p.numel() for n in head_names for p in model.get_submodule(n).parameters()),
            "blocks": 0,
            "total": sum(p.numel() for p in model.parameters()),
        }
        if self.blocks_name is not None:
            counts["blocks"] = sum(p.numel() for p in model.get_submodule(self.blocks_name).parameters())
        return counts

    def prune_to(
        self,
        model: nn.Module,
        fraction: float,
        optimizers: Sequence[torch.optim.Optimizer] = (),
        held_out: Iterable[Any] = (),
        reduce: Reduce | None = None,
    ) -> PruneEvent:
        """Remove units until ``fraction`` of the prunable parameters are gone (counting earlier events).
        ``held_out``: batches for depth mode's ranking. The optimizers' state follows the kept units.
        ``reduce``: sums a tensor over processes (distributed training), so that every process ranks
        the units by the same scores and removes the same ones."""
        if not self.discovered:
            raise RuntimeError("StructuredPruner.prune_to() needs discover() first")
        start = time.perf_counter()
        self._reduce = reduce
        event = PruneEvent(fraction=fraction, seconds=0.0)
        if self.mode == "depth":
            self._remove_blocks(model, fraction, optimizers, held_out, event)
        else:
            for group in self.mlp:
                self._prune_mlp(model, group, fraction, optimizers, event)
            for group in self.heads:
                self._prune_heads(model, group, fraction, optimizers, event)
            sync_shape_fields(model)
        if self.taylor is not None:
            self.taylor.reset()
        event.seconds = time.perf_counter() - start
        self.events.append(event)
        return event

    def _prune_mlp(
        self, model: nn.Module, group: MlpGroup, fraction: float, optimizers: Sequence[Any], event: PruneEvent
    ) -> None:
        outputs = [model.get_submodule(n) for n in group.outputs]
        inputs = [model.get_submodule(n) for n in group.inputs]
        width = outputs[0].out_features
        keep = kept_units(group.width, fraction, self.round_to)
        if group.width <= self.round_to or group.width * (1 - fraction) < self.round_to:
            self._note(f"{group.outputs[0]}: keeps at least round_to={self.round_to} of {group.width} units")
        if keep >= width:
            return
        scores = sum(linear_row_scores(m, self.taylor) for m in outputs)
        scores = scores + sum(linear_column_scores(m, self.taylor) for m in inputs)
        kept = torch.topk(self._reduced(scores), keep).indices.sort().values.cpu()
        event.removed[",".join(group.outputs)] = _complement(width, kept)
        for layer in outputs:
            shrink_linear_rows(layer, kept, optimizers)
        for layer in inputs:
            shrink_linear_columns(layer, kept, optimizers)

    def _prune_heads(
        self, model: nn.Module, group: HeadGroup, fraction: float, optimizers: Sequence[Any], event: PruneEvent
    ) -> None:
        attention = model.get_submodule(group.attention)
        hs, per = group.head_size, group.heads_per_group
        n_groups = attention.proj.in_features // (hs * per)
        keep = max(1, int(round(group.query_groups * (1 - fraction))))
        if keep >= n_groups:
            return
        rows = linear_row_scores(attention.qkv, self.taylor)
        n_head = n_groups * per
        q = rows[: n_head * hs].reshape(n_groups, per * hs).sum(dim=1)
        k = rows[n_head * hs : (n_head + n_groups) * hs].reshape(n_groups, hs).sum(dim=1)
        v = rows[(n_head + n_groups) * hs :].reshape(n_groups, hs).sum(dim=1)
        cols = linear_column_scores(attention.proj, self.taylor).reshape(n_groups, per * hs).sum(dim=1)
        kept = torch.topk(self._reduced(q + k + v + cols), keep).indices.sort().values.cpu()
        event.removed[group.attention] = _complement(n_groups, kept)
        qkv_rows, proj_cols = query_group_rows(group, n_groups, kept)
        shrink_linear_rows(attention.qkv, qkv_rows, optimizers)
        shrink_linear_columns(attention.proj, proj_cols, optimizers)

    def _remove_blocks(
        self,
        model: nn.Module,
        fraction: float,
        optimizers: Sequence[Any],
        held_out: Iterable[Any],
        event: PruneEvent,
    ) -> None:
        blocks = model.get_submodule(self.blocks_name)
        target = min(self.blocks_at_start - 1, int(math.floor(fraction * self.blocks_at_start + 0.5)))
        count = target - self.removed_blocks
        if count <= 0:
            return
        was_training = model.training
        model.eval()
        try:
            scores = block_influence(blocks, lambda batch: self.forward_fn(model, batch), held_out)
        finally:
            model.train(was_training)
        device = next(blocks.parameters()).device
        removed = (
            torch.topk(self._reduced(scores.to(device)).cpu(), count, largest=False).indices.sort().values.tolist()
        )
        event.removed[self.blocks_name] = removed
        remove_blocks(blocks, removed, optimizers)
        self.removed_blocks = target
        sync_shape_fields(model)

    def _reduced(self, scores: torch.Tensor) -> torch.Tensor:
        return scores if self._reduce is None else self._reduce(scores)

    def _note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)


def _complement(width: int, kept: torch.Tensor) -> list[int]:
    mask = torch.ones(width, dtype=torch.bool)
    mask[kept] = False
    return torch.nonzero(mask).flatten().tolist()
