"""``Trainer(strategy="ddp_green")``: DDP that counts (and optionally compresses) gradient traffic and
borrows GPU power limits."""

from __future__ import annotations

import contextlib
import logging
import warnings
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

from lightning_green.callbacks.power import find_power_sampler
from lightning_green.callbacks.power_limit import SEARCH, PowerLimitSearch, is_power_limit
from lightning_green.checks import check_int
from lightning_green.errors import MisconfiguredTrainer
from lightning_green.log_queue import log_metrics
from lightning_green.power_limit import PowerControl
from lightning_green.strategies.comm import CommCompression, CommStats, build_comm_hook
from lightning_green.strategy_names import register_strategy_names

log = logging.getLogger(__name__)

#: The search arguments the strategy took before ``power_limit=PowerLimitSearch(...)``, each as the
#: PowerLimitSearch argument it becomes; accepted with a DeprecationWarning until the next release.
DEPRECATED_SEARCH_ARGUMENTS = {
    "power_control": "power_control",
    "eta": "eta",
    "max_slowdown": "max_slowdown",
    "warmup_steps": "warmup_steps",
    "profile_steps": "profile_steps",
    "settle_steps": "settle_steps",
    "limit_step_w": "limit_step_w",
    "power_limit_cache": "cache",
}


class EnergyAwareDDPStrategy(DDPStrategy):
    """Distributed data parallel training that knows what its communication and its power cost.

    * **Communication**: a DDP communication hook is registered on every device, CPU (gloo) included
      (Lightning's :class:`~lightning.pytorch.strategies.DDPStrategy` registers hooks on CUDA only). It
      optionally compresses gradients (``"fp16"``, ``"bf16"``, ``"powersgd"``, all torch's own hooks) and
      always counts what each rank sends: :attr:`comm_stats`.
    * **Power limits**: ``power_limit=`` installs a :class:`~lightning_green.callbacks.PowerLimitSearch`
      callback (a fixed limit, or a search for the limit with the best energy/time trade-off, applied to
      every rank's GPU and restored on every exit path); see that callback for what it does.
    * **Teardown** destroys the process group (gloo otherwise aborts at exit now and then), after a
      barrier unless the stage ended in an exception; the next ``fit``/``validate``/``test`` creates it
      again. Collectives of callbacks belong in ``on_train_end`` or earlier, not in ``teardown``.

    Nothing assumes one node: ranks come from Lightning's cluster environments (``num_nodes > 1``).

    **Logged metrics** (through ``trainer.loggers``, at the Trainer's ``log_every_n_steps``; step =
    optimizer steps done):

    * ``comm/bytes_per_step`` (bytes): what this rank sent in the last optimizer step.
    * ``comm/compression_ratio`` (1): uncompressed bytes / bytes sent, last step.
    * ``power/limit_w`` (W): the limit in force, each time it changes (by the PowerLimitSearch callback).

    Args:
        comm_compression: ``None``/``"none"``, ``"fp16"``, ``"bf16"`` or ``"powersgd"``.
        powersgd_rank: PowerSGD's matrix approximation rank (``>= 1``).
        powersgd_start_step: optimizer steps of plain all-reduce before PowerSGD starts (``>= 2``;
            torch's ``start_powerSGD_iter``). Longer warm-ups keep accuracy closer to uncompressed.
        power_limit: ``None`` (leave the device alone), a :class:`~lightning_green.callbacks.PowerLimitSearch`
            to install, or the shorthand for ``PowerLimitSearch(power_limit)`` with its defaults: a limit
            in watts, or ``"search"``. The search's settings (``power_control``, ``eta``, ``max_slowdown``,
            ``warmup_steps``, ``profile_steps``, ``settle_steps``, ``limit_step_w``, ``cache``) are
            PowerLimitSearch's arguments, documented there. Passing them to the strategy (with
            ``power_limit_cache`` for ``cache``) still works until the next release, with a
            DeprecationWarning.
        **kwargs: everything :class:`~lightning.pytorch.strategies.DDPStrategy` takes (``start_method``,
            ``process_group_backend``, ``timeout``, DDP's own ``find_unused_parameters``, ``static_graph`` …).

    Raises:
        ValueError: an argument is out of range (the message names it and the allowed values); the
            PowerLimitSearch's own errors (see there).
        MisconfigurationException: a second PowerLimitSearch callback in the Trainer besides the one
            ``power_limit`` installs.

    Example::

        trainer = Trainer(accelerator="gpu", devices=8, strategy="ddp_green")
        trainer = Trainer(
            accelerator="gpu",
            devices=8,
            strategy=EnergyAwareDDPStrategy(
                comm_compression="powersgd", power_limit=PowerLimitSearch("search", max_slowdown=1.05)
            ),
            callbacks=[PowerSampler()],
        )
    """

    strategy_name = "ddp_green"

    def __init__(
        self,
        comm_compression: str | None = None,
        powersgd_rank: int = 2,
        powersgd_start_step: int = 10,
        power_limit: float | str | PowerLimitSearch | None = None,
        **kwargs: Any,
    ) -> None:
        given = [name for name in DEPRECATED_SEARCH_ARGUMENTS if name in kwargs]
        search_arguments = {DEPRECATED_SEARCH_ARGUMENTS[name]: kwargs.pop(name) for name in given}
        super().__init__(**kwargs)
        self.comm_compression = CommCompression.parse(comm_compression)
        self.powersgd_rank = check_int("powersgd_rank", powersgd_rank, 1)
        # PowerSGD's error feedback needs one plain step
        self.powersgd_start_step = check_int("powersgd_start_step", powersgd_start_step, 2)
        if self.comm_compression is not CommCompression.NONE and self._ddp_comm_hook is not None:
            raise ValueError(
                f"`comm_compression={self.comm_compression.value!r}` and `ddp_comm_hook` both set a communication hook:"
                " pass one of them"
            )
        # The callback that `power_limit` installs (None without one).
        self._power_limit_search = power_limit_search_of(power_limit, search_arguments)
        #: Bytes and exposed communication time of this rank (see :class:`CommStats`).
        self.comm_stats = CommStats()
        self._interrupted = False
        self._warned_barrier = False

    @property
    def power_limit_search(self) -> PowerLimitSearch | None:
        """The :class:`~lightning_green.callbacks.PowerLimitSearch` callback that ``power_limit`` installs
        (``None`` without ``power_limit``; ``.search.table`` holds the profile once the search is done)."""
        return self._power_limit_search

    @property
    def power_limiter(self) -> PowerLimitSearch | None:
        """Deprecated name of :attr:`power_limit_search` (until the next release)."""
        warnings.warn(
            "`EnergyAwareDDPStrategy.power_limiter` is renamed `power_limit_search`", DeprecationWarning, stacklevel=2
        )
        return self._power_limit_search

    @property
    def power_control(self) -> PowerControl | None:
        """The control that sets limits (``None`` without ``power_limit``): ``power_limit_search.control``."""
        if self._power_limit_search is None:
            return None
        return self._power_limit_search.control

    # ------------------------------------------------------------------------------ registry
    @classmethod
    @override
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        """Register ``"ddp_green"`` (launched like ``"ddp"``) and ``"ddp_green_spawn"``. Safe to call twice.
        ``import lightning_green`` has registered them already, with a factory that loads this module
        on first use (:mod:`lightning_green.strategy_names`)."""
        register_strategy_names(strategy_registry, cls)

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
        if self._power_limit_search is not None and trainer is not None:
            self._install_power_limit_search(trainer)

    def _install_power_limit_search(self, trainer: Any) -> None:
        """Add the PowerLimitSearch callback of ``power_limit`` to the Trainer (once)."""
        search = self._power_limit_search
        others = [cb for cb in trainer.callbacks if isinstance(cb, PowerLimitSearch) and cb is not search]
        if others:
            raise MisconfiguredTrainer(
                "`EnergyAwareDDPStrategy(power_limit=...)` installs a PowerLimitSearch callback, and the Trainer has"
                " another one: pass `power_limit` to one of them only"
            )
        if search not in trainer.callbacks:
            trainer.callbacks.append(search)

    @override
    def setup(self, trainer: Any) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            super().setup(trainer)
        else:
            with _not_broadcasting_tensor_subclasses(self.model):
                super().setup(trainer)
        sampler = find_power_sampler(trainer)
        if sampler is not None:
            # the comm phase of its energy-by-phase table
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


def power_limit_search_of(power_limit: Any, search_arguments: dict[str, Any]) -> PowerLimitSearch | None:
    """The PowerLimitSearch a strategy's ``power_limit`` stands for (``None`` for none).

    ``search_arguments``: PowerLimitSearch arguments given to the strategy the deprecated way; they are
    checked also without a ``power_limit``, as before, so a typo fails at once.

    Raises:
        ValueError: ``power_limit`` is none of the allowed forms, or comes with its own settings twice.
    """
    if isinstance(power_limit, PowerLimitSearch):
        if search_arguments:
            raise ValueError(
                f"`power_limit` is a PowerLimitSearch: pass {sorted(search_arguments)} to it, not to the strategy"
            )
        return power_limit
    if power_limit is not None and not is_power_limit(power_limit):
        raise ValueError(
            f"`power_limit` must be None, a number of watts > 0, {SEARCH!r} or a PowerLimitSearch, got {power_limit!r}"
        )
    if search_arguments:
        old_names = sorted(name for name, new in DEPRECATED_SEARCH_ARGUMENTS.items() if new in search_arguments)
        warnings.warn(
            f"EnergyAwareDDPStrategy({', '.join(old_names)}) is deprecated and will be removed in the next release:"
            " pass `power_limit=PowerLimitSearch(power_limit, ...)` with these settings (`power_limit_cache` is"
            " its `cache`)",
            DeprecationWarning,
            stacklevel=3,
        )
    if power_limit is None:
        if search_arguments:
            # Checked, then unused: there is no limit to apply.
            PowerLimitSearch(SEARCH, **search_arguments)
        return None
    return PowerLimitSearch(power_limit, **search_arguments)


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
