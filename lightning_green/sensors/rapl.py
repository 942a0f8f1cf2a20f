"""Intel/AMD RAPL through the Linux powercap interface (``/sys/class/powercap``).

Each zone (``package-N``, ``dram``) exposes ``energy_uj``, a counter in microjoules that wraps at
``max_energy_range_uj``; the sensor unwraps it. Since Linux 5.10 ``energy_uj`` is readable by root
only: an unreadable file gives :class:`SensorPermissionError` with the reason.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from lightning_green.sensors.base import Reading, Sensor, SensorError, SensorPermissionError, SensorUnavailable

DEFAULT_ROOT = "/sys/class/powercap"
ZONES = ("package", "dram")


def _read_int(path: Path) -> int:
    try:
        return int(path.read_text().strip())
    except PermissionError as err:
        raise SensorPermissionError(
            f"{path} is not readable by this user (Linux >= 5.10 makes RAPL counters root-only); "
            f"run as root or make it readable (`sudo chmod o+r {path}`)"
        ) from err
    except FileNotFoundError as err:
        raise SensorUnavailable(f"{path} does not exist") from err
    except (OSError, ValueError) as err:
        raise SensorError(f"cannot read {path}: {err}") from err


class RaplSensor(Sensor):
    """One RAPL zone (a CPU package or its DRAM), read from its powercap directory.

    Args:
        zone_dir: the zone's directory, e.g. ``/sys/class/powercap/intel-rapl:0``.
        name: the sensor's name; default ``rapl_<zone name>`` (``rapl_package-0``, ``rapl_dram-0``).

    Raises:
        SensorUnavailable: the directory has no ``energy_uj``.
        SensorPermissionError: ``energy_uj`` is not readable.

    Use :meth:`discover` to find every zone under a sysfs root.
    """

    source = "rapl"
    kind = "energy"
    host_level = True

    def __init__(self, zone_dir: str | os.PathLike, name: str | None = None) -> None:
        self.zone_dir = Path(zone_dir)
        name_file = self.zone_dir / "name"
        zone_name = name_file.read_text().strip() if name_file.exists() else self.zone_dir.name
        if not re.search(r"-\d+$", zone_name):  # sub-zones are named "dram", "core": add the package index
            parts = self.zone_dir.name.split(":")  # intel-rapl:0:2 -> package 0
            if len(parts) >= 2:
                zone_name = f"{zone_name}-{parts[1]}"
        self.domain = "dram" if zone_name.startswith("dram") else "cpu"
        self.zone_name = zone_name
        self.name = name or f"rapl_{zone_name}"
        self._energy_file = self.zone_dir / "energy_uj"
        range_file = self.zone_dir / "max_energy_range_uj"
        self._range_uj = _read_int(range_file) if range_file.exists() else 2**32
        self._last_uj = _read_int(self._energy_file)
        self._wraps = 0

    def read(self) -> Reading:
        raw = _read_int(self._energy_file)
        if raw < self._last_uj:  # the counter passed max_energy_range_uj and started again at 0
            self._wraps += 1
        self._last_uj = raw
        return Reading(time.monotonic(), (raw + self._wraps * (self._range_uj + 1)) / 1e6, "energy")

    @classmethod
    def discover(cls, root: str | os.PathLike = DEFAULT_ROOT, zones: tuple[str, ...] = ZONES) -> list["RaplSensor"]:
        """Every readable zone under ``root`` whose name starts with one of ``zones``.

        Raises:
            SensorUnavailable: ``root`` has no RAPL zone (no powercap, not Linux, a VM without RAPL).
            SensorPermissionError: zones exist but none is readable.
        """
        root = Path(root)
        if not root.is_dir():
            raise SensorUnavailable(f"no RAPL: {root} does not exist")
        dirs = sorted(p for p in root.glob("*-rapl:*") if p.is_dir())
        dirs += sorted(p for top in dirs for p in top.glob("*-rapl:*:*") if p.is_dir())
        found, denied = [], []
        for zone_dir in dirs:
            name_file = zone_dir / "name"
            if not name_file.exists():
                continue
            zone = name_file.read_text().strip()
            if not zone.startswith(zones):
                continue
            try:
                found.append(cls(zone_dir))
            except SensorPermissionError as err:
                denied.append(str(err))
        if not found:
            if denied:
                raise SensorPermissionError(denied[0])
            raise SensorUnavailable(f"no RAPL zone named {'/'.join(zones)} under {root}")
        return found
