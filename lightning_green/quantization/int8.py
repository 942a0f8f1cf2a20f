"""The ``"int8_dynamic"`` scheme on torch's own kernels: fake quantization that computes what the
deployed kernel computes, and the converted layers that run the kernel.

Deployed kernel: ``torch.ops.quantized.linear_dynamic`` (fbgemm/onednn on x86, qnnpack on ARM), the
kernel behind ``torch.ao.quantization.quantize_dynamic``. Per call it takes the input's min and max
(zero included), quantizes the input to 7-bit unsigned values (``reduce_range=True``, as the x86
engines need), multiplies with int8 weights in int32 and rescales. Weights are symmetric int8 per
output channel, ``scale = max|w| / 127``, values in ``[-127, 127]``.

QAT rounds as ``fake_quantize_per_tensor_affine`` (activations, with the kernel's own
``_choose_qparams_per_tensor``) and ``fake_quantize_per_channel_affine`` (weights, the same scale as
the conversion) do, written as a few in-place passes with straight-through gradients (several times
faster than those ops on CPU): the fake-quantized forward equals the converted one up to float
rounding.

Converted layers keep plain tensors in their ``state_dict`` under the float names (``weight`` as
int8, plus ``weight_scale``), so checkpoints load with any ``map_location``; the packed weight the
kernel needs is built on first use and again whenever the weight changes.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

QMAX_WEIGHT = 127
# reduce_range=True: 7-bit unsigned activations
QMAX_ACTIVATION = 127
REDUCE_RANGE = True


def weight_scale(weight: torch.Tensor) -> torch.Tensor:
    """Symmetric per-row scale: ``max|w| / 127`` over each row (output channel), never zero."""
    return (weight.detach().abs().amax(dim=1).float() / QMAX_WEIGHT).clamp_min(1e-12)


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(int8 values, float scale per row)`` of a float weight."""
    scale = weight_scale(weight)
    # the same rounding as in training, exactly
    rounded = fake_quantize_weight(weight.detach().float())
    values = torch.round(rounded / scale[:, None]).clamp(-QMAX_WEIGHT, QMAX_WEIGHT)
    return values.to(torch.int8), scale


def fake_quantize_weight(weight: torch.Tensor) -> torch.Tensor:
    """The weight rounded to the int8 grid of :func:`quantize_weight`, straight-through gradient.

    Computes what ``torch.fake_quantize_per_channel_affine`` computes (``round(w / scale)`` clamped to
    ``[-127, 127]``, times ``scale``) in a few in-place passes, several times faster on CPU. With
    ``scale = max|w| / 127`` no value is clamped, so the gradient is exactly the identity.
    """
    scale = weight_scale(weight)
    detached = weight.detach()
    delta = (detached * (1.0 / scale)[:, None]).round_().clamp_(-QMAX_WEIGHT, QMAX_WEIGHT).mul_(scale[:, None])
    return weight + delta.sub_(detached).to(weight.dtype)


def fake_quantize_activation(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded as the dynamic kernel quantizes it (per tensor, asymmetric, 7 bits), with the
    kernel's own ``_choose_qparams_per_tensor``; straight-through gradient.

    The same arithmetic as ``torch.fake_quantize_per_tensor_affine`` (``x * (1 / scale)`` rounded half
    to even, plus the zero point, clamped to ``[0, 127]``), in place. The range spans the tensor's own
    minimum and maximum, so nothing is clamped and the gradient is exactly the identity.
    """
    scale, zero_point = torch._choose_qparams_per_tensor(x.detach(), REDUCE_RANGE)
    detached = x.detach()
    delta = (detached * (1.0 / scale)).round_().add_(zero_point).clamp_(0, QMAX_ACTIVATION).sub_(zero_point).mul_(scale)
    return x + delta.sub_(detached).to(x.dtype)


class FakeQuantInt8Linear(nn.Linear):
    """``nn.Linear`` that trains through the int8 dynamic kernel's rounding; same parameter names."""

    fake_quant_enabled: bool = True

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> FakeQuantInt8Linear:
        with torch.device("meta"):
            new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        new.weight = linear.weight
        new.bias = linear.bias
        new.train(linear.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fake_quant_enabled:
            return F.linear(x, self.weight, self.bias)
        return F.linear(fake_quantize_activation(x), fake_quantize_weight(self.weight), self.bias)


class FakeQuantInt8Embedding(nn.Embedding):
    """``nn.Embedding`` whose rows are rounded to symmetric int8 per row; same parameter names."""

    fake_quant_enabled: bool = True

    @classmethod
    def from_embedding(cls, emb: nn.Embedding) -> FakeQuantInt8Embedding:
        with torch.device("meta"):
            new = cls(emb.num_embeddings, emb.embedding_dim, padding_idx=emb.padding_idx)
        new.weight = emb.weight
        new.train(emb.training)
        return new

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        weight = fake_quantize_weight(self.weight) if self.fake_quant_enabled else self.weight
        return F.embedding(idx, weight, self.padding_idx)


class Int8DynamicLinear(nn.Module):
    """A converted Linear: int8 weight, float scale per output channel, float bias; runs
    ``torch.ops.quantized.linear_dynamic``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self._packed: Any = None
        self._packed_key: Any = None

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> Int8DynamicLinear:
        new = cls(weight.shape[1], weight.shape[0], bias=bias is not None)
        new.weight, new.weight_scale = quantize_weight(weight)
        if bias is not None:
            new.bias = bias.detach().float().clone()
        return new

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight.float() * self.weight_scale[:, None]

    def _weight_key(self) -> tuple[int, ...]:
        """Where the weight, scale and bias live and how often they were written: the packed weight is
        rebuilt when this changes. Read straight from ``_buffers`` (a few microseconds less per call)."""
        buffers = self._buffers
        w, s, b = buffers["weight"], buffers["weight_scale"], buffers["bias"]
        key = (w.data_ptr(), w._version, s.data_ptr(), s._version)
        return key if b is None else key + (b.data_ptr(), b._version)

    def _packed_weight(self) -> Any:
        key = self._weight_key()
        if self._packed is None or key != self._packed_key:
            zero = torch.zeros(self.out_features, dtype=torch.long)
            # torch deprecates creating quantized tensors; its kernel still needs one
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                qweight = torch._make_per_channel_quantized_tensor(self.weight, self.weight_scale.double(), zero, 0)
                self._packed = torch.ops.quantized.linear_prepack(qweight, self.bias)
            self._packed_key = key
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # no casts around the kernel: at one token they cost as much as it saves
        if x.dtype is torch.float32:
            return torch.ops.quantized.linear_dynamic(x, self._packed_weight(), REDUCE_RANGE)
        return torch.ops.quantized.linear_dynamic(x.float(), self._packed_weight(), REDUCE_RANGE).to(x.dtype)

    # deepcopy/pickle: the packed weight is rebuilt on use
    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_packed": None, "_packed_key": None}

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


class Int8Embedding(nn.Module):
    """A converted Embedding: int8 rows and a float scale per row."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_idx = padding_idx
        self.register_buffer("weight", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(num_embeddings))

    @classmethod
    def from_float(cls, weight: torch.Tensor, padding_idx: int | None = None) -> Int8Embedding:
        new = cls(weight.shape[0], weight.shape[1], padding_idx)
        new.weight, new.weight_scale = quantize_weight(weight)
        return new

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight.float() * self.weight_scale[:, None]

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, self.weight).float() * self.weight_scale[idx].unsqueeze(-1)


FAKE_QUANTIZED = (FakeQuantInt8Linear, FakeQuantInt8Embedding)
CONVERTED = (Int8DynamicLinear, Int8Embedding)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def prepare(model: nn.Module, linears: set[str], embeddings: set[str]) -> None:
    """Swap the named Linear and Embedding layers for fake-quantized ones, in place (same parameters)."""
    for name, module in list(model.named_modules()):
        if name in linears:
            _replace(model, name, FakeQuantInt8Linear.from_linear(module))
        elif name in embeddings:
            _replace(model, name, FakeQuantInt8Embedding.from_embedding(module))


def convert(model: nn.Module) -> None:
    """Replace every fake-quantized layer by its int8 form, in place."""
    for name, module in list(model.named_modules()):
        if isinstance(module, FakeQuantInt8Linear):
            _replace(model, name, Int8DynamicLinear.from_float(module.weight, module.bias))
        elif isinstance(module, FakeQuantInt8Embedding):
            _replace(model, name, Int8Embedding.from_float(module.weight, module.padding_idx))


def to_float(model: nn.Module) -> list[str]:
    """Give every converted layer back a fake-quantized float form holding its dequantized weights, in
    place; returns the layer names."""
    names = []
    for name, module in list(model.named_modules()):
        if isinstance(module, Int8DynamicLinear):
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            linear.weight = nn.Parameter(module.dequantized_weight())
            if module.bias is not None:
                linear.bias = nn.Parameter(module.bias.clone())
            _replace(model, name, FakeQuantInt8Linear.from_linear(linear))
        elif isinstance(module, Int8Embedding):
            emb = nn.Embedding(module.num_embeddings, module.embedding_dim, padding_idx=module.padding_idx)
            emb.weight = nn.Parameter(module.dequantized_weight())
            _replace(model, name, FakeQuantInt8Embedding.from_embedding(emb))
        else:
            continue
        names.append(name)
    return names


def dequantize_state_dict(state_dict: dict[str, Any], prefix: str = "") -> list[str]:
    """Turn the int8 entries (``<layer>.weight`` int8 with ``<layer>.weight_scale``) under ``prefix`` into
    float weights, in place; returns the layer names."""
    layers = [k[: -len("weight_scale")] for k in state_dict if k.startswith(prefix) and k.endswith("weight_scale")]
    for layer in layers:
        scale = state_dict.pop(f"{layer}weight_scale")
        state_dict[f"{layer}weight"] = state_dict[f"{layer}weight"].float() * scale.float()[:, None]
    return [layer.rstrip(".") for layer in layers]


def is_converted_state(state_dict: dict[str, Any], prefix: str = "") -> bool:
    """Whether ``state_dict`` holds int8 layers of this module (under ``prefix``)."""
    return any(k.startswith(prefix) and k.endswith("weight_scale") for k in state_dict)
