"""How a checkpoint loads into a model under QAT: into the form its weights have, then the wanted one.

A file written during a QAT fit (``ModelCheckpoint``'s ``last``/``best``, mid-QAT) holds float
weights under the float names; a file written after the conversion holds converted weights. For
``test/validate/predict`` the model is brought to the file's form before its weights load (a
converted model goes back to float layers for a float file), and converted after, so the model
evaluated is the converted model of that file's weights. For ``fit`` (and ``eval_as="float"``) a
converted file is dequantized and loads into float layers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_green.quantization import layers


class CheckpointLoading:
    """``load_state_dict`` pre and post hooks for the module (Trainer-free).

    Args:
        convert: ``convert(module)`` prepares (when needed) and converts ``module`` in place.

    Attributes:
        as_float: load as float layers (``fit``, or ``eval_as="float"``), never convert.
        fake_quant_off: after a load, turn fake quantization off (``eval_as="float"`` evaluation).
    """

    def __init__(self, convert: Callable[[nn.Module], None]) -> None:
        self.convert = convert
        self.as_float = True
        self.fake_quant_off = False
        self._convert_after = False

    def before_load(self, module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        converted_file = layers.checkpoint_holds_converted(state_dict, prefix)
        self._convert_after = False
        if self.as_float:
            if converted_file:
                n = layers.dequantize_checkpoint(state_dict, prefix)
                rank_zero_warn(
                    f"QuantizationAwareTraining: the checkpoint holds a converted model; its {n} quantized weight(s)"
                    " load dequantized."
                )
            layers.to_float(module)
        elif converted_file:
            if not layers.is_converted(module) or layers.is_prepared(module):
                self.convert(module)
        else:
            layers.to_float(module)
            self._convert_after = True

    def after_load(self, module: nn.Module, incompatible_keys: Any) -> None:
        if self._convert_after:
            self._convert_after = False
            self.convert(module)
        elif self.fake_quant_off:
            layers.set_fake_quant_enabled(module, False)
