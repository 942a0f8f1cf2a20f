"""PowerLimitSearch: borrow GPU power limits during training, with any strategy.

Glue over the Trainer-free :mod:`lightning_green.power_limit`: :class:`~lightning_green.power_limit.LimitSearch`
(the schedule and the choice), :class:`~lightning_green.power_limit.PowerControl` (the device),
:class:`~lightning_green.power_limit.PowerLimitCache` and
:class:`~lightning_green.power_limit.SigtermRestore`. Ranks agree through the strategy's own collectives
(``all_gather``, ``broadcast``) at setup and at window edges only, so it works under single-device
training, ``ddp``, ``ddp_green``, FSDP or DeepSpeed alike.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

from lightning_green.callbacks.power import PowerSampler, find_power_sampler
from lightning_green.checks import check_int, check_number
from lightning_green.distributed import broadcast, gather_floats
from lightning_green.errors import MisconfiguredTrainer
from lightning_green.log_queue import log_metrics
from lightning_green.messages import WarnOnce
from lightning_green.power_limit import (
    LimitProfile,
    LimitSearch,
    PowerControl,
    PowerControlError,
    PowerControlUnavailable,
    PowerLimitCache,
    SigtermRestore,
    default_cache_path,
    limit_grid,
    make_power_control,
)
from lightning_green.power_limit.search import check_eta, check_max_slowdown
from lightning_green.run_summary import POWER_LIMIT, POWER_LIMIT_TITLE

log = logging.getLogger("lightning_green")

#: The ``power_limit`` that asks for a search instead of a fixed limit.
SEARCH = "search"
#: A step no run reaches.
NEVER = 1 << 62


def is_power_limit(value: Any) -> bool:
    """Whether ``value`` is a ``power_limit`` PowerLimitSearch takes: a number of watts > 0 or ``"search"``."""
    if value == SEARCH:
        return True
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def check_power_limit(power_limit: Any) -> float | str:
    """``power_limit`` as given, else ``ValueError`` naming the argument and the allowed values."""
    if not is_power_limit(power_limit):
        raise ValueError(f"`power_limit` must be a number of watts > 0 or {SEARCH!r}, got {power_limit!r}")
    return power_limit


def cache_path_of(cache: str | bool | None) -> str | None:
    """The file a ``cache`` argument names (``True``: :func:`~lightning_green.power_limit.default_cache_path`),
    or ``None`` for no cache; else ``TypeError`` naming the argument."""
    if not isinstance(cache, (str, bool)) and cache is not None:
        raise TypeError(f"`cache` must be True, False, None or a path, got {cache!r}")
    if cache is True:
        return default_cache_path()
    return cache or None


class PowerLimitSearch(Callback):
    """Apply a fixed GPU power limit, or search for the limit with the best energy/time trade-off.

    The search profiles each candidate limit (from the device's highest down in ``limit_step_w``
    steps) for ``profile_steps`` optimizer steps, after ``warmup_steps`` at first and
    ``settle_steps`` after every limit change, sums the energy of every rank and takes the slowest
    rank's time, then applies the limit of lowest ``eta * E + (1 - eta) * P_max * T`` (or, with
    ``max_slowdown``, the lowest-energy limit within that slowdown). See
    :mod:`lightning_green.power_limit.search`. Limits are borrowed: the original is restored at
    teardown, on exceptions, on KeyboardInterrupt and on SIGTERM. Without permission the run warns
    once and goes on, monitoring only. ``EnergyAwareDDPStrategy(power_limit=...)`` installs this
    callback.

    Logged metrics:

    * ``power/limit_w`` (W): the limit in force, each time it changes.

    The profile (or the part measured before training ended) is a section of the PowerSampler's summary,
    ``"Power limit search"``; :attr:`search` holds the :class:`~lightning_green.power_limit.LimitSearch`
    (``.table`` once it is done).

    Args:
        power_limit: a limit in watts, or ``"search"``.
        power_control: a :class:`~lightning_green.power_limit.PowerControl`, ``"nvml"`` or ``None`` (NVML).
        eta: weight of energy against time in the cost, in ``[0, 1]``.
        max_slowdown: ``None`` or ``>= 1``: choose the lowest-energy limit whose step time is within
            ``max_slowdown`` x the step time at the highest limit, instead of using ``eta``.
        warmup_steps: optimizer steps before the first window (>= 0).
        profile_steps: optimizer steps measured per candidate (>= 1).
        settle_steps: optimizer steps after every limit change that are not measured (>= 0).
        limit_step_w: spacing of the candidates, from the highest down, in watts (> 0).
        cache: where the profile is cached by GPU model and world size: ``True``
            (``$XDG_CACHE_HOME/lightning_green/power_limits.json``, ``~/.cache/...`` without the variable),
            a path, or ``False``/``None`` for no cache.
        clock: the monotonic clock of the windows (tests inject one).

    Raises:
        ValueError: an argument out of range; in ``setup``, a fixed limit outside the device's bounds.
        TypeError: ``cache`` is not a bool, ``None`` or a path.
        MisconfigurationException: in ``setup``, ``"search"`` without a ``PowerSampler``.

    Example::

        trainer = Trainer(callbacks=[PowerSampler(), PowerLimitSearch("search", max_slowdown=1.05)])
    """

    def __init__(
        self,
        power_limit: float | str = SEARCH,
        power_control: str | PowerControl | None = None,
        eta: float = 0.5,
        max_slowdown: float | None = None,
        warmup_steps: int = 10,
        profile_steps: int = 10,
        settle_steps: int = 2,
        limit_step_w: float = 25.0,
        cache: str | bool | None = True,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.power_limit = check_power_limit(power_limit)
        self.control = make_power_control(power_control)
        self.eta = check_eta(eta)
        self.max_slowdown = check_max_slowdown(max_slowdown)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, 0)
        self.profile_steps = check_int("profile_steps", profile_steps, 1)
        self.settle_steps = check_int("settle_steps", settle_steps, 0)
        self.limit_step_w = check_number("limit_step_w", limit_step_w, 0.0, strict=True, unit="a number of watts")
        self.cache_path = cache_path_of(cache)
        self.clock = clock or time.monotonic
        self._sampler: PowerSampler | None = None
        self._guard = SigtermRestore(self._on_sigterm)
        self._warn = WarnOnce()
        self._reset()

    @property
    def is_search(self) -> bool:
        """Whether this callback searches (``power_limit="search"``) rather than applying a fixed limit."""
        return self.power_limit == SEARCH

    # ---------------------------------------------------------------- hooks
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self._setup(trainer)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.active:
            self._start(trainer)

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self.active and trainer.global_step >= self._next_check:
            self._edge(trainer, trainer.global_step)
        self.control.on_step()

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._report_incomplete_search()

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self.control.restore_quietly()

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._give_back()

    # ---------------------------------------------------------------- internals
    def _reset(self) -> None:
        """The state of one ``fit``, before ``setup`` looks at the devices."""
        #: False: monitoring only (no permission, or not set up yet).
        self.active = False
        self.search: LimitSearch | None = None
        self.from_cache = False
        # Set by SIGTERM or a refusing device: no limit is applied any more.
        self._released = False
        # (step, time, energy) where the open window began measuring.
        self._window: tuple[int, float, float] | None = None
        # The step of the next window edge: one compare per step until then.
        self._next_check = 0

    def _setup(self, trainer: Trainer) -> None:
        """Checks that need the device and the Trainer; fails early with what to change."""
        self._sampler = find_power_sampler(trainer)
        if self.is_search and self._sampler is None:
            raise MisconfiguredTrainer(
                "`power_limit='search'` measures energy with a PowerSampler: add `lightning_green.PowerSampler(...)`"
                " to `Trainer(callbacks=[...])`, or pass a fixed `power_limit`."
            )
        self._reset()
        bounds = self._bounds_on_every_rank(trainer)
        if bounds is None:
            return
        lo, hi = bounds
        if self.is_search:
            self.search = self._new_search(trainer, lo, hi)
            self._next_check = NEVER if self.search.done else 0
        else:
            self._check_fixed_limit(lo, hi)
            # nothing to do per step
            self._next_check = NEVER
        self.active = True

    def _bounds_on_every_rank(self, trainer: Trainer) -> tuple[float, float] | None:
        """The limits every rank's device accepts, or ``None`` (warned once) when a rank cannot set limits."""
        error = None
        bounds = (float("nan"), float("nan"))
        try:
            self.control.attach(trainer.strategy.root_device)
            bounds = self.control.bounds_w()
            self.control.check_permission()
        except PowerControlError as err:
            error = str(err)
        rows = gather_floats(trainer, [0.0 if error else 1.0, bounds[0], bounds[1]])
        n_bad = sum(1 for r in rows if r[0] == 0.0)
        if n_bad:
            this_rank = f" (this rank: {error})" if error else ""
            self._warn(
                "permission",
                f"Power limits are not applied, monitoring only: {n_bad} of {len(rows)} rank(s) cannot set them"
                f"{this_rank}. Setting limits needs root or CAP_SYS_ADMIN and a GPU that supports it.",
            )
            return None
        return max(r[1] for r in rows), min(r[2] for r in rows)

    def _check_fixed_limit(self, lo: float, hi: float) -> None:
        limit_w = float(self.power_limit)
        if not lo <= limit_w <= hi:
            raise ValueError(
                f"`power_limit={limit_w:g}` is outside the device's bounds: allowed values are {lo:g} to {hi:g} W"
                f" (or {SEARCH!r})"
            )

    def _new_search(self, trainer: Trainer, lo: float, hi: float) -> LimitSearch:
        settings = {
            "warmup_steps": self.warmup_steps,
            "profile_steps": self.profile_steps,
            "settle_steps": self.settle_steps,
            "eta": self.eta,
            "max_slowdown": self.max_slowdown,
            "p_max_w": hi * trainer.world_size,
        }
        cached = [p for p in self._load_cache(trainer) or [] if lo - 1e-6 <= p.limit_w <= hi + 1e-6]
        self.from_cache = bool(cached)
        if cached:
            return LimitSearch.from_profiles(cached, **settings)
        return LimitSearch(limit_grid(lo, hi, self.limit_step_w), **settings)

    def _cache_key(self, trainer: Trainer) -> str:
        return PowerLimitCache.key(self.control.device_name, trainer.world_size)

    def _load_cache(self, trainer: Trainer) -> list[LimitProfile] | None:
        if not self.cache_path:
            return None
        profiles = None
        if trainer.global_rank == 0:
            profiles = PowerLimitCache(self.cache_path).load(self._cache_key(trainer))
        return broadcast(trainer, profiles, src=0)

    def _store_cache(self, trainer: Trainer) -> None:
        if not self.cache_path or trainer.global_rank != 0:
            return
        try:
            PowerLimitCache(self.cache_path).store(
                self._cache_key(trainer), self.search.profiles, eta=self.eta, max_slowdown=self.max_slowdown
            )
        except OSError as err:
            self._warn("cache", f"could not write the power-limit cache {self.cache_path}: {err}")

    def _start(self, trainer: Trainer) -> None:
        self._guard.install()
        if not self.is_search:
            self._apply(trainer, float(self.power_limit))
        elif self.search.done:
            self._finish(trainer, from_cache=True)

    def _edge(self, trainer: Trainer, step: int) -> None:
        """A window edge (every rank reaches it at the same step): close a window and change the
        limit; or, ``settle_steps`` later, start measuring."""
        search = self.search
        if search.due(step):
            self._close_window(trainer, step)
            limit = search.start_next(step)
            if limit is None:
                self._next_check = NEVER
                self._finish(trainer, from_cache=False)
                return
            self._apply(trainer, limit)
        settling = search.profiling_w is not None and self._window is None
        if settling and step >= search.measure_from:
            self._window = (step, self.clock(), self._sampler.energy_now_j())
            settling = False
        self._next_check = search.measure_from if settling else search.next_edge_step

    def _close_window(self, trainer: Trainer, step: int) -> None:
        """Record the window that closes at ``step``: energy summed over ranks, the slowest rank's time."""
        if self.search.profiling_w is None or self._window is None:
            return
        step0, t0, e0 = self._window
        rows = gather_floats(trainer, [self._sampler.energy_now_j() - e0, self.clock() - t0])
        self.search.record(sum(r[0] for r in rows), max(r[1] for r in rows), step - step0)
        self._window = None

    def _finish(self, trainer: Trainer, from_cache: bool) -> None:
        # identical on every rank
        chosen = float(broadcast(trainer, self.search.chosen_w, src=0))
        if not from_cache:
            self._store_cache(trainer)
        self._apply(trainer, chosen)
        if self._sampler is not None:
            source = "cache" if self.from_cache else "profiled"
            rows = [dict(r, source=source) for r in self.search.table]
            self._sampler.add_summary_section(POWER_LIMIT_TITLE, rows, section_id=POWER_LIMIT)
        log.info("power limit search chose %g W%s", chosen, " (from the cache)" if self.from_cache else "")

    def _report_incomplete_search(self) -> None:
        """Training ended before the search did: the summary still shows what was profiled."""
        search = self.search
        if search is None or search.done or not search.profiles or self._sampler is None:
            return
        source = "profiled (search incomplete: training ended first)"
        rows = [dict(asdict(p), source=source) for p in search.profiles]
        self._sampler.add_summary_section(POWER_LIMIT_TITLE, rows, section_id=POWER_LIMIT)

    def _apply(self, trainer: Trainer, limit_w: float) -> None:
        if self._released or not self.active:
            return
        try:
            self.control.set_limit_w(limit_w)
        except PowerControlUnavailable as err:
            # The window schedule goes on (its edges are collective); only the device is left alone.
            self._warn("refused", f"Power limits are not applied any more, monitoring only: {err}", rank_zero=False)
            self._released = True
            return
        log_metrics(trainer, {"power/limit_w": float(limit_w)})

    def _give_back(self) -> None:
        """Restore the original limit, stop handling SIGTERM, release the device."""
        self.control.restore_quietly()
        self._guard.uninstall()
        self.control.close()

    def _on_sigterm(self) -> None:
        self._released = True
        self.control.restore_quietly()
