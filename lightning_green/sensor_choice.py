"""Which sensors a process reads: the ``sensors`` argument of PowerSampler and FabricEnergy, checked,
and turned into sensors for this process (its own GPU, host-level sensors on one rank per node, a
shared device on one rank only).

Trainer-free: a process is anything with ``world_size``, ``global_rank``, ``local_rank`` and
``strategy.root_device`` (:class:`Processes`), which a Lightning ``Trainer`` and a ``Fabric`` both are.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lightning_green.checks import check_choice
from lightning_green.distributed import distributed, gather_objects, shared_owners
from lightning_green.sensors.auto import SENSOR_NAMES, build_sensors, check_distinct_names
from lightning_green.sensors.base import Sensor


class Processes(Protocol):
    """What the sensor choice reads of a ``Trainer`` or a ``Fabric``."""

    world_size: int
    global_rank: int
    local_rank: int

    @property
    def strategy(self) -> Any: ...


def root_device(processes: Processes) -> torch.device:
    """This process's device (``strategy.root_device``, on a Trainer and a Fabric alike)."""
    return processes.strategy.root_device


def check_sensors(sensors: Any) -> str | list:
    """``sensors`` as given to PowerSampler or FabricEnergy, checked (``ValueError`` naming the argument)."""
    if isinstance(sensors, str):
        if sensors not in SENSOR_NAMES:
            raise ValueError(
                f"unknown sensor name {sensors!r} for `sensors`; allowed: {', '.join(SENSOR_NAMES)}"
                " or a list of Sensor objects"
            )
        return sensors
    if not isinstance(sensors, (list, tuple)) or not sensors:
        raise ValueError(
            f"`sensors` must be one of {', '.join(SENSOR_NAMES)} or a non-empty list of Sensor objects"
            f" / sensor names, got {sensors!r}"
        )
    for item in sensors:
        if isinstance(item, str):
            check_choice("sensors", item, SENSOR_NAMES)
        elif not isinstance(item, Sensor):
            raise ValueError(
                f"`sensors` holds {item!r}, which is not a lightning_green.sensors.Sensor"
                f" or a sensor name ({', '.join(SENSOR_NAMES)})"
            )
    check_distinct_names(sensors)
    return list(sensors)


class SensorChoice(NamedTuple):
    """The sensors of one process, as chosen by :func:`sensors_for_process`."""

    #: the sensors this process reads
    sensors: list[Sensor]
    #: those built here, which the session closes when it finishes
    built: list[Sensor]
    #: why each sensor asked for is not read here
    skipped: list[str]
    #: whether any process reads a sensor (False: no energy is measured anywhere)
    any_process_reads: bool


#: Said once when no process can read any sensor; the summary says it too.
NO_SENSOR_MESSAGE = (
    "lightning_green: no sensor could be read on any process, so no energy is measured: no energy, power, "
    "efficiency or carbon figures are logged, and the summary says `no_sensor: true`"
)


def sensors_for_process(processes: Processes, spec: str | list, rapl_root: str, tell: bool) -> SensorChoice:
    """The sensors this process reads: its own GPU; host-level sensors on local rank 0 only; a device
    shared by several processes (MIG) on the lowest rank only (a collective: every rank calls it in
    setup). With ``tell``, what was skipped is said once (rank 0), and a warning when no process reads
    any sensor."""
    choice = _choose_sensors(processes, spec, rapl_root)
    if tell:
        for reason in choice.skipped:
            rank_zero_info(f"lightning_green: {reason}")
        if not choice.any_process_reads:
            rank_zero_warn(NO_SENSOR_MESSAGE)
        elif not choice.sensors:
            rank_zero_info("lightning_green: no sensor is read on this process; the other processes measure")
    return choice


def _choose_sensors(processes: Processes, spec: str | list, rapl_root: str) -> SensorChoice:
    host_level = processes.local_rank == 0
    root = root_device(processes)
    spec = [spec] if isinstance(spec, str) else spec
    names = [s for s in spec if isinstance(s, str)]
    devices = [root.index or 0] if root.type == "cuda" else []
    built, skipped = build_sensors(names, devices, host_level, rapl_root)
    sensors = []
    for s in (s for s in spec if isinstance(s, Sensor)):
        if s.host_level and not host_level:
            skipped.append(f"{s.name}: host-level sensors are read by local rank 0 of each node only")
        else:
            sensors.append(s)
    sensors += built
    if not distributed(processes):
        return SensorChoice(sensors, built, skipped, any_process_reads=bool(sensors))
    # one gather: each process's shared devices, and whether it has any sensor at all
    gathered = gather_objects(processes, ([s.shared_key for s in sensors if s.shared_key], bool(sensors)))
    owners = shared_owners([keys for keys, _ in gathered])
    any_process_reads = any(has_sensor for _, has_sensor in gathered)
    kept = []
    for sensor in sensors:
        owner = owners[sensor.shared_key] if sensor.shared_key else processes.global_rank
        if owner == processes.global_rank:
            kept.append(sensor)
            continue
        skipped.append(f"{sensor.name}: the same physical device ({sensor.shared_key}) is counted by rank {owner}")
        if sensor in built:
            built.remove(sensor)
            sensor.close()
    return SensorChoice(kept, built, skipped, any_process_reads)
