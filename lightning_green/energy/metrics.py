"""Efficiency and carbon arithmetic. Plain functions of joules and counts.

* EER, the Energy Efficiency Ratio: training energy / number of model parameters (J per parameter).
* EPI, Energy Per Inference: inference energy / number of inference samples (J per sample), and per
  token where tokens are counted.
* Rates: samples (or tokens) per joule.
* Carbon: ``kWh × PUE × carbon intensity (gCO2e/kWh)``. No network look-up: the intensity is a number
  the user passes; the default is the world average of electricity generation, 475 gCO2/kWh
  (IEA, Global Energy & CO2 Status Report 2019).
* Energy-to-target (as Zeus's energy-to-accuracy): :class:`EnergyTargets` records the energy and time
  at which a monitored metric first reaches its target.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

J_PER_KWH = 3.6e6
DEFAULT_CARBON_INTENSITY_G_PER_KWH = 475.0


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else math.nan


def eer_j_per_param(energy_j: float, n_params: int) -> float:
    """Energy Efficiency Ratio: joules per model parameter (NaN without parameters)."""
    return _ratio(energy_j, n_params)


def epi_j(energy_j: float, n_inferences: float) -> float:
    """Energy Per Inference: joules per sample (or per token, given tokens). NaN for zero samples."""
    return _ratio(energy_j, n_inferences)


def per_joule(count: float, energy_j: float) -> float:
    """Samples (or tokens) per joule. NaN when no energy was measured."""
    return _ratio(count, energy_j)


def kwh(energy_j: float) -> float:
    return energy_j / J_PER_KWH


def carbon_g(energy_j: float, carbon_intensity_g_per_kwh: float = DEFAULT_CARBON_INTENSITY_G_PER_KWH, pue: float = 1.0) -> float:
    """Grams of CO2-equivalent for ``energy_j`` of IT energy at a data-centre PUE."""
    return kwh(energy_j) * pue * carbon_intensity_g_per_kwh


def check_carbon_args(carbon_intensity_g_per_kwh: float, pue: float) -> None:
    """Raise ValueError naming the argument for a negative intensity or a PUE below 1."""
    if isinstance(carbon_intensity_g_per_kwh, bool) or not isinstance(carbon_intensity_g_per_kwh, (int, float)) or not math.isfinite(carbon_intensity_g_per_kwh) or carbon_intensity_g_per_kwh < 0:
        raise ValueError(f"`carbon_intensity_g_per_kwh` must be a finite number >= 0 (gCO2e per kWh), got {carbon_intensity_g_per_kwh!r}")
    if isinstance(pue, bool) or not isinstance(pue, (int, float)) or not math.isfinite(pue) or pue < 1:
        raise ValueError(f"`pue` (power usage effectiveness) must be a finite number >= 1.0, got {pue!r}")


TARGET_MODES = ("min", "max")


def target_keys(metric: str) -> tuple[str, str]:
    """The logged keys of one target: ``(energy_to_target J, time_to_target s)``."""
    return f"efficiency/energy_to_target/{metric}_j", f"efficiency/time_to_target/{metric}_s"


def parse_targets(targets: Mapping[str, object]) -> dict[str, tuple[float, str]]:
    """``{"val_loss": 1.5, "val_acc": (0.9, "max")}`` to ``{name: (value, mode)}``.

    A bare number means ``"min"`` (reached at or below) for a name containing ``"loss"``, else
    ``"max"`` (reached at or above); a ``(value, "min" | "max")`` pair says it explicitly.

    Raises:
        ValueError: naming ``targets``, for anything but a mapping of metric names to a finite number
            or a ``(number, "min" | "max")`` pair.
    """
    if not isinstance(targets, Mapping):
        raise ValueError(f"`targets` must be a mapping of metric name to a number or (number, 'min' | 'max'), got {targets!r}")
    parsed = {}
    for name, spec in targets.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"`targets` keys must be metric names (non-empty strings), got {name!r}")
        if isinstance(spec, (tuple, list)):
            if len(spec) != 2:
                raise ValueError(f"`targets[{name!r}]` must be a number or a (number, mode) pair with mode one of {TARGET_MODES}, got {spec!r}")
            value, mode = spec
        else:
            value, mode = spec, ("min" if "loss" in name else "max")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"`targets[{name!r}]` must be a finite number, got {value!r}")
        if mode not in TARGET_MODES:
            raise ValueError(f"`targets[{name!r}]` has mode {mode!r}; allowed modes: {TARGET_MODES}")
        parsed[name] = (float(value), mode)
    return parsed


class EnergyTargets:
    """Energy-to-target: the energy and time at which each monitored metric first reaches its target.

    Trainer-free: the caller passes the metrics it has (for example ``trainer.callback_metrics``), the
    step, and the energy (J) and time (s) since the start of fit, validation included; the first
    update at which a metric reaches its target records them, and later updates never change that.

    Args:
        targets: ``{metric name: value or (value, "min" | "max")}``, see :func:`parse_targets`.

    Raises:
        ValueError: naming ``targets`` for a non-numeric target or an unknown mode.

    Example::

        targets = EnergyTargets({"val_loss": 1.5, "val_acc": (0.9, "max")})
        for name in targets.update({"val_loss": 1.4}, step=200, energy_j=5e3, time_s=50.0):
            energy_key, time_key = target_keys(name)   # log targets.reached[name]["energy_j"], ...
    """

    def __init__(self, targets: Mapping[str, object]) -> None:
        self.targets = parse_targets(targets)
        self.reached: dict[str, dict] = {}  # name -> {"value", "step", "energy_j", "time_s"}
        self.seen: set[str] = set()

    def update(self, metrics: Mapping[str, object], step: int, energy_j: float, time_s: float) -> list[str]:
        """Check every target against ``metrics``; return the names reached for the first time now.

        A metric that is absent or NaN does not count; values are anything ``float()`` accepts (a
        0-d tensor too).
        """
        newly = []
        for name, (target, mode) in self.targets.items():
            if name not in metrics:
                continue
            value = float(metrics[name])
            self.seen.add(name)
            if name in self.reached or math.isnan(value):
                continue
            if (value <= target) if mode == "min" else (value >= target):
                self.reached[name] = {"value": value, "step": int(step), "energy_j": float(energy_j), "time_s": float(time_s)}
                newly.append(name)
        return newly

    def never_logged(self) -> list[str]:
        """Targets whose metric no update has seen (and no restored state reached): worth a warning."""
        return [name for name in self.targets if name not in self.seen and name not in self.reached]

    def state_dict(self) -> dict:
        return {"reached": {name: dict(r) for name, r in self.reached.items()}, "seen": sorted(self.seen)}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore targets already met (a checkpoint-resumed run keeps them); targets no longer asked
        for are dropped."""
        self.reached = {name: dict(r) for name, r in state["reached"].items() if name in self.targets}
        self.seen = {name for name in state["seen"] if name in self.targets}

    def rows(self, source: str) -> list[dict]:
        """One summary row per target: reached or not, step, joules, seconds, the energy's source label."""
        out = []
        for name, (target, mode) in self.targets.items():
            r = self.reached.get(name)
            out.append({
                "metric": name, "target": target, "mode": mode, "reached": r is not None,
                "value": r["value"] if r else math.nan, "step": r["step"] if r else None,
                "energy_j": r["energy_j"] if r else math.nan, "time_s": r["time_s"] if r else math.nan, "source": source,
            })
        return out
