"""The named quantization schemes, one row each: plain data, no ``torchao`` import.

A row says what the scheme does, which library runs it (``"torch"``: torch's own dynamic int8
kernels, see :mod:`lightning_green.quantization.int8`; ``"torchao"``: see ``_torchao.py``), which
devices can run it, and whether ``scheme="auto"`` considers it on a device type. ``"auto"`` does not
pick by name: it times the candidates on the model's own Linear shapes (:mod:`.kernels`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

#: Device requirements a scheme can state: ``"any"`` runs wherever torch runs; ``"cpu_qengine"``
#: needs a CPU with one of torch's quantized engines (x86/fbgemm/onednn, or qnnpack on ARM);
#: ``"cuda_sm89"`` needs a CUDA device of compute capability 8.9 or newer (Ada, Hopper, ...).
REQUIREMENTS = ("any", "cpu_qengine", "cuda_sm89")
AUTO = "auto"


@dataclass(frozen=True)
class Scheme:
    """One named quantization scheme.

    Args:
        name: the name users pass as ``scheme=``.
        description: one line for error messages and docs.
        backend: ``"torch"`` or ``"torchao"``.
        requires: one of :data:`REQUIREMENTS`.
        grouped: weights are quantized in groups of ``group_size`` values along ``in_features``.
        embeddings: ``nn.Embedding`` weights can be quantized with this scheme.
        auto_on: device types (``"cpu"``, ``"cuda"``) where ``scheme="auto"`` times it as a candidate.
    """

    name: str
    description: str
    backend: str
    requires: str
    grouped: bool
    embeddings: bool
    auto_on: tuple[str, ...] = ()


SCHEMES: dict[str, Scheme] = {
    s.name: s
    for s in (
        Scheme(
            "int8_dynamic",
            "int8 dynamic per-tensor activations, int8 symmetric per-channel weights (torch's dynamic qlinear)",
            backend="torch",
            requires="cpu_qengine",
            grouped=False,
            embeddings=True,
            auto_on=("cpu",),
        ),
        Scheme(
            "int8_dynamic_int4_weight",
            "int8 dynamic per-token activations, int4 symmetric per-group weights (torchao 8da4w)",
            backend="torchao",
            requires="any",
            grouped=True,
            embeddings=True,
            auto_on=("cuda",),
        ),
        Scheme(
            "int4_weight_only",
            "int4 symmetric per-group weights, float activations (torchao)",
            backend="torchao",
            requires="any",
            grouped=True,
            embeddings=True,
        ),
        Scheme(
            "int8_weight_only",
            "int8 symmetric per-output-channel weights, float activations (torchao)",
            backend="torchao",
            requires="any",
            grouped=False,
            embeddings=True,
            auto_on=("cuda",),
        ),
        Scheme(
            "float8_dynamic",
            "float8 e4m3 dynamic per-row activations and weights (torchao)",
            backend="torchao",
            requires="cuda_sm89",
            grouped=False,
            embeddings=False,
            auto_on=("cuda",),
        ),
    )
}


def check_scheme(name: str) -> Scheme:
    """The table row of ``name``.

    Raises:
        ValueError: unknown name; the message lists the known ones and ``"auto"``.
    """
    if not isinstance(name, str) or name not in SCHEMES:
        raise ValueError(f"`scheme` must be one of {[AUTO, *sorted(SCHEMES)]}, got {name!r}")
    return SCHEMES[name]


def device_can_run(name: str, device: torch.device) -> bool:
    """Whether scheme ``name`` can prepare and convert on ``device``."""
    requires = SCHEMES[name].requires
    if requires == "any":
        return True
    if requires == "cpu_qengine":
        engines = set(torch.backends.quantized.supported_engines) - {"none"}
        return device.type == "cpu" and bool(engines)
    if requires == "cuda_sm89":
        return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)
    raise AssertionError(f"unknown requirement {requires!r}")


def schemes_for_device(device: torch.device) -> list[str]:
    """Names of the schemes that can run on ``device``."""
    return [name for name in SCHEMES if device_can_run(name, device)]


def auto_candidates(device: torch.device) -> list[str]:
    """The schemes ``scheme="auto"`` times on ``device``; every scheme that can run when none is marked."""
    marked = [n for n, s in SCHEMES.items() if device.type in s.auto_on and device_can_run(n, device)]
    return marked or schemes_for_device(device)


EVAL_AS = ("converted", "float")


def check_arguments(
    scheme: Any, group_size: Any, start_step: Any, filter_fn: Any, loss_fn: Any, embeddings: bool, eval_as: Any
) -> None:
    """Validate :class:`~.qat.QuantizationAwareTraining`'s arguments.

    Raises:
        ValueError: naming the argument and the allowed values.
    """
    if scheme != AUTO:
        check_scheme(scheme)
    if not (
        isinstance(group_size, int)
        and not isinstance(group_size, bool)
        and group_size > 0
        and group_size & (group_size - 1) == 0
    ):
        raise ValueError(f"`group_size` must be a positive power of two (16, 32, 64, 128, ...), got {group_size!r}")
    if not isinstance(start_step, int) or isinstance(start_step, bool) or start_step < 0:
        raise ValueError(f"`start_step` must be an integer >= 0, got {start_step!r}")
    if filter_fn is not None and not callable(filter_fn):
        raise ValueError(f"`filter_fn` must be None or a callable (module, fqn) -> bool, got {filter_fn!r}")
    if loss_fn is not None and not callable(loss_fn):
        raise ValueError(f"`loss_fn` must be None or a callable (pl_module, batch) -> tensor, got {loss_fn!r}")
    if eval_as not in EVAL_AS:
        raise ValueError(f"`eval_as` must be one of {list(EVAL_AS)}, got {eval_as!r}")
    if embeddings and scheme != AUTO and not SCHEMES[scheme].embeddings:
        allowed = [AUTO] + [s.name for s in SCHEMES.values() if s.embeddings]
        raise ValueError(
            f"`quantize_embeddings=True` needs a scheme that quantizes embeddings, one of {allowed}; got {scheme!r}"
        )
