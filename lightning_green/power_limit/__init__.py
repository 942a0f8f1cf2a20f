"""Power limits without a Trainer: device control, the search, its cache, and restoring on exit.

* :mod:`~lightning_green.power_limit.control`: :class:`PowerControl` (read, set, borrow and restore one
  device's limit), :class:`NvmlPowerControl`, :class:`SimulatedPowerControl`.
* :mod:`~lightning_green.power_limit.search`: :class:`LimitSearch` (the profiling schedule) and its policy
  (:func:`choose_limit`, :func:`limit_grid`).
* :mod:`~lightning_green.power_limit.cache`: :class:`PowerLimitCache`, the profiles by GPU model and world
  size.
* :mod:`~lightning_green.power_limit.restore`: :class:`SigtermRestore` and :func:`restore_at_exit`.

The Lightning glue is the callback :class:`lightning_green.callbacks.PowerLimitSearch` (any strategy);
``EnergyAwareDDPStrategy(power_limit=...)`` installs it.
"""

from lightning_green.power_limit.cache import PowerLimitCache, default_cache_path
from lightning_green.power_limit.control import (
    NvmlPowerControl,
    PowerControl,
    PowerControlError,
    PowerControlUnavailable,
    SimulatedPowerControl,
    make_power_control,
)
from lightning_green.power_limit.restore import SigtermRestore, restore_at_exit
from lightning_green.power_limit.search import LimitProfile, LimitSearch, choose_limit, limit_grid

__all__ = [
    "LimitProfile",
    "LimitSearch",
    "NvmlPowerControl",
    "PowerControl",
    "PowerControlError",
    "PowerControlUnavailable",
    "PowerLimitCache",
    "SigtermRestore",
    "SimulatedPowerControl",
    "choose_limit",
    "default_cache_path",
    "limit_grid",
    "make_power_control",
    "restore_at_exit",
]
