"""``LIGHTNING_GREEN=1``: energy callbacks for an unchanged Trainer or Fabric script (LitGPT's too).

Lightning asks each factory registered under the entry-point groups ``lightning.pytorch.callbacks_factory``
and ``lightning.fabric.callbacks_factory`` for callbacks whenever a ``Trainer`` or a ``Fabric`` is made
(``pyproject.toml`` registers :func:`trainer_callbacks` and :func:`fabric_callbacks`). Both return
nothing unless the environment says ``LIGHTNING_GREEN=1``; then a Trainer gets a PowerSampler and an
EfficiencyLogger, a Fabric a FabricEnergy, with their defaults and these settings:

======================================  ===================================================================
``LIGHTNING_GREEN``                     ``1``: add the callbacks; ``0`` or unset: nothing; else a warning
``LIGHTNING_GREEN_SUMMARY_DIR``         where ``energy_summary_<stage>.json`` goes (default: the logger's folder)
``LIGHTNING_GREEN_SENSORS``             ``auto``, ``nvml``, ``rapl``, ``estimate``, or names joined by commas
``LIGHTNING_GREEN_INTERVAL_S``          seconds between readings (default 0.1)
``LIGHTNING_GREEN_LOG_EVERY_N_STEPS``   Fabric: optimizer steps per logging window (default 50)
======================================  ===================================================================

A setting that cannot be read is a warning and its default is used: the opt-in never stops a run.
An added callback steps aside when the script already has one of its kind (the user's own comes first):
the Trainer's in ``setup``, leaving ``trainer.callbacks``; the Fabric's in ``on_after_setup``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn
from typing_extensions import override

from lightning_green.callbacks.efficiency import EfficiencyLogger
from lightning_green.callbacks.power import PowerSampler
from lightning_green.checks import check_int
from lightning_green.energy.sampler import check_interval
from lightning_green.fabric import FabricEnergy, measuring
from lightning_green.sensor_choice import check_sensors

ENABLE = "LIGHTNING_GREEN"
SUMMARY_DIR = "LIGHTNING_GREEN_SUMMARY_DIR"
SENSORS = "LIGHTNING_GREEN_SENSORS"
INTERVAL_S = "LIGHTNING_GREEN_INTERVAL_S"
LOG_EVERY_N_STEPS = "LIGHTNING_GREEN_LOG_EVERY_N_STEPS"


def enabled(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether ``LIGHTNING_GREEN`` is ``1``; any value but ``1``, ``0`` or empty is warned about."""
    value = environ.get(ENABLE, "").strip()
    if value not in ("", "0", "1"):
        warnings.warn(
            f"lightning_green: {ENABLE}={value!r} is not understood; set {ENABLE}=1 to measure energy, "
            f"0 or unset not to. No energy callbacks were added.",
            stacklevel=2,
        )
    return value == "1"


def settings(environ: Mapping[str, str] = os.environ, fabric: bool = False) -> dict[str, Any]:
    """The keyword arguments of the added callbacks that the environment sets (``fabric``: FabricEnergy's,
    with its logging window). A bad value is a warning, and the default is used."""
    out: dict[str, Any] = {}
    readers = [
        (SUMMARY_DIR, "summary_dir", str),
        (SENSORS, "sensors", _sensors),
        (INTERVAL_S, "interval_s", lambda text: check_interval(float(text))),
    ]
    if fabric:
        readers.append(
            (LOG_EVERY_N_STEPS, "log_every_n_steps", lambda text: check_int("log_every_n_steps", int(text), 1))
        )
    for variable, argument, read in readers:
        text = environ.get(variable, "").strip()
        if not text:
            continue
        try:
            out[argument] = read(text)
        except (TypeError, ValueError) as err:
            warnings.warn(f"lightning_green: {variable}={text!r} ignored ({err}); the default is used", stacklevel=2)
    return out


def _sensors(text: str) -> str | list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    return check_sensors(names[0] if len(names) == 1 else names)


def trainer_callbacks() -> list[Callback]:
    """Entry point of ``lightning.pytorch.callbacks_factory``: a PowerSampler and an EfficiencyLogger
    under ``LIGHTNING_GREEN=1``, else nothing."""
    if not enabled():
        return []
    return [OptInPowerSampler(**settings()), OptInEfficiencyLogger()]


def fabric_callbacks() -> list[FabricEnergy]:
    """Entry point of ``lightning.fabric.callbacks_factory``: a FabricEnergy under ``LIGHTNING_GREEN=1``,
    else nothing."""
    if not enabled():
        return []
    return [OptInFabricEnergy(**settings(fabric=True))]


def step_aside(trainer: Trainer, callback: Callback) -> None:
    """Take ``callback`` out of ``trainer.callbacks`` (a new list: the hook loop that runs now keeps its
    own), so none of its hooks runs again."""
    trainer.callbacks = [c for c in trainer.callbacks if c is not callback]


class OptInPowerSampler(PowerSampler):
    """The PowerSampler that ``LIGHTNING_GREEN=1`` adds: it steps aside in ``setup`` when the Trainer has
    another PowerSampler. Its own class, so its checkpoint key differs from a PowerSampler's (Lightning
    refuses two stateful callbacks with one key before ``setup`` could sort them out)."""

    yields_to_another = True

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if any(isinstance(c, PowerSampler) and c is not self for c in trainer.callbacks):
            step_aside(trainer, self)
            return
        super().setup(trainer, pl_module, stage)


class OptInEfficiencyLogger(EfficiencyLogger):
    """The EfficiencyLogger that ``LIGHTNING_GREEN=1`` adds: it steps aside in ``setup`` when the Trainer
    has another EfficiencyLogger."""

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if any(isinstance(c, EfficiencyLogger) and c is not self for c in trainer.callbacks):
            step_aside(trainer, self)
            return
        super().setup(trainer, pl_module, stage)


class OptInFabricEnergy(FabricEnergy):
    """The FabricEnergy that ``LIGHTNING_GREEN=1`` adds: it steps aside when another FabricEnergy
    already measures the Fabric (the user's own runs its ``on_after_setup`` first)."""

    @override
    def on_after_setup(self, fabric: Any, module: nn.Module) -> None:
        if measuring(fabric) in (None, self):
            super().on_after_setup(fabric, module)
