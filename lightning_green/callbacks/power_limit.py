"""PowerLimitSearch: borrow GPU power limits during training, with any strategy.

Glue over the Trainer-free :class:`~lightning_green.strategies.power_limit.LimitSearch` (the schedule
and the choice), :class:`~lightning_green.strategies.power_control.PowerControl` (the device) and
:class:`~lightning_green.strategies.power_limit.PowerLimitCache`. Ranks agree through the strategy's
own collectives (``all_gather``, ``broadcast``) at setup and at window edges only, so it works under
single-device training, ``ddp``, ``ddp_green``, FSDP or DeepSpeed alike.
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
from lightning_green.strategies.power_control import (
    NvmlPowerControl,
    PowerControl,
    PowerControlError,
    PowerControlUnavailable,
)
from lightning_green.strategies.power_limit import (
    POWER_LIMIT_SEARCH,
    SUMMARY_TITLE,
    LimitProfile,
    LimitSearch,
    PowerLimitCache,
    check_eta,
    check_max_slowdown,
    check_power_limit,
    default_cache_path,
    limit_grid,
)
from lightning_green.strategies.sigterm import SigtermRestore

log = logging.getLogger("lightning_green")

NEVER = 1 << 62  # a step no run reaches


def make_control(power_control: Any) -> PowerControl:
    """``None``/``"nvml"`` (NVML) or a :class:`PowerControl`, else ``ValueError`` naming the argument."""
    if isinstance(power_control, PowerControl):
        return power_control
    if power_control is None or (isinstance(power_control, str) and power_control.lower() == "nvml"):
        return NvmlPowerControl()
    raise ValueError(f"`power_control` must be None, 'nvml' or a PowerControl instance, got {power_control!r}")


def check_search_args(
    power_control: Any,
    eta: Any,
    max_slowdown: Any,
    warmup_steps: Any,
    profile_steps: Any,
    settle_steps: Any,
    limit_step_w: Any,
) -> tuple[PowerControl, float, float | None, int, int, int, float]:
    """PowerLimitSearch's argument checks, in its argument order (``ValueError`` naming the argument).

    ``EnergyAwareDDPStrategy`` runs them even without a ``power_limit``, so a typo fails at once.
    """
    return (
        make_control(power_control),
        check_eta(eta),
        check_max_slowdown(max_slowdown),
        check_int("warmup_steps", warmup_steps, 0),
        check_int("profile_steps", profile_steps, 1),
        check_int("settle_steps", settle_steps, 0),
        check_number("limit_step_w", limit_step_w, 0.0, strict=True, unit="a number of watts"),
    )


class PowerLimitSearch(Callback):
    """Apply a fixed GPU power limit, or search for the limit with the best energy/time trade-off.

    The search profiles each candidate limit (from the device's highest down in ``limit_step_w``
    steps) for ``profile_steps`` optimizer steps, after ``warmup_steps`` at first and
    ``settle_steps`` after every limit change, sums the energy of every rank and takes the slowest
    rank's time, then applies the limit of lowest ``eta * E + (1 - eta) * P_max * T`` (or, with
    ``max_slowdown``, the lowest-energy limit within that slowdown). See
    :mod:`lightning_green.strategies.power_limit`. Limits are borrowed: the original is restored at
    teardown, on exceptions, on KeyboardInterrupt and on SIGTERM. Without permission the run warns
    once and goes on, monitoring only.

    Logged metrics: ``power/limit_w`` (W), the limit in force, each time it changes.

    Args:
        power_limit: a limit in watts, or ``"search"``.
        power_control: a :class:`PowerControl`, ``"nvml"`` or ``None`` (NVML).
        eta: weight of energy against time in the cost, in ``[0, 1]``.
        max_slowdown: ``None`` or ``>= 1``: choose by slowdown instead of cost.
        warmup_steps: optimizer steps before the first window (>= 0).
        profile_steps: optimizer steps measured per candidate (>= 1).
        settle_steps: optimizer steps after every limit change that are not measured (>= 0).
        limit_step_w: spacing of the candidates, in watts (> 0).
        cache: ``True`` (``$XDG_CACHE_HOME/lightning_green/power_limits.json``), a path, or
            ``False``/``None``: where the profile is cached by GPU model and world size.
        clock: the monotonic clock of the windows (tests inject one).

    Raises:
        ValueError: an argument out of range; in ``setup``, a fixed limit outside the device's bounds.
        MisconfigurationException: in ``setup``, ``"search"`` without a ``PowerSampler``.

    Example::

        trainer = Trainer(callbacks=[PowerSampler(), PowerLimitSearch("search", max_slowdown=1.05)])
    """

    def __init__(
        self,
        power_limit: float | str = POWER_LIMIT_SEARCH,
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
        if check_power_limit(power_limit) is None:
            raise ValueError(f"`power_limit` must be a number of watts > 0 or {POWER_LIMIT_SEARCH!r}, got None")
        self.power_limit = power_limit
        (
            self.control,
            self.eta,
            self.max_slowdown,
            self.warmup_steps,
            self.profile_steps,
            self.settle_steps,
            self.limit_step_w,
        ) = check_search_args(power_control, eta, max_slowdown, warmup_steps, profile_steps, settle_steps, limit_step_w)
        if not isinstance(cache, (str, bool)) and cache is not None:
            raise TypeError(f"`cache` must be True, False, None or a path, got {cache!r}")
        self.cache_path: str | None = default_cache_path() if cache is True else (cache or None)
        self.clock = clock or time.monotonic
        self.active = False  # False: monitoring only
        self.search: LimitSearch | None = None
        self.from_cache = False
        self._sampler: PowerSampler | None = None
        self._guard = SigtermRestore(self._on_sigterm)
        self._released = False  # set by SIGTERM or a refusing device: no limit is applied any more
        self._window: tuple[int, float, float] | None = None  # (step, time, energy) where measuring began
        self._next_check = 0  # the step of the next window edge: one compare per step until then
        self._warn = WarnOnce()

    @property
    def is_search(self) -> bool:
        return self.power_limit == POWER_LIMIT_SEARCH

    # ---------------------------------------------------------------- hooks
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self._setup(trainer)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.active:
            self._guard.install()
            if not self.is_search:
                self._apply(trainer, float(self.power_limit))
            elif self.search.done:
                self._finish(trainer, from_cache=True)

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self.active and trainer.global_step >= self._next_check:
            self._edge(trainer, trainer.global_step)
        self.control.on_step()

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        search = self.search
        if search is not None and not search.done and search.profiles and self._sampler is not None:
            rows = [
                dict(asdict(p), source="profiled (search incomplete: training ended first)") for p in search.profiles
            ]
            self._sampler.add_summary_section(SUMMARY_TITLE, rows)

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self.control.restore_quietly()

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.control.restore_quietly()
        self._guard.uninstall()
        self.control.close()

    # ---------------------------------------------------------------- internals
    def _setup(self, trainer: Trainer) -> None:
        """Checks that need the device and the Trainer; fails early with what to change."""
        self._sampler = find_power_sampler(trainer)
        if self.is_search and self._sampler is None:
            raise MisconfiguredTrainer(
                "`power_limit='search'` measures energy with a PowerSampler: add `lightning_green.PowerSampler(...)`"
                " to `Trainer(callbacks=[...])`, or pass a fixed `power_limit`."
            )
        self._window, self.search, self.from_cache, self.active, self._released, self._next_check = (
            None,
            None,
            False,
            False,
            False,
            0,
        )
        error, bounds = None, (float("nan"), float("nan"))
        try:
            self.control.attach(trainer.strategy.root_device)
            bounds = self.control.bounds_w()
            self.control.check_permission()
        except PowerControlError as err:
            error = str(err)
        rows = gather_floats(trainer, [0.0 if error else 1.0, bounds[0], bounds[1]])
        n_bad = sum(1 for r in rows if r[0] == 0.0)
        if n_bad:
            self._warn(
                "permission",
                f"Power limits are not applied, monitoring only: {n_bad} of {len(rows)} rank(s) cannot set them"
                + (f" (this rank: {error})" if error else "")
                + ". Setting limits needs root or CAP_SYS_ADMIN and a GPU that supports it.",
            )
            return
        lo, hi = max(r[1] for r in rows), min(r[2] for r in rows)  # bounds every rank accepts
        if not self.is_search:
            if not lo <= float(self.power_limit) <= hi:
                raise ValueError(
                    f"`power_limit={float(self.power_limit):g}` is outside the device's bounds: allowed values are {lo:g} to {hi:g} W (or None, or {POWER_LIMIT_SEARCH!r})"
                )
            self._next_check = NEVER  # nothing to do per step
        else:
            self.search = self._new_search(trainer, lo, hi)
            self._next_check = NEVER if self.search.done else 0
        self.active = True

    def _new_search(self, trainer: Trainer, lo: float, hi: float) -> LimitSearch:
        kwargs = dict(
            warmup_steps=self.warmup_steps,
            profile_steps=self.profile_steps,
            settle_steps=self.settle_steps,
            eta=self.eta,
            max_slowdown=self.max_slowdown,
            p_max_w=hi * trainer.world_size,
        )
        cached = [p for p in self._load_cache(trainer) or [] if lo - 1e-6 <= p.limit_w <= hi + 1e-6]
        self.from_cache = bool(cached)
        return (
            LimitSearch.from_profiles(cached, **kwargs)
            if cached
            else LimitSearch(limit_grid(lo, hi, self.limit_step_w), **kwargs)
        )

    def _cache_key(self, trainer: Trainer) -> str:
        return PowerLimitCache.key(self.control.device_name, trainer.world_size)

    def _load_cache(self, trainer: Trainer) -> list[LimitProfile] | None:
        if not self.cache_path:
            return None
        profiles = PowerLimitCache(self.cache_path).load(self._cache_key(trainer)) if trainer.global_rank == 0 else None
        return broadcast(trainer, profiles, src=0)

    def _edge(self, trainer: Trainer, step: int) -> None:
        """A window edge (every rank reaches it at the same step): close a window and change the
        limit; or, ``settle_steps`` later, start measuring."""
        search = self.search
        if search.due(step):
            if search.profiling_w is not None and self._window is not None:
                step0, t0, e0 = self._window
                rows = gather_floats(trainer, [self._sampler.energy_now_j() - e0, self.clock() - t0])
                search.record(sum(r[0] for r in rows), max(r[1] for r in rows), step - step0)
                self._window = None
            limit = search.start_next(step)
            if limit is None:
                self._next_check = NEVER
                self._finish(trainer, from_cache=False)
                return
            self._apply(trainer, limit)
        settling = search.profiling_w is not None and self._window is None
        if settling and step >= search.measure_from:
            self._window, settling = (step, self.clock(), self._sampler.energy_now_j()), False
        self._next_check = search.measure_from if settling else search.next_edge_step

    def _finish(self, trainer: Trainer, from_cache: bool) -> None:
        chosen = float(broadcast(trainer, self.search.chosen_w, src=0))  # identical on every rank
        if not from_cache and self.cache_path and trainer.global_rank == 0:
            try:
                PowerLimitCache(self.cache_path).store(
                    self._cache_key(trainer), self.search.profiles, eta=self.eta, max_slowdown=self.max_slowdown
                )
            except OSError as err:
                self._warn("cache", f"could not write the power-limit cache {self.cache_path}: {err}")
        self._apply(trainer, chosen)
        if self._sampler is not None:
            self._sampler.add_summary_section(
                SUMMARY_TITLE, [dict(r, source="cache" if self.from_cache else "profiled") for r in self.search.table]
            )
        log.info("power limit search chose %g W%s", chosen, " (from the cache)" if self.from_cache else "")

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

    def _on_sigterm(self) -> None:
        self._released = True
        self.control.restore_quietly()
