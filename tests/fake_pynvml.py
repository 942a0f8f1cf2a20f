"""A fake ``pynvml`` module for tests: NVML's behaviour as ../shared/NVML_NOTES.md describes it.

Install it with ``monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(...).module())``; the sensors
import ``pynvml`` lazily, so they pick it up.
"""

from __future__ import annotations

import itertools
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field


class NVMLError(Exception):
    """Like pynvml.NVMLError: ``.value`` is the NVML return code."""

    def __init__(self, value: int) -> None:
        super().__init__(f"NVML error {value}")
        self.value = value


NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_TIMEOUT = 10
NVML_ERROR_UNKNOWN = 999


@dataclass
class FakeGpu:
    """One GPU. Power is constant ``power_w``; the counter integrates it over ``clock`` (real time
    unless a test passes a fake clock)."""

    uuid: str
    name: str = "NVIDIA H200"
    power_w: float = 300.0
    counter: bool = True  # False: nvmlDeviceGetTotalEnergyConsumption raises NOT_SUPPORTED
    lost_after_reads: int | None = None  # raise GPU_IS_LOST once this many readings were taken
    mig_parent: FakeGpu | None = None
    limit_mw: int = 700_000
    min_limit_mw: int = 200_000
    max_limit_mw: int = 700_000
    can_set_limit: bool = True  # False: NO_PERMISSION on set
    errors_at: dict[int, int] = field(default_factory=dict)  # reading number (1 = first) -> NVML code it raises
    reset_at_read: int | None = None  # the counter restarts at 0 (a driver reload) just before this reading
    clock: Callable[[], float] = time.monotonic
    reads: int = 0
    t0: float | None = None  # set from clock
    energy_offset_mj: int = 123_456_789  # the counter counts since driver load, not since start

    def __post_init__(self) -> None:
        if self.t0 is None:
            self.t0 = self.clock()


class FakeNvml:
    def __init__(self, gpus: list[FakeGpu] | None = None, library_found: bool = True) -> None:
        self.gpus = gpus if gpus is not None else [FakeGpu(uuid="GPU-aaaa")]
        self.library_found = library_found
        self.init_count = 0
        self.calls: list[str] = []

    def module(self) -> types.ModuleType:
        mod = types.ModuleType("pynvml")
        mod.NVMLError = NVMLError
        mod.NVML_ERROR_NOT_SUPPORTED = NVML_ERROR_NOT_SUPPORTED
        mod.NVML_ERROR_NO_PERMISSION = NVML_ERROR_NO_PERMISSION
        for name in dir(self):
            if name.startswith("nvml"):
                setattr(mod, name, getattr(self, name))
        mod.fake = self
        return mod

    # --------------------------------------------------------------- library
    def nvmlInit(self) -> None:
        self.calls.append("nvmlInit")
        if not self.library_found:
            raise NVMLError(NVML_ERROR_LIBRARY_NOT_FOUND)
        self.init_count += 1

    def nvmlShutdown(self) -> None:
        self._need_init()
        self.init_count -= 1

    def _need_init(self) -> None:
        if self.init_count <= 0:
            raise NVMLError(NVML_ERROR_UNINITIALIZED)

    # --------------------------------------------------------------- devices
    def nvmlDeviceGetCount(self) -> int:
        self._need_init()
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        self._need_init()
        if index >= len(self.gpus):
            raise NVMLError(2)
        return self.gpus[index]

    def nvmlDeviceGetHandleByUUID(self, uuid) -> FakeGpu:
        self._need_init()
        uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
        for gpu in itertools.chain(self.gpus, (g.mig_parent for g in self.gpus if g.mig_parent)):
            if gpu.uuid == uuid:
                return gpu
        raise NVMLError(NVML_ERROR_NOT_FOUND)

    def nvmlDeviceGetName(self, handle: FakeGpu) -> str:
        return handle.name

    def nvmlDeviceGetUUID(self, handle: FakeGpu) -> str:
        return handle.uuid

    def nvmlDeviceIsMigDeviceHandle(self, handle: FakeGpu) -> int:
        return int(handle.mig_parent is not None)

    def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(self, handle: FakeGpu) -> FakeGpu:
        return handle.mig_parent

    def _read(self, handle: FakeGpu) -> None:
        self._need_init()
        handle.reads += 1
        if handle.lost_after_reads is not None and handle.reads > handle.lost_after_reads:
            raise NVMLError(NVML_ERROR_GPU_IS_LOST)
        if handle.reads in handle.errors_at:
            raise NVMLError(handle.errors_at[handle.reads])

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: FakeGpu) -> int:
        if not handle.counter:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        self._read(handle)
        now = handle.clock()
        if handle.reads == handle.reset_at_read:  # the driver reloaded a moment ago: the count starts again
            handle.t0, handle.energy_offset_mj = now - 0.001, 0
        return handle.energy_offset_mj + int((now - handle.t0) * handle.power_w * 1000)

    def nvmlDeviceGetPowerUsage(self, handle: FakeGpu) -> int:
        self._read(handle)
        return int(handle.power_w * 1000)

    # --------------------------------------------------------------- power limits
    def nvmlDeviceGetPowerManagementLimitConstraints(self, handle: FakeGpu) -> list[int]:
        self._need_init()
        return [handle.min_limit_mw, handle.max_limit_mw]

    def nvmlDeviceGetPowerManagementLimit(self, handle: FakeGpu) -> int:
        self._need_init()
        return handle.limit_mw

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: FakeGpu) -> int:
        self._need_init()
        return handle.limit_mw

    def nvmlDeviceSetPowerManagementLimit(self, handle: FakeGpu, limit_mw: int) -> None:
        self._need_init()
        if not handle.can_set_limit:
            raise NVMLError(NVML_ERROR_NO_PERMISSION)
        if not handle.min_limit_mw <= limit_mw <= handle.max_limit_mw:
            raise NVMLError(2)
        handle.limit_mw = int(limit_mw)
