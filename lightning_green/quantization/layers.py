"""Which layers to quantize, and the model-level operations of either backend (torch int8, torchao).

Layer selection never breaks a model: a Linear whose weight is read outside its own ``forward``
stays float. That is ``nn.MultiheadAttention.out_proj`` (a ``NonDynamicallyQuantizableLinear``:
``F.multi_head_attention_forward`` reads ``out_proj.weight`` directly) and any layer whose weight is
shared with another module (tied embeddings and output heads).

``torchao`` is only touched when it is already imported (a torchao scheme was used): a model cannot
hold torchao layers otherwise, so the torch int8 path never imports it.
"""

from __future__ import annotations

import math
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from lightning_green.quantization import _torchao, int8
from lightning_green.quantization.schemes import SCHEMES

FilterFn = Callable[[nn.Module, str], bool]
#: The smallest group size an error message suggests (smaller groups cost more scales than they save).
MIN_SUGGESTED_GROUP_SIZE = 16


@dataclass
class Selection:
    """Layers to prepare, and the ones left in float with the reason (``"name (reason)"``)."""

    linears: set[str] = field(default_factory=set)
    embeddings: set[str] = field(default_factory=set)
    left_float: list[str] = field(default_factory=list)
    #: Layers left float because their width is not a multiple of ``group_size``: name -> width.
    misfit_widths: dict[str, int] = field(default_factory=dict)


def _torchao_if_loaded() -> Any:
    """The ``_torchao`` module when ``torchao`` is imported already, else ``None``."""
    if "torchao" not in sys.modules:
        return None
    return _torchao


def select_layers(
    model: nn.Module, scheme: str, group_size: int, filter_fn: FilterFn | None, embeddings: bool
) -> Selection:
    """The float layers of ``model`` that ``scheme`` can quantize, after ``filter_fn``."""
    grouped = SCHEMES[scheme].grouped
    shared = Counter(
        id(m.weight)
        for _, m in model.named_modules(remove_duplicate=False)
        if isinstance(getattr(m, "weight", None), nn.Parameter)
    )
    out = Selection()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            width, kind, chosen = module.in_features, "in_features", out.linears
        elif isinstance(module, nn.Embedding) and embeddings:
            width, kind, chosen = module.embedding_dim, "embedding_dim", out.embeddings
        else:
            continue
        if is_quantized_layer(module) or (filter_fn is not None and not filter_fn(module, name)):
            continue
        label = name or "<root>"
        if isinstance(module, NonDynamicallyQuantizableLinear):
            out.left_float.append(f"{label} (weight read by nn.MultiheadAttention)")
        elif shared[id(module.weight)] > 1:
            out.left_float.append(f"{label} (tied weight)")
        elif grouped and width % group_size != 0:
            out.left_float.append(f"{label} ({kind}={width} not a multiple of group_size={group_size})")
            out.misfit_widths[label] = width
        else:
            chosen.add(name)
    return out


def is_quantized_layer(module: nn.Module) -> bool:
    """Whether ``module`` is already fake-quantized or converted by either backend."""
    if isinstance(module, int8.FAKE_QUANTIZED + int8.CONVERTED):
        return True
    ao = _torchao_if_loaded()
    return ao is not None and (
        isinstance(module, ao.fake_quantized_types()) or ao.is_quantized_tensor(getattr(module, "weight", None))
    )


def prepare_selected(
    model: nn.Module, scheme: str, group_size: int, filter_fn: FilterFn | None, embeddings: bool
) -> Selection:
    """Select the layers (one warning lists those left float) and prepare them; returns the selection.

    Raises:
        ValueError: no layer to quantize.
    """
    chosen = select_layers(model, scheme, group_size, filter_fn, embeddings)
    if chosen.left_float:
        rank_zero_warn(
            f"QuantizationAwareTraining: {len(chosen.left_float)} layer(s) left in float:"
            f" {', '.join(chosen.left_float)}"
        )
    if not chosen.linears and not chosen.embeddings:
        raise ValueError(_nothing_to_quantize(model, scheme, group_size, filter_fn, chosen))
    prepare(model, scheme, group_size, chosen)
    return chosen


def _nothing_to_quantize(
    model: nn.Module, scheme: str, group_size: int, filter_fn: FilterFn | None, chosen: Selection
) -> str:
    """Why no layer of ``model`` can be quantized, and what to do."""
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    message = (
        f"QuantizationAwareTraining found no layer to quantize with scheme={scheme!r}: the model has {n_linear}"
        f" nn.Linear layer(s); {len(chosen.left_float)} must stay float"
    )
    if chosen.misfit_widths:
        widths = sorted(set(chosen.misfit_widths.values()))
        message += (
            f"; {len(chosen.misfit_widths)} of them because their widths {widths} are not a multiple of"
            f" group_size={group_size} ({scheme!r} quantizes weights in groups of group_size values): "
            + _misfit_advice(widths, group_size)
        )
    others = [reason for reason in chosen.left_float if reason.split(" (")[0] not in chosen.misfit_widths]
    if others:
        message += f"; the others: {', '.join(others)}"
    if filter_fn is not None:
        message += "; filter_fn excluded the rest"
    return (
        message
        + ". Layers built in setup()/configure_model() are not created yet when the callback prepares the model."
    )


def _misfit_advice(widths: list[int], group_size: int) -> str:
    """What to change so that layers of ``widths`` can be quantized in groups."""
    common = math.gcd(*widths)
    largest_power_of_two = common & -common
    ungrouped = [name for name, s in SCHEMES.items() if not s.grouped]
    advice = f"use a scheme without groups ({', '.join(ungrouped)})"
    if MIN_SUGGESTED_GROUP_SIZE <= largest_power_of_two < group_size:
        advice = f"set group_size={largest_power_of_two} (it divides every width) or " + advice
    return advice + " or widths that are multiples of group_size"


def _leave_fast_paths(model: nn.Module, linears: set[str]) -> None:
    """``nn.TransformerEncoderLayer``'s inference fast path reads ``linear1``/``linear2``'s weights
    itself, skipping their ``forward``: turn it off for layers that hold selected Linears. The flag it
    clears gates only that fast path (the activation itself is ``self.activation``)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.TransformerEncoderLayer) and {f"{name}.linear1", f"{name}.linear2"} & linears:
            module.activation_relu_or_gelu = 0


def prepare(model: nn.Module, scheme: str, group_size: int, selection: Selection) -> None:
    """Swap the selected layers for fake-quantized ones of ``scheme``, in place (parameter names kept)."""
    _leave_fast_paths(model, selection.linears)
    if SCHEMES[scheme].backend == "torch":
        int8.prepare(model, selection.linears, selection.embeddings)
        return
    linears, embeddings = selection.linears, selection.embeddings
    _torchao.prepare(
        model,
        scheme,
        group_size,
        linear_filter=lambda _m, fqn: fqn in linears,
        embedding_filter=(lambda _m, fqn: fqn in embeddings) if embeddings else None,
    )


def convert(model: nn.Module, scheme: str, group_size: int) -> None:
    """Replace every fake-quantized layer of ``model`` by its converted form, in place."""
    int8.convert(model)
    ao = _torchao_if_loaded()
    if ao is not None and SCHEMES[scheme].backend == "torchao":
        ao.convert(model, scheme, group_size)


def is_prepared(model: nn.Module) -> bool:
    ao = _torchao_if_loaded()
    types = int8.FAKE_QUANTIZED + (ao.fake_quantized_types() if ao is not None else ())
    return any(isinstance(m, types) for m in model.modules())


def is_converted(model: nn.Module) -> bool:
    if any(isinstance(m, int8.CONVERTED) for m in model.modules()):
        return True
    ao = _torchao_if_loaded()
    return ao is not None and any(ao.is_quantized_tensor(p) for p in model.parameters())


def set_fake_quant_enabled(model: nn.Module, enabled: bool) -> None:
    for module in model.modules():
        if isinstance(module, int8.FAKE_QUANTIZED):
            module.fake_quant_enabled = enabled
    ao = _torchao_if_loaded()
    if ao is not None:
        ao.set_fake_quant_enabled(model, enabled)


def fake_quant_enabled(model: nn.Module) -> list[bool]:
    """One flag per fake-quantized layer (torchao: per quantizer), in module order."""
    flags = [bool(m.fake_quant_enabled) for m in model.modules() if isinstance(m, int8.FAKE_QUANTIZED)]
    ao = _torchao_if_loaded()
    return flags + (ao.fake_quant_enabled(model) if ao is not None else [])


def to_float(model: nn.Module) -> list[str]:
    """Give every converted layer float weights again (its dequantized values), in place; the names."""
    names = int8.to_float(model)
    ao = _torchao_if_loaded()
    return names + (ao.dequantize_(model) if ao is not None else [])


def encode_for_checkpoint(state_dict: dict[str, Any]) -> None:
    """Make converted tensors loadable by Lightning (torchao subclasses become plain tensors)."""
    ao = _torchao_if_loaded()
    if ao is not None:
        ao.encode_quantized_tensors(state_dict)


def checkpoint_holds_converted(state_dict: dict[str, Any], prefix: str) -> bool:
    """Whether the weights under ``prefix`` are a converted model's (torchao entries are decoded, in place)."""
    if int8.is_converted_state(state_dict, prefix):
        return True
    if not any(isinstance(v, dict) for v in state_dict.values()) and _torchao_if_loaded() is None:
        return False
    _torchao.decode_quantized_tensors(state_dict, prefix)
    return any(k.startswith(prefix) and _torchao.is_quantized_tensor(v) for k, v in state_dict.items())


def dequantize_checkpoint(state_dict: dict[str, Any], prefix: str) -> int:
    """Turn converted weights under ``prefix`` into float ones, in place; returns how many."""
    count = len(int8.dequantize_state_dict(state_dict, prefix))
    ao = _torchao_if_loaded()
    if ao is not None:
        keys = [k for k, v in state_dict.items() if k.startswith(prefix) and ao.is_quantized_tensor(v)]
        for key in keys:
            state_dict[key] = state_dict[key].dequantize()
        count += len(keys)
    return count
