"""``StructuredPruning``: remove structure during ``fit`` on a schedule; the layers get smaller.

The callback is glue over :class:`~lightning_green.pruning.StructuredPruner` (groups, importance,
shrink). It finds the groups on the first training batch (a trace of one forward pass), prunes at
the end of the batches whose optimizer step reaches an event's step, hands the optimizers' new
Parameters and cut state over, and reshapes a model to a checkpoint's shapes before its weights
load (a ``load_state_dict`` pre-hook), so a fresh, unpruned model with this callback loads a pruned
checkpoint in ``test/validate/predict/fit(ckpt_path=...)``.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable
from functools import partial
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from typing_extensions import override

from lightning_green import run_summary as rs
from lightning_green.callbacks.power import PowerSampler, find_power_sampler
from lightning_green.checks import check_int, check_name, is_finite_number
from lightning_green.energy.generation import first_tensor
from lightning_green.errors import MisconfiguredTrainer
from lightning_green.log_queue import log_metrics
from lightning_green.messages import WarnOnce
from lightning_green.pruning import StructuredPruner, default_forward, reshape_to_state_dict
from lightning_green.pruning.groups import FilterFn, ForwardFn
from lightning_green.pruning.report import size_figures, summary_rows
from lightning_green.pruning.step_energy import PruningEnergy


def event_steps(start_step: int, end_step: int, events: int) -> list[int]:
    """The optimizer steps of ``events`` events spread evenly from ``start_step`` to ``end_step``."""
    if events == 1:
        return [end_step]
    span = end_step - start_step
    return [start_step + round(i * span / (events - 1)) for i in range(events)]


class StructuredPruning(Callback):
    r"""Prune structure physically during ``fit``: fewer parameters, cheaper steps and tokens after it.

    ``mode="width"`` removes MLP hidden units (``Linear -> activation -> Linear``, gated LLaMA MLPs)
    and attention query groups (LitGPT's fused ``qkv``), the same share in every block, keeping
    LitGPT's config fields (``n_head``, ``n_query_groups``, ``intermediate_size``) consistent so that
    KV-cache generation works. ``mode="depth"`` removes whole blocks, those whose output is most like
    their input (``1 - cos``) on held-out batches (the first validation dataloader). Embeddings and the
    output head are never pruned. After an event, training goes on: the optimizers hold the new
    Parameters, with Adam's moments and SGD's momentum cut to the kept units. Under DDP (``ddp``,
    ``ddp_green``) the scores are summed over processes at each event, so every process removes the
    same units, and the ``DistributedDataParallel`` wrapper is rebuilt with its communication hooks.

    **Logged metrics** (at each event, through ``trainer.loggers``):

    - ``<prefix>/params``, ``<prefix>/params_mlp``, ``<prefix>/params_heads``, ``<prefix>/params_blocks``: count
    - ``<prefix>/params_ratio``: parameters now / before the first event
    - ``<prefix>/flops_per_token``: analytic FLOPs of the matrix products per token; ``<prefix>/flops_ratio``
    - ``<prefix>/fraction``: share of the prunable parameters the schedule has removed so far
    - ``<prefix>/event_s``: seconds the event took (graph trace included on the first)
    - at the end of fit, with a ``PowerSampler``: ``<prefix>/forward_j_per_token_before`` and ``_after`` (J),
      ``<prefix>/forward_s_per_token_before`` and ``_after`` (s), one forward pass of the first batch
    - at the end of fit, when ``monitor`` was logged: ``<prefix>/val_loss_before``,
      ``<prefix>/val_loss_after_last_event``, ``<prefix>/val_loss_end``
    - at the end of fit, with a measuring ``PowerSampler``: ``<prefix>/train_j_per_step_before`` (J),
      training J per optimizer step over the ``window_steps`` steps just before the first event (none
      when the first event is at step 1 or earlier, or the fit resumed after it), and
      ``<prefix>/train_j_per_step_after`` (J), over the last ``window_steps`` steps of fit (after the
      last event)
    - at the end of fit, with a measuring ``PowerSampler``: ``<prefix>/eer_j_per_initial_param`` and
      ``<prefix>/eer_j_per_final_param`` (J/parameter), the two EERs of a pruned model (below)

    **Training energy and EER of a pruned model.** Training energy is this process's energy (its
    ``PowerSampler``'s sensors, ``measured_now_j``) from the start of training to the end of fit,
    less the validation loops of fit and the blocks measured with ``measure_evaluation`` (this
    callback's forward passes, QAT's evaluation); a resumed fit adds the training energy recorded in
    the checkpoint. It is EfficiencyLogger's ``train_energy_j`` for one process. EER (energy per
    parameter) has two readings once parameters are removed: training energy / parameters before the
    first event (``eer_j_per_initial_param``: what training the model you started from cost per
    parameter) and / parameters after the last event (``eer_j_per_final_param``: what each parameter
    you keep cost). EfficiencyLogger's ``efficiency/eer_j_per_param`` divides by the parameters at the
    time it logs, so it moves from the first to the second during the schedule.

    Args:
        amount: share of the prunable parameters removed by the last event, in (0, 1).
        start_step: optimizer step of the first event.
        end_step: optimizer step of the last event (default: ``start_step``).
        events: number of events from ``start_step`` to ``end_step``.
        mode: ``"width"`` or ``"depth"``.
        importance: ``"magnitude"`` (squared weights) or ``"taylor"`` (``|w * grad|`` summed over the
            optimizer steps since the last event).
        round_to: MLP widths stay a multiple of this (at least ``round_to`` units stay).
        filter_fn: ``filter_fn(module, name) -> bool``; a group is pruned only when it keeps all its layers.
        forward_fn: ``forward_fn(pl_module, batch)`` runs the model on a batch (default: on the batch, or
            its first element).
        held_out_batches: validation batches that rank the blocks in depth mode.
        window_steps: optimizer steps in each window of ``train_j_per_step_before`` and ``_after``.
        monitor: the logged validation loss the report reads before the first event, at the first
            validation after the last event, and at the end.
        prefix: first part of every metric key.

    Raises:
        ValueError: a bad argument (at construction); a model with nothing prunable in ``mode`` (on the
            first training batch, before any step).
        MisconfiguredTrainer: in :meth:`setup`, more than one process under a strategy that is not DDP.

    Example::

        pruning = StructuredPruning(amount=0.3, start_step=100, end_step=400, events=4)
        trainer = Trainer(max_steps=1000, callbacks=[PowerSampler(), pruning])
        trainer.fit(model, datamodule=dm)
        print(pruning.report)
    """

    def __init__(
        self,
        amount: float = 0.3,
        start_step: int = 0,
        end_step: int | None = None,
        events: int = 1,
        mode: str = "width",
        importance: str = "magnitude",
        round_to: int = 8,
        filter_fn: FilterFn | None = None,
        forward_fn: ForwardFn = default_forward,
        held_out_batches: int = 4,
        window_steps: int = 10,
        monitor: str = "val_loss",
        prefix: str = "prune",
    ) -> None:
        if not (is_finite_number(amount) and 0.0 < amount < 1.0):
            raise ValueError(f"`amount` must be a share in (0, 1), got {amount!r}")
        self.amount = float(amount)
        self.start_step = check_int("start_step", start_step, 0)
        end_step = start_step if end_step is None else end_step
        self.end_step = check_int("end_step", end_step, 0)
        if self.end_step < self.start_step:
            raise ValueError(f"`end_step` ({end_step}) must be >= `start_step` ({start_step})")
        self.events = check_int("events", events, 1)
        self.held_out_batches = check_int("held_out_batches", held_out_batches, 1)
        self.window_steps = check_int("window_steps", window_steps, 1)
        self.monitor = check_name("monitor", monitor)
        self.prefix = check_name("prefix", prefix)
        self.pruner = StructuredPruner(mode, importance, round_to, filter_fn, forward_fn)
        self.steps = event_steps(self.start_step, self.end_step, self.events)
        #: Figures of the last fit (the logged keys without the prefix): sizes, FLOPs, J and s per token, losses.
        self.report: dict[str, Any] = {}
        self._events_done = 0
        self._hook: Any = None
        self._taylor_params: list[nn.Parameter] = []
        self._example: Any = None
        self._warn = WarnOnce()
        self._energy = PruningEnergy(self.window_steps)

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._setup(trainer, pl_module)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start_energy(trainer)

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._discover(trainer, pl_module, batch)

    @override
    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._accumulate_taylor()

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._prune(trainer, pl_module, batch)
        if trainer.global_step >= self._energy.next_step:
            self._energy.at_step(trainer.global_step)

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._energy.validation_started()

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._energy.validation_ended()
        self._after_validation(trainer)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._finish(trainer, pl_module)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    @override
    def state_dict(self) -> dict[str, Any]:
        state = {"events_done": self._events_done, "steps": self.steps, "pruner": self.pruner.state_dict()}
        if self._energy.active:
            state["train_energy_j"] = self._energy.energy_j()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._events_done = int(state_dict.get("events_done", 0))
        self._energy.training.restored_j = float(state_dict.get("train_energy_j", 0.0))
        if state_dict.get("steps") != self.steps:
            rank_zero_warn(
                f"StructuredPruning: the checkpoint's schedule was {state_dict.get('steps')}; this callback's is"
                f" {self.steps}. {self._events_done} event(s) are counted as done."
            )
        if "pruner" in state_dict and state_dict["pruner"].get("params_before"):
            self.pruner.load_state_dict(state_dict["pruner"])

    def _setup(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.world_size > 1 and not isinstance(trainer.strategy, DDPStrategy):
            raise MisconfiguredTrainer(
                f"StructuredPruning supports one process or DDP (`ddp`, `ddp_green`); this Trainer runs"
                f" {type(trainer.strategy).__name__} with world_size={trainer.world_size}."
            )
        if self._hook is None:
            self._hook = pl_module.register_load_state_dict_pre_hook(self._before_load)

    def _before_load(self, module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        changed = reshape_to_state_dict(module, state_dict, prefix)
        if changed:
            rank_zero_warn(f"StructuredPruning: {len(changed)} layer(s) took the checkpoint's shapes before loading.")
        self._taylor_params = self.pruner.prunable_parameters(module) if self.pruner.discovered else []

    def _discover(self, trainer: Trainer, pl_module: LightningModule, batch: Any) -> None:
        if self.pruner.discovered:
            return
        start = time.perf_counter()
        self.pruner.discover(pl_module, batch)
        self.report["discover_s"] = time.perf_counter() - start
        self._example = batch
        self._taylor_params = self.pruner.prunable_parameters(pl_module)
        self._say_notes()
        sampler = find_power_sampler(trainer)
        if sampler is not None and self._events_done == 0:
            self._measure_forward(sampler, pl_module, "before")

    def _start_energy(self, trainer: Trainer) -> None:
        sampler = find_power_sampler(trainer)
        reader = sampler if sampler is not None and sampler.measuring else None
        self._energy.start(reader, self.steps, float(trainer.estimated_stepping_batches), trainer.global_step)

    def _accumulate_taylor(self) -> None:
        if self.pruner.taylor is not None and self._events_done < self.events:
            self.pruner.taylor.accumulate(self._taylor_params)

    def _prune(self, trainer: Trainer, pl_module: LightningModule, batch: Any) -> None:
        """After the optimizer step: prune when the step reached the next event's (catching up at once)."""
        due = sum(step <= trainer.global_step for step in self.steps)
        if due <= self._events_done or not self.pruner.discovered:
            return
        if not self.pruner.events:
            self._note_val_loss(trainer, "val_loss_before")
            self._energy.first_event(trainer.global_step)
        fraction = self.amount * due / self.events
        held_out = self._held_out(trainer, pl_module, batch) if self.pruner.mode == "depth" else ()
        reduce = partial(trainer.strategy.reduce, reduce_op="sum") if trainer.world_size > 1 else None
        event = self.pruner.prune_to(pl_module, fraction, trainer.optimizers, held_out, reduce)
        self._events_done = due
        rewrap_ddp(trainer)
        self._taylor_params = self.pruner.prunable_parameters(pl_module)
        self._say_notes()
        figures = size_figures(self.pruner, pl_module) | {"fraction": fraction, "event_s": event.seconds}
        self.report.update(figures)
        self.report["events"] = [{"fraction": e.fraction, "seconds": e.seconds} for e in self.pruner.events]
        self._log(trainer, figures)

    def _held_out(self, trainer: Trainer, pl_module: LightningModule, batch: Any) -> Iterable[Any]:
        loaders = trainer.val_dataloaders
        loader = loaders[0] if isinstance(loaders, (list, tuple)) and loaders else loaders
        if loader is None:
            self._warn(
                "no_held_out", "StructuredPruning: no validation batches yet; blocks are ranked on the training batch."
            )
            return [batch]
        batches = itertools.islice(iter(loader), self.held_out_batches)
        return (pl_module.transfer_batch_to_device(b, pl_module.device, 0) for b in batches)

    def _measure_forward(self, sampler: PowerSampler, pl_module: LightningModule, when: str) -> None:
        tokens = first_tensor(self._example).numel()
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad(), sampler.measure_evaluation() as measured:
                self.pruner.forward_fn(pl_module, self._example)
        finally:
            pl_module.train(was_training)
        self.report[f"forward_j_per_token_{when}"] = measured.energy_j / tokens
        self.report[f"forward_s_per_token_{when}"] = measured.duration_s / tokens
        self.report["energy_source"] = "+".join(measured.sources)

    def _say_notes(self) -> None:
        for note in self.pruner.notes:
            self._warn(note, f"StructuredPruning: {note}")

    def _note_val_loss(self, trainer: Trainer, key: str) -> None:
        value = trainer.callback_metrics.get(self.monitor)
        if value is not None:
            self.report[key] = float(value)

    def _after_validation(self, trainer: Trainer) -> None:
        done = self.pruner.events and self._events_done == self.events
        if done and "val_loss_after_last_event" not in self.report and not trainer.sanity_checking:
            self._note_val_loss(trainer, "val_loss_after_last_event")

    def _log(self, trainer: Trainer, figures: dict[str, float]) -> None:
        if trainer.is_global_zero:
            log_metrics(trainer, {f"{self.prefix}/{k}": v for k, v in figures.items()})

    def _finish(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.pruner.discovered or not self.pruner.events:
            return
        self._note_val_loss(trainer, "val_loss_end")
        params_after = self.pruner.parameter_counts(pl_module)["total"]
        self.report.update(self._energy.finish(self.pruner.params_before["total"], params_after))
        sampler = find_power_sampler(trainer)
        if sampler is not None and self._example is not None:
            self._measure_forward(sampler, pl_module, "after")
        keys = [k for k in self.report if k.startswith(END_OF_FIT_KEYS)]
        self._log(trainer, {k: self.report[k] for k in keys})
        if sampler is not None:
            rows = summary_rows(self.pruner, pl_module, self.report)
            sampler.add_summary_section(
                f"{rs.SECTION_TITLES[rs.PRUNING]} ({self.pruner.mode})",
                rows,
                section_id=rs.PRUNING,
                fields={"mode": self.pruner.mode},
            )


#: Report keys logged at the end of fit (by their start).
END_OF_FIT_KEYS = ("forward_", "val_loss_", "train_j_per_step_", "eer_")


def rewrap_ddp(trainer: Trainer) -> None:
    """Wrap the LightningModule in a new ``DistributedDataParallel`` (its buckets and gradient hooks
    were made for the old Parameters), with the strategy's communication hooks registered again."""
    strategy = trainer.strategy
    if isinstance(strategy, DDPStrategy) and isinstance(strategy.model, DistributedDataParallel):
        strategy.model = trainer.lightning_module
        strategy.configure_ddp()


__all__ = ["StructuredPruning", "event_steps", "rewrap_ddp"]
