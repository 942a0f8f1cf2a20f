"""How figures reach the loggers: NaN left out, thread-safe loggers written off the training thread
(:class:`LogQueue`), and Lightning's ``log_every_n_steps`` rule for per-batch hooks (:class:`LogCadence`)."""

from __future__ import annotations

import collections
import functools
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from lightning_green.messages import WarnOnce


def _finite(metrics: Mapping[str, float]) -> dict[str, float]:
    """NaN figures (a rate without energy, an EPI without samples) left out: a logger plots them as
    breaks at best."""
    return {k: v for k, v in metrics.items() if not (isinstance(v, float) and math.isnan(v))}


def write_metrics(loggers: Sequence[Any], metrics: Mapping[str, float], step: int) -> None:
    """Send ``metrics`` (NaN left out) to each of ``loggers`` at ``step``; nothing when none is left."""
    kept = _finite(metrics)
    for logger in loggers if kept else ():
        logger.log_metrics(kept, step=step)


def log_metrics(trainer: Any, metrics: Mapping[str, float], step: int | None = None) -> None:
    """Send ``metrics`` (NaN left out) to every logger of ``trainer`` at ``step`` (default ``trainer.global_step``)."""
    write_metrics(trainer.loggers, metrics, trainer.global_step if step is None else step)


def writes_thread_safe(logger: Any) -> bool:
    """True for Lightning's ``TensorBoardLogger``: its ``SummaryWriter`` puts each event on a queue under
    a lock that Lightning's own writes and flushes take too. Other loggers may race with Lightning's
    ``save()`` (``CSVLogger`` rewrites its rows there), so they are written on the training thread."""
    from lightning.pytorch.loggers import TensorBoardLogger

    return isinstance(logger, TensorBoardLogger)


class LogQueue:
    """Per-step metrics to a list of loggers, the thread-safe ones written by a background thread.

    :meth:`put` writes the other loggers in place and appends the metrics to a queue that a thread
    drains every ``drain_every_s``, so a log step costs the training thread a list append instead of
    TensorBoard's writes (about 150 µs for a few scalars on a 2-core machine, most of it waking
    TensorBoard's own writer thread); nothing is woken per step. The thread runs from :meth:`start` to
    :meth:`stop`, which writes what is queued and returns within ``stop_timeout_s``. A logger that
    raises is reported once and written no more; training goes on. Before :meth:`start` (or on a
    process that is not global rank 0) every logger is written in place.

    Example::

        writes = LogQueue("PowerSampler")
        writes.start(trainer.loggers, background=trainer.is_global_zero)
        writes.put({"energy/total_j": 12.5}, step=trainer.global_step)
        writes.stop()
    """

    def __init__(
        self,
        name: str,
        thread_safe: Callable[[Any], bool] = writes_thread_safe,
        drain_every_s: float = 0.5,
        stop_timeout_s: float = 2.0,
    ) -> None:
        self.name = name
        self.thread_safe = thread_safe
        self.drain_every_s = drain_every_s
        self.stop_timeout_s = stop_timeout_s
        # None: not started, the caller's loggers are written in place
        self._inline: list[Any] | None = None
        self._background: list[Any] = []
        # appended by the training thread, popped by the thread
        self._items: collections.deque | None = None
        # made at start: a callback holding one pickles for spawn
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None
        self._warn = WarnOnce()

    def start(self, loggers: Sequence[Any], background: bool = True) -> None:
        """Write ``loggers`` from now on; the thread-safe ones on a thread when ``background``."""
        self.stop()
        self._background = [lg for lg in loggers if background and self.thread_safe(lg)]
        self._inline = [lg for lg in loggers if lg not in self._background]
        if self._background:
            self._items = collections.deque()
            self._stop = threading.Event()
            self._thread = threading.Thread(
                target=self._run,
                args=(self._items, self._stop, self._background),
                name=f"lightning_green-log:{self.name}",
                daemon=True,
            )
            self._thread.start()

    def put(self, metrics: Mapping[str, float], step: int, loggers: Sequence[Any] = ()) -> None:
        """Log ``metrics`` (NaN left out) at ``step``; ``loggers`` are written in place when not started.
        The thread's share is filtered on the thread: the training thread only appends it."""
        inline = loggers if self._inline is None else self._inline
        if inline:
            write_metrics(inline, metrics, step)
        if self._items is not None:
            self._items.append((metrics, step))

    def call(
        self, work: Callable[[Callable[[Mapping[str, float], int], None]], None], loggers: Sequence[Any] = ()
    ) -> None:
        """Run ``work(write)``, where ``write(metrics, step)`` logs: on the thread, after what is queued,
        when every logger is written there; else now, writing ``loggers`` (or those of :meth:`start`).
        Work that only the thread runs while it is up keeps its state to itself."""
        if self._items is not None and not self._inline:
            self._items.append(work)
        else:
            # writes the started inline loggers, or ``loggers``
            work(functools.partial(self.put, loggers=loggers))

    def _run(self, items: collections.deque, stop: threading.Event, loggers: list[Any]) -> None:
        """The thread: its own queue, stop event and loggers, so a thread left behind by :meth:`stop`
        (a write that hangs) never writes to the loggers of a later :meth:`start`."""
        write = functools.partial(self._write, loggers)
        while True:
            stopping = stop.wait(self.drain_every_s)
            while items:
                item = items.popleft()
                if not callable(item):
                    write(*item)
                    continue
                try:
                    item(write)
                except Exception as err:  # noqa: BLE001 - monitoring must not stop training
                    self._warn(
                        "work",
                        f"{self.name}: background log work failed: {err!r}; some metrics are missing",
                        rank_zero=False,
                    )
            if stopping:
                return

    def _write(self, loggers: list[Any], metrics: Mapping[str, float], step: int) -> None:
        kept = _finite(metrics)
        for logger in list(loggers) if kept else ():
            try:
                logger.log_metrics(kept, step=step)
            except Exception as err:  # noqa: BLE001 - a logger must not stop training
                loggers.remove(logger)
                self._warn(
                    f"fail:{id(logger)}",
                    f"{self.name}: {type(logger).__name__}.log_metrics raised {err!r}; its energy metrics stop here",
                    rank_zero=False,
                )

    def stop(self) -> None:
        """Write what is queued and end the thread (at most ``stop_timeout_s``); loggers are then written
        in place again."""
        thread, items = self._thread, self._items
        self._thread = self._items = self._inline = None
        if thread is None:
            return
        self._stop.set()
        self._stop = None
        thread.join(self.stop_timeout_s)
        self._background = []
        if thread.is_alive():
            # what is still queued is dropped: run later, its work would land in the next run
            items.clear()
            self._warn(
                "stuck",
                f"{self.name}: a logger write did not return within {self.stop_timeout_s} s; the thread is left "
                "behind (a daemon) and what was queued is dropped",
                rank_zero=False,
            )


class LogCadence:
    """Lightning's ``log_every_n_steps`` rule for callbacks that log in ``on_train_batch_end``.

    A batch that completes an optimizer step (``global_step`` moved) is a *step*; a step whose
    ``global_step`` is a multiple of ``every`` is a *log step*. Batches that only accumulate gradients
    are neither. Two integer compares and an add per batch; :attr:`steps` counts the steps since the
    last :meth:`take_steps`.

    Example::

        cadence = LogCadence()
        cadence.reset(every=10, global_step=0)
        if cadence.log_step(global_step):
            steps_in_window = cadence.take_steps()
    """

    __slots__ = ("every", "last_step", "steps")

    def __init__(self) -> None:
        self.every = 0
        self.last_step = -1
        self.steps = 0

    def reset(self, every: int, global_step: int) -> None:
        """Start counting at ``global_step`` (not -1: with accumulation the first batch is no step)."""
        self.every = int(every)
        self.last_step = global_step
        self.steps = 0

    def log_step(self, global_step: int) -> bool:
        """Whether a batch that ended at ``global_step`` is a log step (the per-batch call)."""
        if global_step == self.last_step:
            return False
        self.last_step = global_step
        self.steps += 1
        return self.every != 0 and global_step % self.every == 0

    def advance(self, global_step: int) -> tuple[bool, bool]:
        """``(a step was completed, it is a log step)`` for a batch that ended at ``global_step``."""
        stepped = global_step != self.last_step
        return stepped, self.log_step(global_step)

    def take_steps(self) -> int:
        """The steps since the last call (or :meth:`reset`); the count starts again from 0."""
        steps = self.steps
        self.steps = 0
        return steps
