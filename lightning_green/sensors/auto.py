"""``sensors="auto"``: probe the hardware in order and fall back, saying why each was skipped.

Order: NVIDIA GPUs through NVML (the GPUs this process trains on), then the CPU through RAPL, and
the utilisation estimate only when RAPL cannot be read. Host-level sensors (RAPL, the estimate) are
created only where ``host_level=True`` (one process per node).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

from lightning_green.checks import check_bool
from lightning_green.sensors.base import Sensor, SensorError
from lightning_green.sensors.estimate import DEFAULT_NAME as ESTIMATE_NAME
from lightning_green.sensors.estimate import CpuEstimateSensor
from lightning_green.sensors.nvml import NvmlSensor
from lightning_green.sensors.rapl import DEFAULT_ROOT, ZONES, RaplSensor

#: Names accepted wherever sensors are given by name.
SENSOR_NAMES = ("auto", "nvml", "rapl", "estimate")
#: The names the sensors built for a sensor name take (a pattern each), and how a message shows them.
DEFAULT_SENSOR_NAMES: dict[str, tuple[str, str]] = {
    "nvml": (r"gpu\d+", "gpu<index>"),
    "rapl": (rf"rapl_({'|'.join(ZONES)})\S*", "rapl_<zone>, e.g. rapl_package-0"),
    "estimate": (re.escape(ESTIMATE_NAME), ESTIMATE_NAME),
}
#: What each sensor name may build.
_BUILDS = {"auto": ("nvml", "rapl", "estimate"), "nvml": ("nvml",), "rapl": ("rapl",), "estimate": ("estimate",)}


def check_distinct_names(sensors: Sequence[str | Sensor]) -> None:
    """Check that the sensors of a ``sensors`` list (sensor objects and sensor names) can never share a
    name: no two sensor objects share one, and none takes a name that a sensor built for one of the
    listed sensor names takes by default (``"estimate"`` builds ``cpu_estimate``, ``"nvml"`` builds
    ``gpu0``, ...), whatever hardware this machine has.

    Raises:
        ValueError: naming the sensor, the clashing entry and what to change.
    """
    objects = [s for s in sensors if isinstance(s, Sensor)]
    seen: dict[str, Sensor] = {}
    for sensor in objects:
        if sensor.name in seen:
            raise ValueError(
                f"`sensors` holds two sensors named {sensor.name!r} ({seen[sensor.name]!r} and {sensor!r});"
                " give each a distinct `name`"
            )
        seen[sensor.name] = sensor
    for spec in (s for s in sensors if isinstance(s, str)):
        for built in _BUILDS.get(spec, ()):
            pattern, shown = DEFAULT_SENSOR_NAMES[built]
            for sensor in objects:
                if re.fullmatch(pattern, sensor.name):
                    raise ValueError(
                        f"`sensors` holds {sensor!r} and {spec!r}, which builds a sensor named {shown}: two sensors"
                        f" would be named {sensor.name!r}; give {type(sensor).__name__} another `name` or drop {spec!r}"
                    )


def build_sensors(
    names: Sequence[str],
    gpu_indices: Sequence[int] = (),
    host_level: bool = True,
    rapl_root: str = DEFAULT_ROOT,
) -> tuple[list[Sensor], list[str]]:
    """Create the sensors named in ``names`` (see :data:`SENSOR_NAMES`).

    Args:
        names: sensor names; ``"auto"`` expands to ``nvml``, then ``rapl`` with ``estimate`` as fallback.
        gpu_indices: torch CUDA indices this process trains on (for ``nvml``).
        host_level: whether this process reads machine-wide sensors (RAPL, the estimate).
        rapl_root: the powercap sysfs root.

    Returns:
        The sensors, and one sentence for each sensor (or RAPL zone) that was skipped and why.

    Raises:
        ValueError: a bad argument (named in the message).
    """
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise ValueError(f"`names` must be a list of sensor names ({', '.join(SENSOR_NAMES)}), got {names!r}")
    if (
        isinstance(gpu_indices, str)
        or not isinstance(gpu_indices, Sequence)
        or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in gpu_indices)
    ):
        raise ValueError(f"`gpu_indices` must be a list of CUDA device indices >= 0, got {gpu_indices!r}")
    check_bool("host_level", host_level)
    if not isinstance(rapl_root, (str, os.PathLike)):
        raise ValueError(f"`rapl_root` must be a path (str or os.PathLike), got {rapl_root!r}")
    for name in names:
        if name not in SENSOR_NAMES:
            raise ValueError(f"unknown sensor name {name!r} in `sensors`; allowed: {', '.join(SENSOR_NAMES)}")
    wanted = []
    for name in names:
        wanted += ["nvml", "rapl", "estimate?"] if name == "auto" else [name]
    sensors: list[Sensor] = []
    skipped: list[str] = []
    have_cpu = False
    for name in wanted:
        if name == "nvml":
            if not gpu_indices:
                skipped.append("nvml: this process does not train on a CUDA device")
                continue
            for index in gpu_indices:
                try:
                    sensors.append(NvmlSensor(index))
                except (SensorError, ImportError) as err:
                    skipped.append(f"nvml: cuda:{index} skipped ({err})")
        elif not host_level:
            skipped.append(f"{name.rstrip('?')}: host-level sensors are read by local rank 0 of each node only")
        elif name == "rapl":
            try:
                found, problems = RaplSensor.scan(rapl_root)
            except SensorError as err:
                skipped.append(f"rapl: {err}")
                continue
            skipped += [f"rapl: {err}" for err in problems]
            if not found and not problems:
                skipped.append(f"rapl: no RAPL zone under {rapl_root}")
            sensors += found
            have_cpu = have_cpu or any(s.domain == "cpu" for s in found)
        elif name == "estimate" or (name == "estimate?" and not have_cpu):
            sensors.append(CpuEstimateSensor())
            if name == "estimate?":
                skipped.append("cpu: no readable CPU counter, so CPU power is an estimate (source 'estimate')")
    unique: dict[str, Sensor] = {}
    # "auto" plus "nvml" (say) names one sensor twice: keep the first
    for sensor in sensors:
        if sensor.name in unique:
            sensor.close()
        else:
            unique[sensor.name] = sensor
    return list(unique.values()), skipped
