"""How a checkpoint loads into a model under QAT: into the form its weights have, then the wanted one.

A file written during a QAT fit (``ModelCheckpoint``'s ``last``/``best``, mid-QAT) holds float
weights under the float names; a file written after the conversion holds converted weights. For
``test/validate/predict`` the model is brought to the file's form before its weights load (a
converted model goes back to float layers for a float file), and converted after, so the model
evaluated is the converted model of that file's weights. For ``fit`` (and ``eval_as="float"``) a
converted file is dequantized and loads into float layers.

:class:`QatCheckpoints` is what the callback keeps in a checkpoint (its settings, QAT energy so far and
report, so a resumed fit goes on) and the module's load hooks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_green.quantization import layers
from lightning_green.quantization.evaluate import EnergyProbe, QatReport


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


class QatCheckpoints:
    """The checkpoints of :class:`~lightning_green.quantization.qat.QuantizationAwareTraining`
    (Trainer-free): how they load into the module (:class:`CheckpointLoading`, hooked once), and the
    callback's own state, written and read back.

    Args:
        convert: ``convert(module)`` prepares (when needed) and converts ``module`` in place.
        probe: the QAT energy, whose total so far a checkpoint keeps.
    """

    def __init__(self, convert: Callable[[nn.Module], None], probe: EnergyProbe) -> None:
        self.loading = CheckpointLoading(convert)
        self.probe = probe
        self._hooks: list[Any] = []

    def hook(self, module: nn.Module, stage: str, eval_as: str) -> None:
        """Load into ``module`` as ``stage`` needs: float for ``fit`` or ``eval_as="float"``, else the
        converted model of the file's weights. The hooks are registered once, until :meth:`unhook`."""
        self.loading.as_float = stage == "fit" or eval_as == "float"
        self.loading.fake_quant_off = stage != "fit" and eval_as == "float"
        if not self._hooks:
            self._hooks.append(module.register_load_state_dict_pre_hook(self.loading.before_load))
            self._hooks.append(module.register_load_state_dict_post_hook(self.loading.after_load))

    def unhook(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def state(self, settings: dict[str, Any], start_step: int, converted: bool, report: QatReport) -> dict[str, Any]:
        """The callback's checkpoint: ``settings`` (what a resume must agree on), ``start_step``, whether
        the model is converted, the QAT energy so far and the report."""
        return {
            **settings,
            "start_step": start_step,
            "converted": converted,
            "energy_j": self.probe.checkpoint_j(),
            "report": report.as_dict(),
        }

    def restore(self, state: dict[str, Any], settings: dict[str, Any], report: QatReport) -> QatReport:
        """Go on from a checkpoint's :meth:`state`: warn when its settings differ from ``settings``,
        restore the QAT energy; returns the report to keep (``report`` once converted here, else the
        checkpoint's)."""
        mismatched = {k: state[k] for k in settings if k in state and state[k] != settings[k]}
        if mismatched:
            rank_zero_warn(
                f"QuantizationAwareTraining: the checkpoint was written with {mismatched}; this callback uses"
                f" {settings}."
            )
        self.probe.restore_j(float(state.get("energy_j") or 0.0))
        # After a conversion here, a checkpoint's report (e.g. `last`, written before it) is older.
        if report.converted_at_step is not None:
            return report
        return report.restored(state.get("report") or {})
