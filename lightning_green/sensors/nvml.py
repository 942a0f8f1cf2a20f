"""NVIDIA GPUs through NVML (``pynvml``, installed by ``nvidia-ml-py``).

The total-energy counter (``nvmlDeviceGetTotalEnergyConsumption``, mJ, Volta and newer) is used where
the GPU has one: its figures are labelled ``counter``. Otherwise board power
(``nvmlDeviceGetPowerUsage``, mW) is polled and integrated by the meter: labelled ``polled``. Polled
power can miss short spikes (the sensor samples only part of the time on A100/H100), which is why the
counter is preferred.

NVML errors are translated into the package's sensor errors here and nowhere else
(:func:`nvml_errors`): ``UNKNOWN`` and ``TIMEOUT`` are transient (:class:`SensorTransientError`, the
sampler retries them); ``GPU_IS_LOST``, ``NOT_SUPPORTED``, ``NO_PERMISSION``, ``LIBRARY_NOT_FOUND`` and
the rest are permanent (the sampler drops the sensor). ``pynvml`` is imported on first use, never when
``lightning_green`` is imported.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator

from lightning_green.checks import check_bool, check_name
from lightning_green.sensors.base import (
    Reading,
    Sensor,
    SensorError,
    SensorLost,
    SensorPermissionError,
    SensorTransientError,
    SensorUnavailable,
)

#: NVML return codes (``NVMLError.value``) and the sensor error each becomes.
_NVML_CODES = {
    1: ("UNINITIALIZED", SensorError),
    2: ("INVALID_ARGUMENT", SensorError),
    3: ("NOT_SUPPORTED", SensorUnavailable),
    4: ("NO_PERMISSION", SensorPermissionError),
    6: ("NOT_FOUND", SensorUnavailable),
    9: ("DRIVER_NOT_LOADED", SensorUnavailable),
    10: ("TIMEOUT", SensorTransientError),
    12: ("LIBRARY_NOT_FOUND", SensorUnavailable),
    13: ("FUNCTION_NOT_FOUND", SensorUnavailable),
    15: ("GPU_IS_LOST", SensorLost),
    999: ("UNKNOWN", SensorTransientError),
}


def nvml_error_code(err: BaseException) -> int | None:
    """The NVML return code carried by ``err`` (``None`` if it is not an NVML error)."""
    code = getattr(err, "value", None)
    return code if isinstance(code, int) else None


@contextlib.contextmanager
def nvml_errors(what: str) -> Iterator[None]:
    """Translate ``pynvml.NVMLError`` raised inside the block into :class:`SensorError` subclasses.

    Example::

        with nvml_errors("reading gpu0's energy counter"):
            mj = pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
    """
    import pynvml

    try:
        yield
    except pynvml.NVMLError as err:
        code = nvml_error_code(err)
        label, cls = _NVML_CODES.get(code, (f"code {code}", SensorError))
        raise cls(f"NVML {label} while {what}: {err}") from err


def init_nvml() -> object:
    """Initialise NVML and return the ``pynvml`` module (translated errors). Pair with :func:`shutdown_nvml`."""
    import pynvml

    with nvml_errors("initialising NVML"):
        pynvml.nvmlInit()
    return pynvml


def shutdown_nvml() -> None:
    """Balance one :func:`init_nvml` (NVML counts its initialisations); never raises."""
    import pynvml

    try:
        pynvml.nvmlShutdown()
    except pynvml.NVMLError:
        pass


def as_str(value: object) -> str:
    """NVML returns ``bytes`` in old bindings and ``str`` in new ones: always ``str``."""
    return value.decode() if isinstance(value, bytes) else str(value)


def handle_for_torch_index(pynvml, index: int):
    """The NVML handle of the GPU that torch calls ``cuda:<index>``.

    With CUDA initialised in torch, the mapping is by UUID (robust to ``CUDA_DEVICE_ORDER`` and to
    ``CUDA_VISIBLE_DEVICES``). Without it, ``CUDA_VISIBLE_DEVICES`` is parsed: integer entries are NVML
    indices (exact when ``CUDA_DEVICE_ORDER=PCI_BUS_ID``), ``GPU-``/``MIG-`` entries are UUIDs.
    """
    try:
        import torch

        if torch.cuda.is_available() and index < torch.cuda.device_count():
            uuid = str(torch.cuda.get_device_properties(index).uuid)
            for candidate in (uuid, f"GPU-{uuid}", f"MIG-{uuid}"):
                try:
                    return pynvml.nvmlDeviceGetHandleByUUID(candidate)
                except pynvml.NVMLError:
                    continue
    except (ImportError, RuntimeError, AttributeError):
        pass
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return pynvml.nvmlDeviceGetHandleByIndex(index)
    entries = [e.strip() for e in visible.split(",") if e.strip()]
    if index >= len(entries):
        raise SensorUnavailable(f"cuda:{index} is not visible (CUDA_VISIBLE_DEVICES={visible!r})")
    entry = entries[index]
    if entry.isdigit():
        return pynvml.nvmlDeviceGetHandleByIndex(int(entry))
    return pynvml.nvmlDeviceGetHandleByUUID(entry)


def visible_gpu_indices() -> list[int]:
    """Torch indices of the GPUs NVML can see (respects ``CUDA_VISIBLE_DEVICES``).

    Raises:
        SensorUnavailable: NVML is missing (no driver, no library).
    """
    pynvml = init_nvml()
    try:
        with nvml_errors("counting GPUs"):
            count = pynvml.nvmlDeviceGetCount()
    finally:
        shutdown_nvml()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        count = min(count, len([e for e in visible.split(",") if e.strip()]))
    return list(range(count))


class NvmlSensor(Sensor):
    """One NVIDIA GPU, as torch numbers it (``cuda:<index>``).

    Args:
        index: the torch CUDA index (after ``CUDA_VISIBLE_DEVICES`` remapping).
        name: the sensor's name in metric keys; default ``gpu<index>``.
        use_counter: try the total-energy counter first (default). ``False`` forces polled power.
        clock: stamps the readings; ``time.monotonic`` unless a test drives time itself.

    Raises:
        ValueError: a bad argument (named in the message).
        SensorUnavailable: no NVML library or driver, or no such GPU.
        SensorPermissionError: NVML refuses access to the device.
    """

    domain = "gpu"
    host_level = False

    def __init__(
        self,
        index: int = 0,
        name: str | None = None,
        use_counter: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise ValueError(f"`index` must be a CUDA device index >= 0, got {index!r}")
        check_bool("use_counter", use_counter)
        if not callable(clock):
            raise ValueError(f"`clock` must be a callable returning seconds, got {clock!r}")
        self.index = index
        self.name = f"gpu{index}" if name is None else check_name("name", name)
        self._clock = clock
        # until NVML is initialised: close() must not shut down what was never started
        self._closed = True
        self._pynvml = pynvml = init_nvml()
        self._closed = False
        try:
            with nvml_errors(f"opening cuda:{index}"):
                handle = handle_for_torch_index(pynvml, index)
                self.note = ""
                if _is_mig(pynvml, handle):
                    handle = pynvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(handle)
                    self.note = "MIG instance: energy and power are the whole physical GPU's, shared by its instances"
                self.model = as_str(pynvml.nvmlDeviceGetName(handle))
                self.shared_key = as_str(pynvml.nvmlDeviceGetUUID(handle))
            self._handle = handle
            self.kind = "power"
            self.source = "polled"
            if use_counter:
                try:
                    with nvml_errors(f"reading {self.name}'s energy counter"):
                        pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
                    self.kind = "energy"
                    self.source = "counter"
                except SensorUnavailable:
                    # NOT_SUPPORTED: pre-Volta or a virtual GPU; poll power instead
                    pass
            if self.kind == "power":
                self.note = "; ".join(
                    filter(
                        None,
                        [self.note, "polled board power (a 1 s average on Ampere and newer), can miss short spikes"],
                    )
                )
        except BaseException:
            self.close()
            raise

    def read(self) -> Reading:
        pynvml = self._pynvml
        # an NVML call can take milliseconds: stamp the reading at its middle
        t0 = self._clock()
        if self.kind == "energy":
            with nvml_errors(f"reading {self.name}'s energy counter"):
                mj = pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)
            return Reading(0.5 * (t0 + self._clock()), mj / 1000.0, "energy")
        with nvml_errors(f"reading {self.name}'s power"):
            mw = pynvml.nvmlDeviceGetPowerUsage(self._handle)
        return Reading(0.5 * (t0 + self._clock()), mw / 1000.0, "power")

    def describe(self) -> dict:
        out = super().describe()
        out.update(index=self.index, model=self.model)
        return out

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            shutdown_nvml()


def _is_mig(pynvml, handle) -> bool:
    try:
        return bool(pynvml.nvmlDeviceIsMigDeviceHandle(handle))
    except (pynvml.NVMLError, AttributeError):
        return False
