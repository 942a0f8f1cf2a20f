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
from collections.abc import Callable, Iterable, Mapping, Sequence

from lightning_green.checks import check_number, is_finite_number

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


def carbon_g(
    energy_j: float, carbon_intensity_g_per_kwh: float = DEFAULT_CARBON_INTENSITY_G_PER_KWH, pue: float = 1.0
) -> float:
    """Grams of CO2-equivalent for ``energy_j`` of IT energy at a data-centre PUE."""
    return kwh(energy_j) * pue * carbon_intensity_g_per_kwh


def check_carbon_args(carbon_intensity_g_per_kwh: float, pue: float) -> None:
    """Raise ValueError naming the argument for a negative intensity or a PUE below 1."""
    check_number("carbon_intensity_g_per_kwh", carbon_intensity_g_per_kwh, 0.0, unit="a finite number (gCO2e per kWh)")
    check_number("pue", pue, 1.0, unit="a finite number (power usage effectiveness)")


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
        raise ValueError(
            f"`targets` must be a mapping of metric name to a number or (number, 'min' | 'max'), got {targets!r}"
        )
    parsed = {}
    for name, spec in targets.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"`targets` keys must be metric names (non-empty strings), got {name!r}")
        if isinstance(spec, (tuple, list)):
            if len(spec) != 2:
                raise ValueError(
                    f"`targets[{name!r}]` must be a number or a (number, mode) pair with mode one of "
                    f"{TARGET_MODES}, got {spec!r}"
                )
            value, mode = spec
        else:
            value, mode = spec, ("min" if "loss" in name else "max")
        if not is_finite_number(value):
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
        # name -> {"value", "step", "energy_j", "time_s"}
        self.reached: dict[str, dict] = {}
        self.seen: set[str] = set()
        # the last value seen of each metric
        self._last: dict[str, float] = {}

    def update(self, metrics: Mapping[str, object], step: int, energy_j: float, time_s: float) -> list[str]:
        """Check every target against ``metrics``; return the names reached for the first time now.

        A metric that is absent or NaN does not count; values are anything ``float()`` accepts (a
        0-d tensor too).
        """
        return self.settle(self.probe(metrics, energy_j, time_s), step, n_processes=1)

    def pending(self) -> bool:
        """Whether some target is not reached yet (else there is nothing left to check)."""
        return len(self.reached) < len(self.targets)

    def probe(self, metrics: Mapping[str, object], energy_j: float, time_s: float) -> list[float]:
        """One process's part of a decision all processes share: ``[energy_j, time_s, flag, ...]``
        with one flag per target, 1.0 where ``metrics`` reach a target not reached before.

        Sum the parts over processes (one all-reduce, with whatever else is reduced then) and pass
        the sum to :meth:`settle` on every process: the decision is then the same everywhere.
        """
        flags = []
        for name, (target, mode) in self.targets.items():
            hit = 0.0
            if name in metrics:
                value = float(metrics[name])
                self.seen.add(name)
                self._last[name] = value
                if (
                    name not in self.reached
                    and not math.isnan(value)
                    and ((value <= target) if mode == "min" else (value >= target))
                ):
                    hit = 1.0
            flags.append(hit)
        return [float(energy_j), float(time_s), *flags]

    def settle(self, summed: Sequence[float], step: int, n_processes: int) -> list[str]:
        """Record the targets that any process reached, from the sum of :meth:`probe` parts: the
        energy of all processes and their mean time. Returns the names reached for the first time."""
        energy_j, time_s, *flags = summed
        newly = []
        for name, flag in zip(self.targets, flags, strict=False):
            if flag > 0 and name not in self.reached:
                # this process's value (another may have reached it)
                value = self._last.get(name, math.nan)
                self.reached[name] = {
                    "value": value,
                    "step": int(step),
                    "energy_j": float(energy_j),
                    "time_s": float(time_s) / n_processes,
                }
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
        """One summary row per target, in the shape the ``targets`` section is read in
        (:func:`lightning_green.run_summary.targets`): ``metric``, ``reached``, ``step``, ``joules``,
        ``seconds``, ``source`` (the energy's source label), plus ``target``, ``mode`` and ``value``.
        A target not reached has ``None`` for step, joules, seconds and value."""
        out = []
        for name, (target, mode) in self.targets.items():
            r = self.reached.get(name) or {}
            out.append(
                {
                    "metric": name,
                    "target": target,
                    "mode": mode,
                    "reached": bool(r),
                    "value": r.get("value"),
                    "step": r.get("step"),
                    "joules": r.get("energy_j"),
                    "seconds": r.get("time_s"),
                    "source": source,
                }
            )
        return out


class TargetWatch:
    """Energy-to-target over a run: :class:`EnergyTargets` with the energy and time since the start
    of fit, carried across a checkpoint resume. Trainer-free: energy and time are callables.

    Each check is a part of a sum over processes (:meth:`part`, then :meth:`settle` with the sum), so
    the caller can put it into an all-reduce it makes anyway.

    Args:
        targets: see :func:`parse_targets`.
        energy_now_j: this process's energy counter (J); only differences of it are used.
        clock: seconds, on the clock ``energy_now_j`` is on.
    """

    def __init__(self, targets: EnergyTargets, energy_now_j: Callable[[], float], clock: Callable[[], float]) -> None:
        self.targets = targets
        self._energy_now_j = energy_now_j
        self._clock = clock
        self._t0_s = clock()
        self._e0_j = energy_now_j()
        # before a resume
        self.restored_j = self.restored_s = 0.0

    def energy_j(self) -> float:
        """This process's energy since the start of fit, validation included (a resumed run's too)."""
        return self.restored_j + self._energy_now_j() - self._e0_j

    def time_s(self) -> float:
        return self.restored_s + self._clock() - self._t0_s

    def part(self, metrics: Callable[[], Mapping[str, object]]) -> list[float]:
        """This process's part of a check; ``metrics`` is called only while a target is pending
        (the length is the same either way, as every process must add the same number of values)."""
        return self.targets.probe(metrics() if self.targets.pending() else {}, self.energy_j(), self.time_s())

    def settle(self, summed: Sequence[float], step: int, n_processes: int) -> dict[str, float]:
        """The metrics to log for the targets reached for the first time by this check."""
        out = {}
        for name in self.targets.settle(summed, step, n_processes):
            energy_key, time_key = target_keys(name)
            out[energy_key], out[time_key] = (
                self.targets.reached[name]["energy_j"],
                self.targets.reached[name]["time_s"],
            )
        return out

    def never_logged_message(self, logged: Iterable[str]) -> str:
        """The warning for targets whose metric was never logged, naming them and what was logged."""
        return (
            f"EfficiencyLogger: no metric was ever logged for the targets "
            f"{', '.join(self.targets.never_logged())}, so they are "
            f"not reached; check the names. Metrics logged: {', '.join(sorted(logged)) or 'none'}."
        )
