"""Which parts of a model can be removed together: MLP hidden units, attention query groups, blocks.

- **MLP units** (``Linear -> activation -> Linear``, LLaMA's gated ``fc_1``/``fc_2 -> proj`` too):
  torch-pruning's ``DependencyGraph`` traces the model once and ``get_pruning_group`` returns the
  layers coupled to one layer's output channels. ``get_pruning_group`` on a fused ``qkv`` or on a
  residual-stream layer had not returned after minutes with torch-pruning 1.6.1 (the index mapping
  spreads through split/view ops and every block), so it is asked only about layers whose output
  reaches Linear layers through element-wise ops alone (a bounded walk over the traced graph, here).
- **Attention heads**: the graph cannot know LitGPT's fused ``qkv`` layout, so the model's own layout
  is used: a module with ``qkv`` and ``proj`` Linear layers and a ``config`` with ``n_head``,
  ``n_query_groups`` and ``head_size`` (LitGPT's ``CausalSelfAttention``). The unit is a query group:
  its query heads, its key head and its value head (one head when there is no GQA).
- **Blocks**: the largest ``nn.ModuleList`` of modules of one class (``transformer.h``, ``layers``).

Embeddings and the output head are never in a group: their channels are the residual stream or the
vocabulary, which no group of Linear layers closes over.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

FilterFn = Callable[[nn.Module, str], bool]
ForwardFn = Callable[[nn.Module, Any], Any]

#: How many graph nodes the walk from a layer's output may visit before it gives up on that layer.
WALK_LIMIT = 64


@dataclass(frozen=True)
class MlpGroup:
    """Hidden units shared by ``outputs`` (rows) and ``inputs`` (columns): removing unit ``j`` removes
    row ``j`` of every output layer and column ``j`` of every input layer."""

    outputs: tuple[str, ...]
    inputs: tuple[str, ...]
    width: int


@dataclass(frozen=True)
class HeadGroup:
    """The query groups of one attention module with a fused ``qkv`` (LitGPT layout)."""

    attention: str
    query_groups: int
    heads_per_group: int
    head_size: int


def default_forward(model: nn.Module, batch: Any) -> Any:
    """Run ``model`` on a batch: the batch itself when it is a tensor, else its first element."""
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    return model(batch)


def is_fused_qkv_attention(module: nn.Module) -> bool:
    """True for an attention module laid out as LitGPT's ``CausalSelfAttention`` (query heads, then key
    heads, then value heads in one ``qkv`` Linear; ``proj`` reads the query heads' outputs)."""
    config = module.__dict__.get("config")
    qkv = module._modules.get("qkv")
    proj = module._modules.get("proj")
    if not isinstance(qkv, nn.Linear) or not isinstance(proj, nn.Linear) or config is None:
        return False
    needed = ("n_head", "n_query_groups", "head_size")
    return all(isinstance(getattr(config, name, None), int) for name in needed)


def head_groups(model: nn.Module, filter_fn: FilterFn | None = None) -> list[HeadGroup]:
    """Every fused-qkv attention module whose query groups can be removed (``filter_fn`` keeps both
    its ``qkv`` and ``proj``). Refuses layouts whose norms span all heads (OLMo-2's ``norm_qk``)."""
    found = []
    for name, module in model.named_modules():
        if not is_fused_qkv_attention(module):
            continue
        config = module.config
        if config.norm_qk and config.norm_qk_type == "olmo2":
            continue
        if filter_fn is not None and not (
            filter_fn(module.qkv, f"{name}.qkv") and filter_fn(module.proj, f"{name}.proj")
        ):
            continue
        per_group = config.n_head // config.n_query_groups
        found.append(HeadGroup(name, config.n_query_groups, per_group, config.head_size))
    return found


def query_group_rows(group: HeadGroup, n_groups: int, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For ``kept`` query-group indices of a module that now has ``n_groups``: the ``qkv`` rows and the
    ``proj`` columns that stay."""
    hs, per = group.head_size, group.heads_per_group
    n_head = n_groups * per
    offsets = torch.arange(hs)
    heads = (kept[:, None] * per + torch.arange(per)[None, :]).reshape(-1)
    q_rows = (heads[:, None] * hs + offsets[None, :]).reshape(-1)
    k_rows = n_head * hs + (kept[:, None] * hs + offsets[None, :]).reshape(-1)
    v_rows = (n_head + n_groups) * hs + (kept[:, None] * hs + offsets[None, :]).reshape(-1)
    return torch.cat([q_rows, k_rows, v_rows]), q_rows


def never_pruned(model: nn.Module, blocks: str | None = None) -> list[str]:
    """Names of the embeddings and of the output head (a Linear outside the ``blocks`` list whose
    outputs are as many as an embedding's rows: the vocabulary). No group holds them; a ``filter_fn``
    that selects them is told so."""
    vocab = {m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)}
    inside = f"{blocks}." if blocks else None
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Embedding)
        or (isinstance(m, nn.Linear) and m.out_features in vocab and not (inside and name.startswith(inside)))
    ]


def block_list(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The ``nn.ModuleList`` of same-class modules holding the most parameters, with its name."""
    best, best_params = None, 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or not len(module):
            continue
        if len({type(m) for m in module}) != 1:
            continue
        params = sum(p.numel() for p in module.parameters())
        if params > best_params:
            best, best_params = (name, module), params
    return best


def mlp_groups(
    model: nn.Module,
    example_batch: Any,
    forward_fn: ForwardFn = default_forward,
    filter_fn: FilterFn | None = None,
    skip: frozenset[str] = frozenset(),
) -> list[MlpGroup]:
    """The MLP hidden-unit groups of ``model``, found on a graph traced from one forward pass.

    ``skip``: names of Linear layers not to consider (the fused-qkv attention layers, handled by their
    own layout). A group is kept only when every layer in it is an ``nn.Linear`` that ``filter_fn``
    keeps, and the units map one to one from the outputs to the inputs.
    """
    # torch_pruning: a heavy optional dependency (the `pruning` extra), imported where it is used.
    import torch_pruning as tp

    names = {module: name for name, module in model.named_modules()}
    with warnings.catch_warnings():
        # it warns about norm weights it would prune along the last dimension; we never prune those
        warnings.simplefilter("ignore", UserWarning)
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_batch, forward_fn=forward_fn)
    found: dict[tuple[str, ...], MlpGroup] = {}
    for module, name in names.items():
        if not isinstance(module, nn.Linear) or name in skip or module not in graph.module2node:
            continue
        if any(name in key for key in found):
            continue
        if not _reaches_linear_only(graph.module2node[module], tp.ops.OPTYPE):
            continue
        group = _coupled_linears(graph, tp, module, names)
        if group is None:
            continue
        if filter_fn is not None and not all(
            filter_fn(model.get_submodule(n), n) for n in group.outputs + group.inputs
        ):
            continue
        found[group.outputs] = group
    return list(found.values())


def _reaches_linear_only(node: Any, optype: Any) -> bool:
    """True when every path from ``node``'s output goes through element-wise ops (activations,
    dropout, products) or a flattening reshape into Linear layers, within :data:`WALK_LIMIT` nodes."""
    passing = {optype.ELEMENTWISE, optype.RESHAPE}
    todo, seen, reached = list(node.outputs), set(), False
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if len(seen) > WALK_LIMIT:
            return False
        if current.type == optype.LINEAR:
            reached = True
            continue
        if current.type not in passing:
            return False
        todo.extend(current.outputs)
    return reached


def _coupled_linears(graph: Any, tp: Any, module: nn.Linear, names: dict[nn.Module, str]) -> MlpGroup | None:
    probe = list(range(min(4, module.out_features)))
    group = graph.get_pruning_group(module, tp.prune_linear_out_channels, probe)
    outputs, inputs = [], []
    for dep, idxs in group:
        target = dep.target.module
        if dep.target.type != tp.ops.OPTYPE.LINEAR:
            if isinstance(target, nn.Module) and any(True for _ in target.parameters(recurse=False)):
                return None
            continue
        if not isinstance(target, nn.Linear) or sorted(int(i) for i in idxs) != probe:
            return None
        handler = getattr(dep.handler, "__name__", "")
        if handler == "prune_out_channels":
            outputs.append(names[target])
        elif handler == "prune_in_channels":
            inputs.append(names[target])
        else:
            return None
    if not inputs or not outputs:
        return None
    return MlpGroup(tuple(sorted(set(outputs))), tuple(sorted(set(inputs))), module.out_features)
