"""Argument checks: each returns the value it accepts and raises ``ValueError``/``TypeError`` naming the
argument and what is allowed. No Lightning, no torch: the sensors use them too."""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable, Sequence
from typing import Any


def is_finite_number(value: Any) -> bool:
    """True for a finite real number (int, float, a NumPy scalar) that is not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def check_int(name: str, value: Any, low: int, high: int | None = None) -> int:
    """``value`` as an int in ``[low, high]``, else ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"`{name}` must be an integer {bound}, got {value!r}")
    return value


def check_number(
    name: str, value: Any, low: float, *, strict: bool = False, high: float | None = None, unit: str = "a number"
) -> float:
    """``value`` as a finite float ``>= low`` (``> low`` when ``strict``) and ``<= high``."""
    ok = is_finite_number(value) and (value > low if strict else value >= low) and (high is None or value <= high)
    if not ok:
        opening = "(" if strict else "["
        rng = (f"> {low:g}" if strict else f">= {low:g}") if high is None else f"in {opening}{low:g}, {high:g}]"
        raise ValueError(f"`{name}` must be {unit} {rng}, got {value!r}")
    return float(value)


def check_choice(name: str, value: Any, allowed: Sequence[Any]) -> Any:
    """``value`` if it is one of ``allowed``, else ``ValueError`` listing them."""
    if value not in allowed:
        raise ValueError(f"unknown `{name}` {value!r}; allowed: {', '.join(str(a) for a in allowed)}")
    return value


def check_name(name: str, value: Any) -> str:
    """``value`` if it is a non-empty string, else ``ValueError`` naming ``name``."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"`{name}` must be a non-empty string, got {value!r}")
    return value


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be True or False, got {value!r}")
    return value


def check_callable(name: str, value: Any, optional: bool = True) -> Any:
    """``value`` if it is callable (or ``None`` when ``optional``), else ``TypeError`` naming ``name``."""
    if (value is None and optional) or callable(value):
        return value
    raise TypeError(f"`{name}` must be {'None or ' if optional else ''}a callable, got {value!r}")


def check_path(name: str, value: Any, optional: bool = True) -> str | None:
    """A folder or file path (``str`` or ``os.PathLike``); ``None`` when ``optional``."""
    if value is None and optional:
        return None
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        allowed = "None or a path" if optional else "a path"
        raise TypeError(f"`{name}` must be {allowed} (str or os.PathLike), got {value!r}")
    return os.fspath(value)


def checked_count(name: str, value: Any) -> int:
    """What a user callable returned for ``name``, checked on use: a whole number >= 0, as an int, a
    float or a NumPy scalar (a tensor is refused: reading it may wait for the device)."""
    whole = isinstance(value, numbers.Integral) or (
        isinstance(value, numbers.Real) and math.isfinite(value) and float(value).is_integer()
    )
    if isinstance(value, bool) or not whole or value < 0:
        hint = "; for a tensor, return `.item()`" if type(value).__name__ == "Tensor" else ""
        raise TypeError(f"`{name}` must return a whole number >= 0 for each batch, but it returned {value!r}{hint}")
    return int(value)


def describe(fn: Callable[..., Any]) -> str:
    """A readable name for a user callable in messages."""
    return getattr(fn, "__qualname__", None) or repr(fn)
