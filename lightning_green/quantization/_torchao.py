"""Everything this project asks of ``torchao``, in one place.

``torchao``'s API still moves between releases, so it is imported here and nowhere else, and only
inside functions: importing :mod:`lightning_green` never imports ``torchao``. A rename in a new
release costs this one file.

The named schemes live in :mod:`lightning_green.quantization.schemes`; the ``torchao`` configs of
the ``torchao`` ones are built on demand here by :func:`_linear_config` and :func:`_embedding_config`.

Measured with ``torchao`` 0.18 on CPU: ``QATConfig(base, step="prepare"|"convert")`` works with
``Int8DynamicActivationIntxWeightConfig`` and ``IntxWeightOnlyConfig``; ``Int4WeightOnlyConfig``
fails at convert without the ``mslk`` kernels, so it is not offered; float8 needs CUDA sm89+.
Converted int4 weights are stored unpacked, one int8 per value, plus one float scale per group; the
converted int4/8da4w layers (``IntxUnpackedToInt8Tensor``) have no x86 kernel in this build and run
2-5x slower than float on CPU.

``import torchao`` logs lines a user cannot act on: its CUDA extension libraries failing to load in a
process without CUDA, and torch's deprecation notice for an Enum that torchao registers.
:func:`load_torchao` imports it with exactly those records dropped (:class:`ImportNoiseFilter`);
with CUDA, a CUDA extension that fails to load is still reported.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from lightning_green.quantization.schemes import SCHEMES

FilterFn = Callable[[nn.Module, str], bool]

#: What ``import torchao`` logs that says nothing to a user of this project: its CUDA extension
#: libraries failing to load in a process without CUDA (``_C_mxfp8``, ``_C_cutlass_90a``: CUDA
#: kernels, unusable there anyway), and torch's deprecation notice for the Enum torchao registers.
_CUDA_EXTENSION_FAILED = re.compile(r"^Failed to load \S*torchao\S*/_C_\w+[.\w-]*\.so: ")
_ENUM_DEPRECATION = re.compile(r"is an Enum subclass and is now natively supported by torch\.compile")


class ImportNoiseFilter(logging.Filter):
    """Drops the log records of ``import torchao`` that say nothing to a user (see the patterns above).

    Args:
        cuda: whether this process can use CUDA; with CUDA a CUDA extension failing to load is kept.
    """

    def __init__(self, cuda: bool) -> None:
        super().__init__()
        self.cuda = cuda
        #: The messages dropped, for tests and debugging.
        self.dropped: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        harmless = _ENUM_DEPRECATION.search(message) is not None
        if not self.cuda and _CUDA_EXTENSION_FAILED.match(message):
            harmless = True
        if harmless:
            self.dropped.append(message)
        return not harmless


@contextlib.contextmanager
def quiet_torchao_import(cuda: bool) -> Iterator[ImportNoiseFilter]:
    """Within the block, the loggers ``import torchao`` writes to drop the records of
    :class:`ImportNoiseFilter`; everything else they log passes."""
    noise = ImportNoiseFilter(cuda)
    loggers = [logging.getLogger("torchao"), logging.getLogger("torch.utils._pytree")]
    for logger in loggers:
        logger.addFilter(noise)
    try:
        yield noise
    finally:
        for logger in loggers:
            logger.removeFilter(noise)


def load_torchao() -> None:
    """Import ``torchao`` (once) without the log lines of :class:`ImportNoiseFilter`. Every function
    here that may be the first to touch ``torchao`` calls it."""
    if "torchao" in sys.modules:
        return
    with quiet_torchao_import(cuda=torch.cuda.is_available()):
        # torchao: a heavy optional dependency, imported on first use only
        import torchao  # noqa: F401


def _linear_config(scheme: str, group_size: int) -> Any:
    load_torchao()
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Int8DynamicActivationIntxWeightConfig,
        IntxWeightOnlyConfig,
    )
    from torchao.quantization.granularity import PerAxis, PerGroup, PerRow

    if scheme == "int8_dynamic_int4_weight":
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(group_size))
    if scheme == "int4_weight_only":
        return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size))
    if scheme == "int8_weight_only":
        return IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0))
    if scheme == "float8_dynamic":
        return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    raise ValueError(f"`scheme` must be one of {sorted(SCHEMES)}, got {scheme!r}")


def _embedding_config(scheme: str, group_size: int) -> Any:
    # Activations of an embedding are indices: only weight-only configs apply. Schemes that also
    # quantize activations use the weight-only config with the same weight format.
    load_torchao()
    from torchao.quantization import IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerAxis, PerGroup

    if scheme in ("int8_dynamic_int4_weight", "int4_weight_only"):
        return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size))
    if scheme == "int8_weight_only":
        return IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0))
    raise ValueError(
        f"scheme {scheme!r} cannot quantize nn.Embedding weights; set `quantize_embeddings=False` or use one"
        f" of {[s.name for s in SCHEMES.values() if s.embeddings]}"
    )


def fake_quantized_types() -> tuple[type, ...]:
    """The module classes ``torchao`` swaps in at prepare."""
    load_torchao()
    from torchao.quantization.qat import FakeQuantizedEmbedding, FakeQuantizedLinear

    return (FakeQuantizedLinear, FakeQuantizedEmbedding)


def _is_fake_quantized_linear(module: nn.Module) -> bool:
    from torchao.quantization.qat import FakeQuantizedLinear

    return isinstance(module, FakeQuantizedLinear)


def _is_fake_quantized_embedding(module: nn.Module) -> bool:
    from torchao.quantization.qat import FakeQuantizedEmbedding

    return isinstance(module, FakeQuantizedEmbedding)


def is_quantized_tensor(tensor: Any) -> bool:
    """Whether ``tensor`` is one of ``torchao``'s quantized tensor subclasses (a converted weight)."""
    if not isinstance(tensor, torch.Tensor) or type(tensor) in (torch.Tensor, nn.Parameter):
        return False
    load_torchao()
    from torchao.utils import TorchAOBaseTensor

    return isinstance(tensor, TorchAOBaseTensor) or (
        isinstance(tensor, nn.Parameter) and isinstance(tensor.data, TorchAOBaseTensor)
    )


def prepare(
    model: nn.Module, scheme: str, group_size: int, linear_filter: FilterFn, embedding_filter: FilterFn | None
) -> None:
    """Swap the selected ``nn.Linear`` (and ``nn.Embedding``) layers of ``model`` for fake-quantized ones, in place.

    Parameter names do not change: a state dict of the float model loads into the prepared one.
    """
    load_torchao()
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    quantize_(model, QATConfig(_linear_config(scheme, group_size), step="prepare"), filter_fn=linear_filter)
    if embedding_filter is not None:
        quantize_(model, QATConfig(_embedding_config(scheme, group_size), step="prepare"), filter_fn=embedding_filter)


def quantize(
    model: nn.Module, scheme: str, group_size: int, linear_filter: FilterFn, embedding_filter: FilterFn | None = None
) -> None:
    """Post-training quantization: apply the scheme's ``torchao`` config to the selected layers, in place."""
    load_torchao()
    from torchao.quantization import quantize_

    quantize_(model, _linear_config(scheme, group_size), filter_fn=linear_filter)
    if embedding_filter is not None:
        quantize_(model, _embedding_config(scheme, group_size), filter_fn=embedding_filter)


def convert(model: nn.Module, scheme: str, group_size: int) -> None:
    """Replace every fake-quantized layer of ``model`` by its quantized form, in place."""
    load_torchao()
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    quantize_(
        model,
        QATConfig(_linear_config(scheme, group_size), step="convert"),
        filter_fn=lambda m, _fqn: _is_fake_quantized_linear(m),
    )
    if any(_is_fake_quantized_embedding(m) for m in model.modules()):
        quantize_(
            model,
            QATConfig(_embedding_config(scheme, group_size), step="convert"),
            filter_fn=lambda m, _fqn: _is_fake_quantized_embedding(m),
        )


def set_fake_quant_enabled(model: nn.Module, enabled: bool) -> int:
    """Turn fake quantization of every prepared layer on or off; returns how many quantizers were set."""
    count = 0
    for module in model.modules():
        if isinstance(module, fake_quantized_types()):
            for name in ("activation_fake_quantizer", "weight_fake_quantizer"):
                quantizer = getattr(module, name, None)
                if quantizer is not None:
                    quantizer.enabled = enabled
                    count += 1
    return count


def fake_quant_enabled(model: nn.Module) -> list[bool]:
    """The ``enabled`` flag of every fake quantizer in ``model``, in module order."""
    flags = []
    for module in model.modules():
        if isinstance(module, fake_quantized_types()):
            for name in ("activation_fake_quantizer", "weight_fake_quantizer"):
                quantizer = getattr(module, name, None)
                if quantizer is not None:
                    flags.append(bool(quantizer.enabled))
    return flags


def dequantize_(model: nn.Module) -> list[str]:
    """Give every converted layer of ``model`` back float weights (the dequantized values), in place.

    Returns the names of the parameters that were dequantized. The float values the model had before
    conversion are gone; these are the nearest the quantized model holds.
    """
    names = []
    for module_name, module in model.named_modules():
        for param_name, param in list(module.named_parameters(recurse=False)):
            if is_quantized_tensor(param):
                value = param.dequantize() if hasattr(param, "dequantize") else param.data.dequantize()
                setattr(module, param_name, nn.Parameter(value.detach().clone(), requires_grad=True))
                names.append(f"{module_name}.{param_name}" if module_name else param_name)
    return names


# Lightning loads checkpoints with a callable ``map_location``, which torch cannot apply to tensor
# subclasses ("Callable map_location not supported with _rebuild_wrapper_subclass"). A converted
# weight is therefore written into checkpoints as its plain inner tensors plus the subclass's
# flatten context (torch's ``__tensor_flatten__``/``__tensor_unflatten__`` protocol), and rebuilt on
# load.
_ENCODED = "__lightning_green_quantized_tensor__"


def encode_quantized_tensors(state_dict: dict[str, Any]) -> list[str]:
    """Replace every quantized tensor of ``state_dict`` by a dict of plain tensors, in place; returns the keys."""
    keys = [key for key, value in state_dict.items() if is_quantized_tensor(value)]
    for key in keys:
        tensor = state_dict[key]
        names, ctx = tensor.__tensor_flatten__()
        cls = type(tensor)
        state_dict[key] = {
            _ENCODED: 1,
            "class": f"{cls.__module__}:{cls.__qualname__}",
            "inner": {name: getattr(tensor, name) for name in names},
            "ctx": ctx,
            "size": tuple(tensor.size()),
            "stride": tuple(tensor.stride()),
        }
    return keys


def decode_quantized_tensors(state_dict: dict[str, Any], prefix: str = "") -> list[str]:
    """Undo :func:`encode_quantized_tensors` for the keys under ``prefix``, in place; returns the keys.

    Raises:
        ValueError: an encoded entry names a class outside ``torchao``.
    """
    import importlib

    keys = [k for k, v in state_dict.items() if k.startswith(prefix) and isinstance(v, dict) and _ENCODED in v]
    if keys:
        load_torchao()
    for key in keys:
        entry = state_dict[key]
        module_name, _, qualname = entry["class"].partition(":")
        if not module_name.startswith("torchao."):
            raise ValueError(f"checkpoint entry {key!r} names {entry['class']!r}, not a torchao tensor class")
        cls: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            cls = getattr(cls, part)
        state_dict[key] = cls.__tensor_unflatten__(
            entry["inner"], entry["ctx"], torch.Size(entry["size"]), entry["stride"]
        )
    return keys
