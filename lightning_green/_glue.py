"""The glue every callback shares: one way to log, one logging cadence, one set of argument checks,
one resume rule and one way to warn once.

Nothing here holds state of a run except :class:`LogCadence` and :class:`WarnOnce`; everything is
testable with plain calls.
"""

from __future__ import annotations

import collections
import functools
import math
import numbers
import os
import threading
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any


# ============================================================================ logging
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
        self._inline: list[Any] | None = None  # None: not started, the caller's loggers are written in place
        self._background: list[Any] = []
        self._items: collections.deque | None = None  # appended by the training thread, popped by the thread
        self._stop: threading.Event | None = None  # made at start: a callback holding one pickles for spawn
        self._thread: threading.Thread | None = None
        self._warn = WarnOnce()

    def start(self, loggers: Sequence[Any], background: bool = True) -> None:
        """Write ``loggers`` from now on; the thread-safe ones on a thread when ``background``."""
        self.stop()
        self._background = [lg for lg in loggers if background and self.thread_safe(lg)]
        self._inline = [lg for lg in loggers if lg not in self._background]
        if self._background:
            self._items, self._stop = collections.deque(), threading.Event()
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
            work(functools.partial(self.put, loggers=loggers))  # writes the started inline loggers, or ``loggers``

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
            items.clear()  # what is still queued is dropped: run later, its work would land in the next run
            self._warn(
                "stuck",
                f"{self.name}: a logger write did not return within {self.stop_timeout_s} s; the thread is left behind (a daemon) and what was queued is dropped",
                rank_zero=False,
            )


def global_step_reader(trainer: Any) -> Callable[[], int]:
    """``trainer.global_step`` for a per-batch hook, about 0.1 µs a read instead of 1.2: the fit
    loop's optimizer-step counter, read directly (what ``global_step`` returns, by Lightning's own
    ``_TrainingEpochLoop.global_step``). Call it once the fit loop is set up (``on_train_start``)."""
    loop = trainer.fit_loop.epoch_loop
    if trainer.lightning_module.automatic_optimization:
        tracker = loop.automatic_optimization.optim_progress.optimizer.step.total
    else:
        tracker = loop.manual_optimization.optim_step_progress.total
    return functools.partial(getattr, tracker, "completed")


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
        steps, self.steps = self.steps, 0
        return steps


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


def check_number(
    name: str, value: Any, low: float, *, strict: bool = False, high: float | None = None, unit: str = "a number"
) -> float:
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
    """What a user callable returned for ``name``, checked on use: a whole number >= 0, as an int, a
    float or a NumPy scalar (a tensor is refused: reading it may wait for the device)."""
    whole = isinstance(value, numbers.Integral) or (
        isinstance(value, numbers.Real) and math.isfinite(value) and float(value).is_integer()
    )
    if isinstance(value, bool) or not whole or value < 0:
        hint = "; for a tensor, return `.item()`" if type(value).__name__ == "Tensor" else ""
        raise TypeError(f"`{name}` must return a whole number >= 0 for each batch, but it returned {value!r}{hint}")
    return int(value)


# ============================================================================ resume
def state_for_rank(
    per_rank: Sequence[Mapping[str, Any]], world_size: int, rank: int, sum_keys: Iterable[str]
) -> dict | None:
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
