"""The strategy names this package registers with Lightning, and the factory behind them.

``import lightning_green`` registers ``"ddp_green"`` and ``"ddp_green_spawn"`` with :func:`make_ddp_green`
as their factory, so the strategy's module (communication hooks, power limits, the callbacks it
installs) loads when a Trainer asks for the strategy, not at import: Lightning's
``StrategyRegistry.get(name)`` calls the factory with the registered arguments.
"""

from __future__ import annotations

import importlib
from typing import Any

#: Registered names and the ``start_method`` each passes to the strategy.
STRATEGY_NAMES = (("ddp_green", "popen"), ("ddp_green_spawn", "spawn"))


def make_ddp_green(**init_params: Any) -> Any:
    """A new :class:`~lightning_green.strategies.ddp_green.EnergyAwareDDPStrategy` (its module loads on
    the first call: this is the start-up cost that registering by name defers)."""
    module = importlib.import_module("lightning_green.strategies.ddp_green")
    return module.EnergyAwareDDPStrategy(**init_params)


def register_strategy_names(registry: Any, factory: Any = make_ddp_green) -> None:
    """Register every name of :data:`STRATEGY_NAMES` in ``registry`` (Lightning's ``StrategyRegistry``),
    built by ``factory``; a name already there is left as it is, so a second call does nothing."""
    for name, start_method in STRATEGY_NAMES:
        if name in registry:
            continue
        registry.register(
            name,
            factory,
            description=f"Energy-aware DDP strategy with `start_method` '{start_method}'",
            start_method=start_method,
        )
