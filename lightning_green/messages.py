"""Said once: a warning per object (:class:`WarnOnce`) and a hint per object (:class:`SayOnce`)."""

from __future__ import annotations

import warnings
from collections.abc import Callable

from lightning.pytorch.utilities.rank_zero import rank_zero_warn


class WarnOnce:
    """A warning said once per object: monitoring that goes partial says so, and not every step."""

    def __init__(self) -> None:
        self._said: set[str] = set()

    def __call__(self, key: str, message: str, rank_zero: bool = True) -> None:
        if key in self._said:
            return
        self._said.add(key)
        if rank_zero:
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
