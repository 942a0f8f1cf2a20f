"""Intel/AMD RAPL through the Linux powercap interface (``/sys/class/powercap``).

Each zone (``package-N``, ``dram``) exposes ``energy_uj``, a counter in microjoules that wraps at
``max_energy_range_uj``; the sensor unwraps it. Since Linux 5.10 ``energy_uj`` is readable by root
only: an unreadable file gives :class:`SensorPermissionError` with the reason.

Errors are translated here (:func:`read_sysfs`): a missing file is :class:`SensorUnavailable`, a
permission error :class:`SensorPermissionError` (both permanent), any other ``OSError`` or an
unparsable value :class:`SensorTransientError` (the sampler retries it).

Wrap or reset? When the counter falls, it either passed ``max_energy_range_uj`` (a wrap: less than half
a lap since the last reading, unwrapped here) or was reset (more than half a lap: the sensor starts a
new base and reports the fall, which the meter counts as a reset and bridges).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from pathlib import Path

from lightning_green.checks import check_name
from lightning_green.sensors.base import (
    Reading,
    Sensor,
    SensorError,
    SensorPermissionError,
    SensorTransientError,
    SensorUnavailable,
)

DEFAULT_ROOT = "/sys/class/powercap"
ZONES = ("package", "dram")


def read_sysfs(path: Path) -> str:
    """The stripped text of a sysfs file, with errors translated into sensor errors."""
    try:
        return path.read_text().strip()
    except PermissionError as err:
        raise SensorPermissionError(
            f"{path} is not readable by this user (Linux >= 5.10 makes RAPL counters root-only); "
            f"run as root or make it readable (`sudo chmod o+r {path}`)"
        ) from err
    except FileNotFoundError as err:
        raise SensorUnavailable(f"{path} does not exist") from err
    except OSError as err:
        raise SensorTransientError(f"cannot read {path}: {err}") from err


def _read_int(path: Path) -> int:
    text = read_sysfs(path)
    try:
        return int(text)
    except ValueError as err:
        raise SensorTransientError(f"{path} holds {text!r}, not a number of microjoules") from err


class RaplSensor(Sensor):
    """One RAPL zone (a CPU package or its DRAM), read from its powercap directory.

    Args:
        zone_dir: the zone's directory, e.g. ``/sys/class/powercap/intel-rapl:0``.
        name: the sensor's name; default ``rapl_<zone name>`` (``rapl_package-0``, ``rapl_dram-0``).
        clock: stamps the readings; ``time.monotonic`` unless a test drives time itself.

    Raises:
        ValueError: a bad argument (named in the message).
        SensorUnavailable: the directory has no ``energy_uj``.
        SensorPermissionError: ``energy_uj`` is not readable.
        SensorTransientError: ``energy_uj`` could not be read this time.

    Use :meth:`discover` (or :meth:`scan`) to find every zone under a sysfs root.
    """

    source = "rapl"
    kind = "energy"
    host_level = True

    def __init__(
        self, zone_dir: str | os.PathLike, name: str | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if not isinstance(zone_dir, (str, os.PathLike)):
            raise ValueError(f"`zone_dir` must be a path (str or os.PathLike), got {zone_dir!r}")
        if not callable(clock):
            raise ValueError(f"`clock` must be a callable returning seconds, got {clock!r}")
        self.zone_dir = Path(zone_dir)
        name_file = self.zone_dir / "name"
        zone_name = read_sysfs(name_file) if name_file.exists() else self.zone_dir.name
        # sub-zones are named "dram", "core": add the package index
        if not re.search(r"-\d+$", zone_name):
            # intel-rapl:0:2 -> package 0
            parts = self.zone_dir.name.split(":")
            if len(parts) >= 2:
                zone_name = f"{zone_name}-{parts[1]}"
        self.domain = "dram" if zone_name.startswith("dram") else "cpu"
        self.zone_name = zone_name
        self.name = f"rapl_{zone_name}" if name is None else check_name("name", name)
        self._clock = clock
        self._energy_file = self.zone_dir / "energy_uj"
        range_file = self.zone_dir / "max_energy_range_uj"
        self._range_uj = _read_int(range_file) if range_file.exists() else 2**32
        self._last_uj = _read_int(self._energy_file)
        self._wraps = 0

    def read(self) -> Reading:
        raw = _read_int(self._energy_file)
        if raw < self._last_uj:
            lap = self._range_uj + 1
            # passed max_energy_range_uj and started again at 0
            if lap - self._last_uj + raw <= lap // 2:
                self._wraps += 1
            # reset: a new base; the meter sees the fall, counts a reset and bridges it
            else:
                self._wraps = 0
        self._last_uj = raw
        return Reading(self._clock(), (raw + self._wraps * (self._range_uj + 1)) / 1e6, "energy")

    @classmethod
    def scan(
        cls, root: str | os.PathLike = DEFAULT_ROOT, zones: tuple[str, ...] = ZONES
    ) -> tuple[list[RaplSensor], list[SensorError]]:
        """Every readable zone under ``root`` whose name starts with one of ``zones``, and one error
        (with its reason) for each zone that could not be opened.

        Raises:
            SensorUnavailable: ``root`` does not exist (no powercap, not Linux).
        """
        root = Path(root)
        if not root.is_dir():
            raise SensorUnavailable(f"no RAPL: {root} does not exist")
        dirs = sorted(p for p in root.glob("*-rapl:*") if p.is_dir())
        dirs += sorted(p for top in dirs for p in top.glob("*-rapl:*:*") if p.is_dir())
        found: list[RaplSensor] = []
        problems: list[SensorError] = []
        for zone_dir in dirs:
            name_file = zone_dir / "name"
            if not name_file.exists():
                continue
            try:
                if read_sysfs(name_file).startswith(zones):
                    found.append(cls(zone_dir))
            except SensorError as err:
                problems.append(type(err)(f"zone {zone_dir.name}: {err}"))
        return found, problems

    @classmethod
    def discover(cls, root: str | os.PathLike = DEFAULT_ROOT, zones: tuple[str, ...] = ZONES) -> list[RaplSensor]:
        """Every readable zone under ``root`` whose name starts with one of ``zones`` (see :meth:`scan`
        for the reasons of the unreadable ones).

        Raises:
            SensorUnavailable: ``root`` has no RAPL zone (no powercap, not Linux, a VM without RAPL).
            SensorError: zones exist but none is readable (the first zone's error class, every
                zone's reason).
        """
        found, problems = cls.scan(root, zones)
        if not found:
            if problems:
                raise type(problems[0])("; ".join(str(p) for p in problems))
            raise SensorUnavailable(f"no RAPL zone named {'/'.join(zones)} under {root}")
        return found
