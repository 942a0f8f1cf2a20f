"""Power-limit controls (device control, no Trainer): one abstract base, NVML for NVIDIA GPUs, and a
simulated device.

A control changes a device setting that outlives the process, so limits are *borrowed*: the first
change remembers the original limit and :meth:`PowerControl.restore` puts it back. The PowerLimitSearch
callback calls ``restore`` at teardown, on exceptions and from a SIGTERM handler
(:class:`~lightning_green.power_limit.restore.SigtermRestore`); as a last resort every control that
changed a limit also restores it when its process exits normally
(:func:`~lightning_green.power_limit.restore.restore_at_exit`).

Slow calls (NVML can take milliseconds) are made only at window edges of the search, never per step.
"""

from __future__ import annotations

import abc
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from multiprocessing.util import Finalize
from typing import Any

import torch

from lightning_green.power_limit.cache import write_json_atomic
from lightning_green.power_limit.restore import restore_at_exit
from lightning_green.sensors import nvml
from lightning_green.sensors.base import SensorError, SensorPermissionError, SensorUnavailable
from lightning_green.sensors.simulated import SimulatedSensor

log = logging.getLogger(__name__)


class PowerControlError(RuntimeError):
    """A power limit could not be read or set."""


class PowerControlUnavailable(PowerControlError):
    """The device cannot have its limit changed by this process (no permission, not supported, no
    driver). PowerLimitSearch warns once and goes on monitoring only."""


class PowerControl(abc.ABC):
    """Reads and sets one device's power limit, in watts.

    Subclasses implement :meth:`bounds_w`, :meth:`get_limit_w`, :meth:`_set_limit_w` and set
    :attr:`device_name` (the cache key of the limit search). The base class remembers the original limit
    on the first change and restores it.
    """

    #: What the device is, e.g. ``"NVIDIA H100 80GB HBM3"``; the power-limit cache is keyed by it.
    device_name: str = "unknown"

    def __init__(self) -> None:
        self._original_w: float | None = None
        self._exit_guard: Finalize | None = None
        self._lock = threading.RLock()

    # ---------------------------------------------------------------- to implement
    def attach(self, device: torch.device) -> None:
        """Bind to this process's device (PowerLimitSearch calls it in ``setup``).

        Default: nothing to bind (the control was built for one device).
        """
        return

    @abc.abstractmethod
    def bounds_w(self) -> tuple[float, float]:
        """The lowest and highest limit the device accepts, in watts."""

    @abc.abstractmethod
    def get_limit_w(self) -> float:
        """The limit in force now, in watts."""

    @abc.abstractmethod
    def _set_limit_w(self, limit_w: float) -> None:
        """Apply ``limit_w`` to the device."""

    def on_step(self) -> None:
        """Called by PowerLimitSearch once per training batch.

        Default: nothing (real devices); the simulated one spends its step time here.
        """
        return

    def close(self) -> None:
        """Release what the control holds. Safe to call more than once.

        Default: nothing to release.
        """
        return

    # ---------------------------------------------------------------- borrowing
    @property
    def original_limit_w(self) -> float | None:
        """The limit before this control first changed it (``None`` while nothing was changed)."""
        return self._original_w

    @property
    def changed(self) -> bool:
        """Whether a limit set by this control may still be in force."""
        return self._original_w is not None

    def check_permission(self) -> None:
        """Prove that the limit can be set by writing the current limit back.

        Raises:
            PowerControlUnavailable: it cannot.
        """
        self._set_limit_w(self.get_limit_w())

    def set_limit_w(self, limit_w: float) -> None:
        """Set the limit, remembering the original on the first change.

        Raises:
            ValueError: ``limit_w`` is outside :meth:`bounds_w`.
            PowerControlUnavailable: the device refuses.
        """
        lo, hi = self.bounds_w()
        if not (lo - 1e-6 <= limit_w <= hi + 1e-6):
            raise ValueError(f"power limit {limit_w:g} W is outside the device's bounds [{lo:g}, {hi:g}] W")
        with self._lock:
            if self._original_w is None:
                self._original_w = self.get_limit_w()
                if self._exit_guard is None:
                    self._exit_guard = restore_at_exit(self.restore_quietly)
            self._set_limit_w(limit_w)

    def restore(self) -> bool:
        """Put the original limit back. Returns whether anything was restored. Idempotent."""
        with self._lock:
            if self._original_w is None:
                return False
            original = self._original_w
            self._original_w = None
            self._set_limit_w(original)
            return True

    def restore_quietly(self) -> None:
        """:meth:`restore` that logs a failure instead of raising (exit paths, signal handlers)."""
        try:
            self.restore()
        # at exit or in a signal handler: never raise
        except Exception as err:
            log.warning("could not restore the original power limit: %s", err)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_lock"] = None
        state["_exit_guard"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()


class NvmlPowerControl(PowerControl):
    """The power limit of one NVIDIA GPU through NVML.

    Setting a limit needs root (or ``CAP_SYS_ADMIN``); without it :meth:`check_permission` raises
    :class:`PowerControlUnavailable` and PowerLimitSearch monitors only. ``pynvml`` is imported on first
    use; NVML errors are translated by :func:`lightning_green.sensors.nvml.nvml_errors`.

    Args:
        index: torch's CUDA index of the GPU (after ``CUDA_VISIBLE_DEVICES``). ``None``: the device this
            process trains on, given in :meth:`attach`.
    """

    def __init__(self, index: int | None = None) -> None:
        super().__init__()
        self.index = index
        self._handle: Any = None

    def attach(self, device: torch.device) -> None:
        if self.index is None:
            if device.type != "cuda":
                raise PowerControlUnavailable(f"NVML power limits need a CUDA device, this process trains on {device}")
            self.index = device.index if device.index is not None else 0

    def _nvml(self) -> tuple[Any, Any]:
        try:
            if self._handle is None:
                pynvml = nvml.init_nvml()
                with nvml.nvml_errors(f"finding cuda:{self.index or 0}"):
                    self._handle = nvml.handle_for_torch_index(pynvml, self.index or 0)
                    self.device_name = nvml.as_str(pynvml.nvmlDeviceGetName(self._handle))
            # pynvml: a heavy optional dependency, loaded on first use (init_nvml loaded it above).
            import pynvml

            return pynvml, self._handle
        except SensorError as err:
            raise PowerControlUnavailable(str(err)) from err

    def _call(self, what: str, fn_name: str, *args: Any) -> Any:
        pynvml, handle = self._nvml()
        try:
            with nvml.nvml_errors(what):
                return getattr(pynvml, fn_name)(handle, *args)
        except (SensorPermissionError, SensorUnavailable) as err:
            raise PowerControlUnavailable(str(err)) from err
        except SensorError as err:
            raise PowerControlError(str(err)) from err

    def bounds_w(self) -> tuple[float, float]:
        lo, hi = self._call("reading the power limit bounds", "nvmlDeviceGetPowerManagementLimitConstraints")
        return lo / 1000.0, hi / 1000.0

    def get_limit_w(self) -> float:
        return self._call("reading the power limit", "nvmlDeviceGetPowerManagementLimit") / 1000.0

    def _set_limit_w(self, limit_w: float) -> None:
        self._call(
            f"setting the power limit to {limit_w:g} W", "nvmlDeviceSetPowerManagementLimit", int(round(limit_w * 1000))
        )

    def close(self) -> None:
        if self._handle is not None:
            self._handle = None
            nvml.shutdown_nvml()

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_handle"] = None
        return state


class SimulatedPowerControl(PowerControl):
    """A device whose power and speed follow its limit by a stated model: for tests, demos and benchmarks.

    The model (a DVFS-like device running a workload that would draw ``demand_w`` uncapped):

    * relative clock under limit ``L``: ``f(L) = min(1, ((L - static_w) / (demand_w - static_w)) ** (1/3))``
      (dynamic power grows with the cube of the clock on top of ``static_w``);
    * power drawn: ``P(L) = min(L, demand_w)``;
    * step time: ``T(L) = step_s * ((1 - beta) + beta / f(L))`` (``beta``: the clock-bound share of a step);
    * energy per step: ``E(L) = P(L) * T(L)``.

    With the defaults (``static_w=100``, ``demand_w=400``, ``beta=0.8``, bounds 150–400 W) energy per step
    falls as the limit drops while time rises, and the cost ``eta E + (1 - eta) P_max T`` with
    ``eta = 0.5`` has its minimum inside the range (near 300 W).

    Inside a Trainer, :meth:`on_step` sleeps ``T(L)`` per training batch so that step time really changes
    with the limit, and :meth:`sensor` gives a :class:`~lightning_green.sensors.SimulatedSensor` reading
    ``P(L)`` of the limit in force, so a PowerSampler measures the model's energy.

    The "device" limit lives in this object, and in ``state_path`` when given (a JSON file
    ``{"limit_w": ...}``, read at construction if it exists): like a real limit it outlives the process,
    so another process can check that it was restored.

    Args:
        min_w: lowest accepted limit (must exceed ``static_w``).
        max_w: highest accepted limit; also the initial limit when ``state_path`` holds none.
        demand_w: power the workload draws without a limit.
        static_w: clock-independent power.
        step_s: step time without a limit, in seconds (``0`` makes :meth:`on_step` a no-op).
        beta: share of the step that scales with the clock, in ``[0, 1]``.
        state_path: JSON file holding the "device" limit, or ``None`` to keep it in memory.
        name: the simulated device's name (the cache key of the limit search).

    Raises:
        ValueError: inconsistent parameters.

    Example::

        control = SimulatedPowerControl(step_s=0.01)
        search = PowerLimitSearch("search", power_control=control)
        trainer = Trainer(callbacks=[PowerSampler(sensors=[control.sensor()]), search])
    """

    def __init__(
        self,
        min_w: float = 150.0,
        max_w: float = 400.0,
        demand_w: float = 400.0,
        static_w: float = 100.0,
        step_s: float = 0.0,
        beta: float = 0.8,
        state_path: str | None = None,
        name: str = "simulated",
    ) -> None:
        super().__init__()
        if not (0 <= static_w < min_w <= max_w):
            raise ValueError(
                f"need 0 <= static_w < min_w <= max_w, got static_w={static_w}, min_w={min_w}, max_w={max_w}"
            )
        if demand_w <= static_w:
            raise ValueError(f"`demand_w` must exceed `static_w`, got demand_w={demand_w}, static_w={static_w}")
        if not 0 <= beta <= 1:
            raise ValueError(f"`beta` must be in [0, 1], got {beta}")
        if step_s < 0:
            raise ValueError(f"`step_s` must be >= 0, got {step_s}")
        self.min_w = float(min_w)
        self.max_w = float(max_w)
        self.demand_w = float(demand_w)
        self.static_w = float(static_w)
        self.step_s = float(step_s)
        self.beta = float(beta)
        self.state_path = os.fspath(state_path) if state_path is not None else None
        self.device_name = name
        self._limit_w = self.max_w
        if self.state_path and os.path.exists(self.state_path):
            with open(self.state_path) as f:
                self._limit_w = float(json.load(f)["limit_w"])

    # ---------------------------------------------------------------- the model
    def clock_fraction(self, limit_w: float) -> float:
        """``f(L)``: the relative clock under ``limit_w``."""
        if limit_w >= self.demand_w:
            return 1.0
        return ((limit_w - self.static_w) / (self.demand_w - self.static_w)) ** (1.0 / 3.0)

    def power_w(self, limit_w: float | None = None) -> float:
        """``P(L)``, of the limit in force when ``limit_w`` is ``None``."""
        limit = self._limit_w if limit_w is None else limit_w
        return min(limit, self.demand_w)

    def step_time_s(self, limit_w: float | None = None, step_s: float | None = None) -> float:
        """``T(L)``; ``step_s`` overrides the unlimited step time."""
        limit = self._limit_w if limit_w is None else limit_w
        base = self.step_s if step_s is None else step_s
        return base * ((1.0 - self.beta) + self.beta / self.clock_fraction(limit))

    def energy_per_step_j(self, limit_w: float, step_s: float | None = None) -> float:
        """``E(L) = P(L) T(L)``."""
        return self.power_w(limit_w) * self.step_time_s(limit_w, step_s)

    def sensor(
        self, name: str = "sim_gpu", host_level: bool = False, clock: Callable[[], float] = time.monotonic
    ) -> SimulatedSensor:
        """A :class:`~lightning_green.sensors.SimulatedSensor` reading ``P(L)`` of the limit in force
        (``clock`` stamps its readings; tests inject a simulated one)."""
        return SimulatedSensor(power_w=_PowerOf(self), name=name, host_level=host_level, domain="gpu", clock=clock)

    def on_step(self) -> None:
        if self.step_s > 0:
            time.sleep(self.step_time_s())

    # ---------------------------------------------------------------- the "device"
    def bounds_w(self) -> tuple[float, float]:
        return self.min_w, self.max_w

    def get_limit_w(self) -> float:
        return self._limit_w

    def _set_limit_w(self, limit_w: float) -> None:
        self._limit_w = float(limit_w)
        if self.state_path:
            write_json_atomic(self.state_path, {"limit_w": self._limit_w, "pid": os.getpid()})


class _PowerOf:
    """``f(t_s) -> P(L)`` of a simulated control; a class, not a lambda, so spawn can pickle it."""

    def __init__(self, control: SimulatedPowerControl) -> None:
        self.control = control

    def __call__(self, _t_s: float) -> float:
        return self.control.power_w()


def make_power_control(power_control: str | PowerControl | None) -> PowerControl:
    """The control a ``power_control`` argument names: ``None`` or ``"nvml"`` (an :class:`NvmlPowerControl`
    for this process's GPU) or a :class:`PowerControl`, returned as it is.

    Raises:
        ValueError: anything else, naming the argument and the allowed values.
    """
    if isinstance(power_control, PowerControl):
        return power_control
    if power_control is None or (isinstance(power_control, str) and power_control.lower() == "nvml"):
        return NvmlPowerControl()
    raise ValueError(f"`power_control` must be None, 'nvml' or a PowerControl instance, got {power_control!r}")


__all__ = [
    "NvmlPowerControl",
    "PowerControl",
    "PowerControlError",
    "PowerControlUnavailable",
    "SimulatedPowerControl",
    "make_power_control",
]
