"""Deprecated: moved to :mod:`lightning_green.power_limit` (``search.py`` and ``cache.py``); this path goes
in the next release."""

import warnings

from lightning_green.power_limit.cache import PowerLimitCache, default_cache_path
from lightning_green.power_limit.search import (
    LimitProfile,
    LimitSearch,
    check_eta,
    check_max_slowdown,
    choose_limit,
    limit_grid,
)

warnings.warn(
    "`lightning_green.strategies.power_limit` moved to `lightning_green.power_limit` (search.py, cache.py)",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = [
    "LimitProfile",
    "LimitSearch",
    "PowerLimitCache",
    "check_eta",
    "check_max_slowdown",
    "choose_limit",
    "default_cache_path",
    "limit_grid",
]
