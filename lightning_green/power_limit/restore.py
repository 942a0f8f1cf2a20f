"""Put borrowed device settings back when the process ends: on SIGTERM, and at exit as a last resort.

A power limit outlives the process that set it, and a SIGTERM (a scheduler's preemption, ``kill``)
skips ``finally`` blocks and ``atexit``. :class:`SigtermRestore` (installed by PowerLimitSearch while
training) restores first, then hands the signal on to whoever handled it before, so Lightning's own
SIGTERM handling still runs. :func:`restore_at_exit` (registered by a
:class:`~lightning_green.power_limit.control.PowerControl` on its first change) restores at a normal
exit, also of ``multiprocessing`` / ``torch.multiprocessing`` children, which skip ``atexit``.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from multiprocessing.util import Finalize
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)


def restore_at_exit(restore: Callable[[], None]) -> Finalize:
    """Call ``restore`` when the process exits normally: at interpreter exit and at the exit of
    ``multiprocessing`` children (which skip ``atexit``). ``restore`` must not raise.

    Returns:
        The registration; ``.cancel()`` it to drop the call.
    """
    return Finalize(None, restore, exitpriority=100)


class SigtermRestore:
    """A SIGTERM handler that restores borrowed power limits first, then hands the signal on.

    The previous handler runs after the restore: a callable is called (Lightning's own handler, which
    stops training at the next batch); ``SIG_IGN`` stays ignored; the default handler is re-installed and
    the signal re-raised, so the process still dies of SIGTERM.

    Args:
        restore: called once per signal; must not raise (exceptions are logged and swallowed).
    """

    def __init__(self, restore: Callable[[], None]) -> None:
        self._restore = restore
        self._previous: Any = None
        self._installed = False
        # the exact object given to signal.signal, compared at uninstall
        self._handler = self._handle

    def install(self) -> bool:
        """Install the handler (main thread only). Returns whether it was installed."""
        if self._installed or threading.current_thread() is not threading.main_thread():
            return self._installed
        self._previous = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, self._handler)
        self._installed = True
        return True

    def uninstall(self) -> None:
        """Put the previous handler back if ours is still the one installed."""
        if not self._installed or threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) is self._handler:
            signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)
        self._installed = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        try:
            self._restore()
        except Exception as err:
            log.warning("could not restore the power limit on SIGTERM: %s", err)
        previous = self._previous
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_IGN:
            return
        else:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def __getstate__(self) -> dict:
        return {"_restore": self._restore, "_previous": None, "_installed": False}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._handler = self._handle


__all__ = ["SigtermRestore", "restore_at_exit"]
