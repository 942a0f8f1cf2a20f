"""Quantization-aware training with ``torchao``.

``torchao`` is imported only when a callback prepares or converts a model, never at import.
"""

from lightning_green.quantization.qat import QuantizationAwareTraining, state_dict_size_bytes

__all__ = ["QuantizationAwareTraining", "state_dict_size_bytes"]
