"""The glue every callback shares: one way to log, one logging cadence, one set of argument checks,
one resume rule and one way to warn once.

Nothing here holds state of a run except :class:`LogCadence` and :class:`WarnOnce`; everything is
testable with plain calls.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any, Callable, Iterable, Mapping, Sequence

# ============================================================================ logging
def log_metrics(trainer: Any, metrics: Mapping[str, float], step: int | None = None) -> None:
    """Send ``metrics`` to every logger of ``trainer`` at ``step`` (default ``trainer.global_step``).

    NaN figures (a rate without energy, an EPI without samples) are left out: a logger plots them as
    breaks at best.
    """
    kept = {k: v for k, v in metrics.items() if not (isinstance(v, float) and math.isnan(v))}
    if not kept:
        return
    step = trainer.global_step if step is None else step
    for logger in trainer.loggers:
        logger.log_metrics(kept, step=step)


class LogCadence:
    """Lightning's ``log_every_n_steps`` rule for callbacks that log in ``on_train_batch_end``.

    A batch that completes an optimizer step (``global_step`` moved) is a *step*; a step whose
    ``global_step`` is a multiple of ``every`` is a *log step*. Batches that only accumulate gradients
    are neither. Two integer compares per batch.

    Example::

        cadence = LogCadence()
        cadence.reset(every=10, global_step=0)
        new_step, log_now = cadence.advance(global_step)
    """

    __slots__ = ("every", "last_step")

    def __init__(self) -> None:
        self.every = 0
        self.last_step = -1

    def reset(self, every: int, global_step: int) -> None:
        """Start counting at ``global_step`` (not -1: with accumulation the first batch is no step)."""
        self.every = int(every)
        self.last_step = global_step

    def advance(self, global_step: int) -> tuple[bool, bool]:
        """``(a step was completed, it is a log step)`` for a batch that ended at ``global_step``."""
        if global_step == self.last_step:
            return False, False
        self.last_step = global_step
        return True, bool(self.every) and global_step % self.every == 0


class WarnOnce:
    """A warning said once per object: monitoring that goes partial says so, and not every step."""

    def __init__(self) -> None:
        self._said: set[str] = set()

    def __call__(self, key: str, message: str, rank_zero: bool = True) -> None:
        if key in self._said:
            return
        self._said.add(key)
        if rank_zero:
            from lightning.pytorch.utilities.rank_zero import rank_zero_warn

            rank_zero_warn(message)
        else:
            warnings.warn(message, stacklevel=2)


class SayOnce:
    """``say`` for the first message only: a hint given once per object, not once per stage
    (picklable, so a callback holding one goes through ``ddp_spawn``)."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self.say = say
        self.said = False

    def __call__(self, message: str) -> None:
        if not self.said:
            self.said = True
            self.say(message)


# ============================================================================ argument checks
def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_int(name: str, value: Any, low: int, high: int | None = None) -> int:
    """``value`` as an int in ``[low, high]``, else ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"`{name}` must be an integer {bound}, got {value!r}")
    return value


def check_number(name: str, value: Any, low: float, *, strict: bool = False, high: float | None = None, unit: str = "a number") -> float:
    """``value`` as a finite float ``>= low`` (``> low`` when ``strict``) and ``<= high``."""
    ok = _is_number(value) and (value > low if strict else value >= low) and (high is None or value <= high)
    if not ok:
        rng = (f"> {low:g}" if strict else f">= {low:g}") if high is None else f"in [{low:g}, {high:g}]"
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
    """What a user callable returned for ``name``, checked on use: an int >= 0 (or an integral float)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (isinstance(value, float) and not value.is_integer()):
        raise TypeError(f"`{name}` must return a whole number >= 0 for each batch, but it returned {value!r}")
    return int(value)


# ============================================================================ resume
def state_for_rank(per_rank: Sequence[Mapping[str, Any]], world_size: int, rank: int, sum_keys: Iterable[str]) -> dict | None:
    """The part of a checkpoint's per-process state that this process continues from.

    Same world size: this rank's own entry. Another world size: rank 0 carries the sums of
    ``sum_keys`` over every saved process and the other ranks start from nothing (``None``).
    """
    if not per_rank:
        return None
    if len(per_rank) == world_size:
        return dict(per_rank[rank])
    if rank == 0:
        return {k: sum(float(r.get(k, 0.0)) for r in per_rank) for k in sum_keys}
    return None


def misconfigured(message: str) -> Exception:
    """The exception for a Trainer set up in a way a callback cannot work with: Lightning's
    ``MisconfigurationException``, also a ``RuntimeError`` (what this package raised before)."""
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    class MisconfiguredTrainer(MisconfigurationException, RuntimeError):
        pass

    return MisconfiguredTrainer(message)


def describe(fn: Callable[..., Any]) -> str:
    """A readable name for a user callable in messages."""
    return getattr(fn, "__qualname__", None) or repr(fn)
