"""Physical removal: Linear rows and columns, whole blocks, with the optimizer state and the shape
fields the model's ``forward`` reads kept consistent.

A cut weight is a new ``nn.Parameter`` (changing a Parameter's ``.data`` shape in place breaks the
next backward while any traced graph still holds its gradient accumulator, as torch-pruning's graph
does). Each optimizer's ``param_groups`` get the new Parameter in the old one's place, and its state
(Adam's moments, SGD's momentum) is cut to the same rows/columns. torch-pruning's prune functions
do not update optimizers nor return the kept indices, which this needs, so the shrink is ours. A
wrapper that holds Parameters (DDP) must be rebuilt after.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from lightning_green.pruning.groups import is_fused_qkv_attention


def shrink_parameter(
    module: nn.Module, name: str, dim: int, kept: torch.Tensor, optimizers: Sequence[torch.optim.Optimizer] = ()
) -> nn.Parameter:
    """Replace ``module.<name>`` by a new Parameter of its ``kept`` indices along ``dim``; in each
    optimizer, the new Parameter takes the old one's place and its state is cut the same way."""
    old = getattr(module, name)
    kept = kept.to(old.device)
    new = nn.Parameter(old.detach().index_select(dim, kept).contiguous(), requires_grad=old.requires_grad)
    setattr(module, name, new)
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["params"] = [new if p is old else p for p in group["params"]]
        state = optimizer.state.pop(old, None)
        if not state:
            continue
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.shape == old.shape:
                state[key] = value.index_select(dim, kept.to(value.device)).contiguous()
        optimizer.state[new] = state
    return new


def shrink_linear_rows(layer: nn.Linear, kept: torch.Tensor, optimizers: Sequence[torch.optim.Optimizer] = ()) -> None:
    """Keep output features ``kept`` of ``layer`` (weight rows and bias)."""
    shrink_parameter(layer, "weight", 0, kept, optimizers)
    if layer.bias is not None:
        shrink_parameter(layer, "bias", 0, kept, optimizers)
    layer.out_features = len(kept)


def shrink_linear_columns(
    layer: nn.Linear, kept: torch.Tensor, optimizers: Sequence[torch.optim.Optimizer] = ()
) -> None:
    """Keep input features ``kept`` of ``layer`` (weight columns)."""
    shrink_parameter(layer, "weight", 1, kept, optimizers)
    layer.in_features = len(kept)


def remove_blocks(
    blocks: nn.ModuleList, removed: Iterable[int], optimizers: Sequence[torch.optim.Optimizer] = ()
) -> None:
    """Delete ``removed`` modules of ``blocks``, and their parameters from each optimizer."""
    removed = sorted(set(removed), reverse=True)
    gone = {id(p) for i in removed for p in blocks[i].parameters()}
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in gone]
        for param in [p for p in optimizer.state if id(p) in gone]:
            del optimizer.state[param]
    for i in removed:
        del blocks[i]


def sync_shape_fields(model: nn.Module) -> None:
    """Set the fields that ``forward`` and the KV cache read from the layers' present shapes.

    LitGPT: ``config.n_head``, ``config.n_query_groups`` (from ``qkv``/``proj``), ``intermediate_size``
    of each MLP and of the config, ``config.n_layer``. ``nn.TransformerEncoder.num_layers``.
    The config is shared by every block, so every block must have the same shapes: ``ValueError`` if not.
    """
    configs: dict[int, tuple[Any, dict[str, set[int]]]] = {}

    def note(config: Any, field: str, value: int) -> None:
        configs.setdefault(id(config), (config, {}))[1].setdefault(field, set()).add(value)

    for module in model.modules():
        if is_fused_qkv_attention(module):
            hs = module.config.head_size
            n_head = module.proj.in_features // hs
            note(module.config, "n_head", n_head)
            note(module.config, "n_query_groups", (module.qkv.out_features // hs - n_head) // 2)
        intermediate = module.__dict__.get("intermediate_size")
        if isinstance(intermediate, int):
            first = next((m for m in module.children() if isinstance(m, nn.Linear)), None)
            if first is not None:
                module.intermediate_size = first.out_features
                if "config" in module.__dict__:
                    note(module.config, "intermediate_size", first.out_features)
        if isinstance(module, nn.TransformerEncoder):
            module.num_layers = len(module.layers)
        transformer = module._modules.get("transformer")
        if "config" in module.__dict__ and isinstance(transformer, nn.ModuleDict) and "h" in transformer:
            note(module.config, "n_layer", len(transformer["h"]))
    for config, fields in configs.values():
        for field, values in fields.items():
            if len(values) != 1:
                raise ValueError(
                    f"the blocks of one model config have different `{field}` after pruning: {sorted(values)};"
                    " LitGPT reads one value for all blocks"
                )
            setattr(config, field, values.pop())


def reshape_to_state_dict(model: nn.Module, state_dict: dict[str, Any], prefix: str = "") -> list[str]:
    """Give ``model`` the shapes of a checkpoint's ``state_dict`` before it loads: an unpruned model
    takes a pruned file's shapes, a pruned model takes those of a file written before it was pruned.
    Blocks are removed from (or copies of the last appended to) each ``nn.ModuleList``, and every
    Linear whose weight differs gets new Parameters of the file's shape (the load fills them).
    Returns the names of what changed. Only shapes are read, so no record of the events is needed.
    """
    changed = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.ModuleList) or not len(module):
            continue
        key = f"{prefix}{name}."
        present = {k[len(key) :].split(".", 1)[0] for k in state_dict if k.startswith(key)}
        indices = {int(i) for i in present if i.isdigit()}
        if not indices or max(indices) + 1 == len(module):
            continue
        if max(indices) + 1 < len(module):
            remove_blocks(module, range(max(indices) + 1, len(module)))
        else:
            while len(module) < max(indices) + 1:
                module.append(copy.deepcopy(module[-1]))
        changed.append(name)
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        saved = state_dict.get(f"{prefix}{name}.weight")
        if not isinstance(saved, torch.Tensor) or saved.shape == module.weight.shape:
            continue
        rows, cols = saved.shape
        like = module.weight
        module.weight = nn.Parameter(like.new_zeros(rows, cols), requires_grad=like.requires_grad)
        if module.bias is not None:
            module.bias = nn.Parameter(like.new_zeros(rows), requires_grad=module.bias.requires_grad)
        module.out_features = rows
        module.in_features = cols
        changed.append(name)
    if changed:
        sync_shape_fields(model)
    return changed
