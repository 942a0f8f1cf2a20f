"""The cache of power-limit profiles: a JSON file keyed by GPU model and world size, so the next run on
the same hardware skips profiling (PowerLimitSearch reads it on rank 0 in ``setup`` and writes it when
a search finishes).

The cache does not know the workload: point PowerLimitSearch's ``cache`` elsewhere (or delete the
entry) to profile a different model on the same hardware again.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from lightning_green.power_limit.search import LimitProfile

log = logging.getLogger(__name__)


def default_cache_path() -> str:
    """``$XDG_CACHE_HOME/lightning_green/power_limits.json`` (``~/.cache/...`` without the variable)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "lightning_green", "power_limits.json")


class PowerLimitCache:
    """Measured profiles (:class:`~lightning_green.power_limit.search.LimitProfile`) in a JSON file, keyed
    by ``"<device name>|world_size=<n>"``.

    A missing or unreadable file is an empty cache (an unreadable one is reported and overwritten).

    Args:
        path: the JSON file (see :func:`default_cache_path`).
    """

    VERSION = 1

    def __init__(self, path: str) -> None:
        self.path = os.fspath(path)

    @staticmethod
    def key(device_name: str, world_size: int) -> str:
        """The entry of one device model at one world size."""
        return f"{device_name}|world_size={world_size}"

    def _read(self) -> dict:
        try:
            with open(self.path) as f:
                data = json.load(f)
            if not isinstance(data, dict) or data.get("version") != self.VERSION:
                raise ValueError("unknown format")
            return data
        except FileNotFoundError:
            return {"version": self.VERSION, "entries": {}}
        except (OSError, ValueError) as err:
            log.warning("ignoring the power-limit cache %s: %s", self.path, err)
            return {"version": self.VERSION, "entries": {}}

    def load(self, key: str) -> list[LimitProfile] | None:
        """The profiles stored under ``key``, or ``None`` (no entry, or an unreadable one, reported)."""
        entry = self._read()["entries"].get(key)
        if not entry:
            return None
        try:
            return [LimitProfile(**p) for p in entry["profiles"]]
        except (KeyError, TypeError) as err:
            log.warning("ignoring the power-limit cache entry %r: %s", key, err)
            return None

    def store(self, key: str, profiles: Sequence[LimitProfile], **extra: Any) -> None:
        """Store ``profiles`` (and ``extra`` fields, e.g. the search's settings) under ``key``, keeping the
        other entries."""
        data = self._read()
        data["entries"][key] = {"profiles": [asdict(p) for p in profiles], "created_unix_s": time.time(), **extra}
        write_json_atomic(self.path, data)


def write_json_atomic(path: str, data: dict) -> None:
    """Write ``data`` as JSON to ``path`` through a temporary file and a rename (never half-written).

    Used for the cache and for the "device" state file of
    :class:`~lightning_green.power_limit.control.SimulatedPowerControl`.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


__all__ = ["PowerLimitCache", "default_cache_path", "write_json_atomic"]
