"""Quantization-aware training: torch's int8 kernels or ``torchao``, chosen by what is fast on the device.

``torchao`` is imported only when a ``torchao`` scheme prepares or converts a model, never at import.
"""

from lightning_green.quantization.evaluate import QatReport
from lightning_green.quantization.qat import QuantizationAwareTraining, state_dict_size_bytes
from lightning_green.quantization.schemes import SCHEMES

__all__ = ["QatReport", "QuantizationAwareTraining", "SCHEMES", "state_dict_size_bytes"]
