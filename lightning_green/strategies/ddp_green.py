"""``Trainer(strategy="ddp_green")``: DDP that counts (and optionally compresses) gradient traffic and
borrows GPU power limits."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed
from lightning.fabric.strategies import _StrategyRegistry
from lightning.pytorch.overrides.distributed import _register_ddp_comm_hook
from lightning.pytorch.strategies.ddp import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch.nn.parallel.distributed import DistributedDataParallel
from torch.optim.optimizer import Optimizer
from typing_extensions import override

from lightning_green.checks import check_int
from lightning_green.errors import MisconfiguredTrainer
from lightning_green.log_queue import log_metrics
from lightning_green.strategies.comm import CommCompression, CommStats, build_comm_hook
from lightning_green.strategies.power_control import PowerControl
from lightning_green.strategies.power_limit import check_power_limit

log = logging.getLogger(__name__)

#: Names registered by :meth:`EnergyAwareDDPStrategy.register_strategies` and their start methods.
STRATEGY_NAMES = (("ddp_green", "popen"), ("ddp_green_spawn", "spawn"))


class EnergyAwareDDPStrategy(DDPStrategy):
    """Distributed data parallel training that knows what its communication and its power cost.

    * **Communication**: a DDP communication hook is registered on every device, CPU (gloo) included
      (Lightning's :class:`~lightning.pytorch.strategies.DDPStrategy` registers hooks on CUDA only). It
      optionally compresses gradients (``"fp16"``, ``"bf16"``, ``"powersgd"``, all torch's own hooks) and
      always counts what each rank sends: :attr:`comm_stats`.
    * **Power limits**: a fixed limit, or ``"search"`` for the limit with the best energy/time trade-off
      (see :mod:`lightning_green.strategies.power_limit`), applied to every rank's GPU. Limits are
      borrowed: the original is restored at teardown, on exceptions, on KeyboardInterrupt and on SIGTERM.
      Without permission to set limits the run warns once and goes on, monitoring only.
    * **Teardown** destroys the process group (gloo otherwise aborts at exit now and then), after a
      barrier unless the stage ended in an exception; the next ``fit``/``validate``/``test`` creates it
      again. Collectives of callbacks belong in ``on_train_end`` or earlier, not in ``teardown``.

    Nothing assumes one node: ranks come from Lightning's cluster environments (``num_nodes > 1``).

    **Logged metrics** (through ``trainer.loggers``, at the Trainer's ``log_every_n_steps``; step =
    optimizer steps done):

    * ``comm/bytes_per_step`` (bytes): what this rank sent in the last optimizer step.
    * ``comm/compression_ratio`` (1): uncompressed bytes / bytes sent, last step.
    * ``power/limit_w`` (W): the limit in force, each time it changes.

    Args:
        comm_compression: ``None``/``"none"``, ``"fp16"``, ``"bf16"`` or ``"powersgd"``.
        powersgd_rank: PowerSGD's matrix approximation rank (``>= 1``).
        powersgd_start_step: optimizer steps of plain all-reduce before PowerSGD starts (``>= 2``;
            torch's ``start_powerSGD_iter``). Longer warm-ups keep accuracy closer to uncompressed.
        power_limit: ``None`` (leave the device alone), a limit in watts, or ``"search"``.
        power_control: how limits are read and set: a :class:`PowerControl`, ``"nvml"`` or ``None`` (NVML).
        eta: weight of energy against time in the search's cost, in ``[0, 1]``.
        max_slowdown: if set (``>= 1``), the search picks the lowest-energy limit whose step time is within
            ``max_slowdown`` x the step time at the highest limit, instead of using ``eta``.
        warmup_steps: optimizer steps before the search profiles.
        profile_steps: optimizer steps measured per candidate limit.
        settle_steps: optimizer steps after every limit change that are not measured.
        limit_step_w: spacing of the candidate limits, from the highest down, in watts.
        power_limit_cache: where the search caches its profile, keyed by GPU model and world size:
            ``True`` for ``$XDG_CACHE_HOME/lightning_green/power_limits.json`` (``~/.cache/...``), a path,
            or ``False``/``None`` for no cache.
        **kwargs: everything :class:`~lightning.pytorch.strategies.DDPStrategy` takes (``start_method``,
            ``process_group_backend``, ``timeout``, DDP's own ``find_unused_parameters``, ``static_graph`` …).

    Raises:
        ValueError: an argument is out of range (the message names it and the allowed values); a fixed
            ``power_limit`` outside the device's bounds (in ``setup``).
        MisconfigurationException: ``power_limit="search"`` without a ``PowerSampler`` callback (in ``setup``),
            or a second PowerLimitSearch callback in the Trainer.

    Example::

        trainer = Trainer(accelerator="gpu", devices=8, strategy="ddp_green")
        trainer = Trainer(
            accelerator="gpu",
            devices=8,
            strategy=EnergyAwareDDPStrategy(comm_compression="powersgd", power_limit="search", max_slowdown=1.05),
            callbacks=[PowerSampler()],
        )
    """

    strategy_name = "ddp_green"

    def __init__(
        self,
        comm_compression: str | None = None,
        powersgd_rank: int = 2,
        powersgd_start_step: int = 10,
        power_limit: float | str | None = None,
        power_control: str | PowerControl | None = None,
        eta: float = 0.5,
        max_slowdown: float | None = None,
        warmup_steps: int = 10,
        profile_steps: int = 10,
        settle_steps: int = 2,
        limit_step_w: float = 25.0,
        power_limit_cache: str | bool | None = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.comm_compression = CommCompression.parse(comm_compression)
        self.powersgd_rank = check_int("powersgd_rank", powersgd_rank, 1)
        self.powersgd_start_step = check_int(
            "powersgd_start_step", powersgd_start_step, 2
        )  # PowerSGD's error feedback needs one plain step
        if self.comm_compression is not CommCompression.NONE and self._ddp_comm_hook is not None:
            raise ValueError(
                f"`comm_compression={self.comm_compression.value!r}` and `ddp_comm_hook` both set a communication hook:"
                " pass one of them"
            )
        self.power_limit = check_power_limit(power_limit)
        #: Bytes and exposed communication time of this rank (see :class:`CommStats`).
        self.comm_stats = CommStats()
        self._interrupted = False
        self._warned_barrier = False
        from lightning_green.callbacks.power_limit import PowerLimitSearch, check_search_args

        search_args = dict(
            power_control=power_control,
            eta=eta,
            max_slowdown=max_slowdown,
            warmup_steps=warmup_steps,
            profile_steps=profile_steps,
            settle_steps=settle_steps,
            limit_step_w=limit_step_w,
        )
        check_search_args(**search_args)  # also without a limit, so a typo fails before any limit is asked for
        # The PowerLimitSearch callback this shorthand installs (None without `power_limit`).
        self._power = (
            PowerLimitSearch(power_limit, **search_args, cache=power_limit_cache) if power_limit is not None else None
        )

    @property
    def power_control(self) -> PowerControl | None:
        """The control that sets limits (``None`` when ``power_limit`` is ``None``)."""
        return self._power.control if self._power is not None else None

    @property
    def power_limiter(self) -> Any | None:
        """The :class:`~lightning_green.callbacks.PowerLimitSearch` callback installed for
        ``power_limit`` (``.search.table`` holds the profile once the search is done)."""
        return self._power

    # ------------------------------------------------------------------------------ registry
    @classmethod
    @override
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        """Register ``"ddp_green"`` (launched like ``"ddp"``) and ``"ddp_green_spawn"``. Safe to call twice."""
        for name, start_method in STRATEGY_NAMES:
            if name in strategy_registry:
                continue
            strategy_registry.register(
                name,
                cls,
                description=f"Energy-aware DDP strategy with `start_method` '{start_method}'",
                start_method=start_method,
            )

    # ------------------------------------------------------------------------------ communication
    @override
    def _register_ddp_hooks(self) -> None:
        assert isinstance(self.model, DistributedDataParallel)
        if self._ddp_comm_hook is not None or self._ddp_comm_state is not None:
            # The user's own hook, on any device; its traffic is not counted.
            _register_ddp_comm_hook(
                model=self.model,
                ddp_comm_state=self._ddp_comm_state,
                ddp_comm_hook=self._ddp_comm_hook,
                ddp_comm_wrapper=self._ddp_comm_wrapper,
            )
            return
        state, hook = build_comm_hook(
            self.comm_compression,
            self.comm_stats,
            process_group=None,
            powersgd_rank=self.powersgd_rank,
            powersgd_start_step=self.powersgd_start_step,
            serialize_buckets=torch.distributed.get_backend() != "nccl",
        )
        self.model.register_comm_hook(state, hook)

    @override
    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: Any | None = None,
        **kwargs: Any,
    ) -> Any:
        output = super().optimizer_step(optimizer, closure, model, **kwargs)
        self._log_comm()
        return output

    def _log_comm(self) -> None:
        trainer = self._trainer()
        if trainer is None or self.comm_stats.steps == 0 or not trainer._logger_connector.should_update_logs:
            return
        stats = self.comm_stats
        metrics = {
            "comm/bytes_per_step": float(stats.bytes_sent_last_step),
            "comm/compression_ratio": stats.compression_ratio_last_step,
        }
        # The optimizer step is not counted yet: log it as done, like the metrics of on_train_batch_end.
        log_metrics(trainer, metrics, step=trainer.global_step + 1)

    # ------------------------------------------------------------------------------ power limits
    @override
    def setup_environment(self) -> None:
        self._interrupted = False
        super().setup_environment()
        trainer = self._trainer()
        if self._power is not None and trainer is not None:
            self._install_power_limit(trainer)

    def _install_power_limit(self, trainer: Any) -> None:
        """``power_limit=`` is shorthand for the PowerLimitSearch callback: add it (once)."""
        from lightning_green.callbacks.power_limit import PowerLimitSearch

        others = [cb for cb in trainer.callbacks if isinstance(cb, PowerLimitSearch) and cb is not self._power]
        if others:
            raise MisconfiguredTrainer(
                "`EnergyAwareDDPStrategy(power_limit=...)` installs a PowerLimitSearch callback, and the Trainer has"
                " another one: pass `power_limit` to one of them only"
            )
        if self._power not in trainer.callbacks:
            trainer.callbacks.append(self._power)

    @override
    def setup(self, trainer: Any) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            super().setup(trainer)
        else:
            with _not_broadcasting_tensor_subclasses(self.model):
                super().setup(trainer)
        from lightning_green.callbacks.power import find_power_sampler

        sampler = find_power_sampler(trainer)
        if sampler is not None:  # the comm phase of its energy-by-phase table
            sampler.set_comm_seconds(self.comm_stats.pop_exposed_comm_s)

    @override
    def on_exception(self, exception: BaseException) -> None:
        self._interrupted = True
        super().on_exception(exception)

    @override
    def teardown(self) -> None:
        try:
            super().teardown()
        finally:
            self._destroy_process_group()

    def _destroy_process_group(self) -> None:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        if not self._interrupted:
            # Shutting gloo down while a peer still talks to it aborts that process now and then: meet
            # first. Not after an exception: the other ranks may be stuck in another collective.
            try:
                self.barrier("ddp_green_teardown")
            except Exception as err:  # noqa: BLE001 - a peer gone: destroy anyway
                if not self._warned_barrier:
                    self._warned_barrier = True
                    log.warning(
                        "ddp_green: the barrier before destroying the process group failed (%r); destroyed anyway", err
                    )
        torch.distributed.destroy_process_group()

    def _trainer(self) -> Any:
        module = self.lightning_module
        return module._trainer if module is not None else None


@contextlib.contextmanager
def _not_broadcasting_tensor_subclasses(module: Any) -> Iterator[None]:
    """Outside fit, Lightning broadcasts rank 0's parameters and buffers to the other ranks; torch's
    broadcast cannot handle tensor subclasses such as torchao's quantized weights. Those are left out
    (every rank converted the same weights the same way); plain tensors are still synchronised."""
    if module is None:
        yield
        return
    names = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if _is_tensor_subclass(t)]
    if not names:
        yield
        return
    previous = getattr(module, "_ddp_params_and_buffers_to_ignore", None)
    module._ddp_params_and_buffers_to_ignore = list(previous or []) + names
    try:
        yield
    finally:
        if previous is None:
            del module._ddp_params_and_buffers_to_ignore
        else:
            module._ddp_params_and_buffers_to_ignore = previous


def _is_tensor_subclass(tensor: torch.Tensor) -> bool:
    data = tensor.data if isinstance(tensor, torch.nn.Parameter) else tensor
    return type(data) is not torch.Tensor
