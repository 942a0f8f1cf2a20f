"""Sensor base class, the :class:`Reading` a sensor returns, and the package's sensor errors.

A sensor reads one energy source. It knows nothing of Lightning: the sampler thread calls
:meth:`Sensor.read` every ``interval_s`` and the meter turns readings into energy.

Two kinds of reading exist:

* ``"energy"``: a cumulative counter in joules (NVML total energy, RAPL). The meter integrates it by
  difference, so the absolute value does not matter, only that it never decreases.
* ``"power"``: instantaneous (or short-average) power in watts (NVML polled power, the CPU estimate,
  the simulated sensor). The meter integrates it with the trapezoid rule.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Literal

#: Where an energy figure comes from. Every figure the package reports carries one of these.
SOURCES = ("counter", "polled", "rapl", "estimate", "simulated")
Source = Literal["counter", "polled", "rapl", "estimate", "simulated"]
#: What a reading holds: joules of a cumulative counter, or watts.
KINDS = ("energy", "power")
Kind = Literal["energy", "power"]
#: What part of the machine a sensor covers. ``dram`` is the memory-access energy (RAPL dram zone).
DOMAINS = ("gpu", "cpu", "dram", "other")


class SensorError(RuntimeError):
    """A sensor could not be read. The sampler drops the sensor and reports the message once
    (except for :class:`SensorTransientError`, which it retries)."""


class SensorTransientError(SensorError):
    """A read failed for a reason that may pass: NVML ``UNKNOWN`` or ``TIMEOUT``, an I/O error on a
    sysfs file. The sampler retries it with backoff and counts a gap; it drops the sensor only after
    several such failures in a row (see :mod:`lightning_green.energy.sampler`)."""


class SensorUnavailable(SensorError):
    """The hardware or library behind a sensor is absent (no driver, no counter, no sysfs zone)."""


class SensorPermissionError(SensorError):
    """The sensor exists but this process may not read (or control) it."""


class SensorLost(SensorError):
    """The device disappeared in the middle of a run (for example an NVIDIA GPU fell off the bus)."""


@dataclass(frozen=True)
class Reading:
    """One sample of a sensor.

    Attributes:
        t_s: ``time.monotonic()`` when the value was read, in seconds.
        value: joules since an arbitrary origin when ``kind == "energy"``; watts when ``kind == "power"``.
        kind: ``"energy"`` or ``"power"``.
    """

    t_s: float
    value: float
    kind: Kind


class _CheckedAtConstruction(abc.ABCMeta):
    """Checks every sensor with :func:`validate_sensor` once its ``__init__`` has run, so a custom
    sensor with a missing or unknown field fails where it is built, naming its class and the field."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        sensor = super().__call__(*args, **kwargs)
        validate_sensor(sensor)
        return sensor


class Sensor(abc.ABC, metaclass=_CheckedAtConstruction):
    """One source of energy readings.

    Subclasses set :attr:`name` (unique within a run, used in metric keys), :attr:`source`
    (one of :data:`SOURCES`), :attr:`kind` (one of :data:`KINDS`), :attr:`domain` (one of
    :data:`DOMAINS`) and :attr:`host_level`, as class attributes or in ``__init__``: a sensor is
    checked (:func:`validate_sensor`) as soon as it is constructed.

    ``host_level`` sensors measure something the whole machine shares (CPU package, DRAM, a CPU
    estimate). Under multi-process training they are read by one process per node only, so a node's
    CPU energy is not counted once per rank.
    """

    name: str
    source: Source
    kind: Kind
    domain: str = "other"
    host_level: bool = False
    #: Free-text caveat shown in the summary (for example "MIG instance: whole-GPU energy").
    note: str = ""
    #: Identifies the physical thing measured (an NVIDIA GPU's UUID). Processes whose sensors share a
    #: key measure the same device (MIG instances of one GPU): only the lowest rank counts it.
    shared_key: str | None = None

    @abc.abstractmethod
    def read(self) -> Reading:
        """Return one reading. Raise :class:`SensorTransientError` for a failure that may pass (the
        sampler retries), :class:`SensorError` (or any exception) when the sensor cannot be read any
        more (the sampler drops it). Called on the sensor's own reader thread, never concurrently."""

    def close(self) -> None:  # noqa: B027 - an optional hook: most sensors hold nothing to release
        """Release what the sensor holds. Safe to call more than once."""

    def describe(self) -> dict:
        """Static facts about this sensor for the summary."""
        return {
            "name": self.name,
            "source": self.source,
            "kind": self.kind,
            "domain": self.domain,
            "host_level": self.host_level,
            "note": self.note,
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, source={self.source!r})"


def validate_sensor(sensor: Sensor) -> Sensor:
    """``sensor`` if the fields the package relies on hold allowed values.

    Checks :attr:`~Sensor.name` (a non-empty string), :attr:`~Sensor.source` (one of :data:`SOURCES`),
    :attr:`~Sensor.kind` (one of :data:`KINDS`), :attr:`~Sensor.domain` (one of :data:`DOMAINS`) and
    :attr:`~Sensor.host_level` (a bool). Every :class:`Sensor` is checked when it is constructed.

    Raises:
        TypeError: ``sensor`` is not a :class:`Sensor`, or a field is missing or of the wrong type.
        ValueError: a field holds a value outside the allowed ones.
        The message names the sensor's class, its name when it has one, and the field.
    """
    if not isinstance(sensor, Sensor):
        raise TypeError(f"expected a lightning_green.sensors.Sensor, got {sensor!r} ({type(sensor).__name__})")
    cls = type(sensor).__name__
    if not hasattr(sensor, "name"):
        raise TypeError(f"sensor class {cls} sets no `name`: give it a non-empty string (used in metric keys)")
    if not isinstance(sensor.name, str) or not sensor.name:
        raise TypeError(f"sensor class {cls} has `name` {sensor.name!r}: it must be a non-empty string")
    label = f"sensor {sensor.name!r} ({cls})"
    allowed = {"source": SOURCES, "kind": KINDS, "domain": DOMAINS}
    for field, values in allowed.items():
        if not hasattr(sensor, field):
            raise TypeError(f"{label} sets no `{field}`: set it to one of {', '.join(values)}")
        value = getattr(sensor, field)
        if value not in values:
            raise ValueError(f"{label} has `{field}` {value!r}: it must be one of {', '.join(values)}")
    if not isinstance(sensor.host_level, bool):
        raise TypeError(f"{label} has `host_level` {sensor.host_level!r}: it must be True or False")
    return sensor
