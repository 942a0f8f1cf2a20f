"""The training figures of an :class:`~lightning_green.callbacks.efficiency.EfficiencyLogger`: a fit's
EER and per-joule rates at the PowerSampler's log steps, its energy targets, how it ended, and what a
checkpoint keeps of them. The arithmetic is :class:`~lightning_green.energy.efficiency.TrainingEnergy`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_green.callbacks.batch_counts import BatchCounter
from lightning_green.callbacks.sampler_interface import SamplerInterface
from lightning_green.distributed import distributed, gather_objects, reduce_sum
from lightning_green.energy import metrics as M
from lightning_green.energy.efficiency import TrainingEnergy
from lightning_green.energy.session import Reduce
from lightning_green.log_queue import log_metrics
from lightning_green.resume import state_for_rank

__all__ = ["FitFigures", "FitStop", "FitTargets"]


class FitStop(NamedTuple):
    """How a fit stopped before the end of training (an exception, Ctrl+C, SIGTERM)."""

    #: the step it stopped at
    step: int
    #: whose energy its figures hold: ``"all processes"`` (one process), or ``"this process"``
    #: (several: a stop leaves no collective to sum them)
    scope: str


class FitTargets:
    """The energy targets of a fit, for :class:`EfficiencyLogger`: watched from the fit's start,
    settled with the sums of its log steps, validation loops and train end, kept in checkpoints.

    Args:
        spec: the parsed targets (:func:`~lightning_green.energy.metrics.parse_targets`), or None: no
            targets, and every method does nothing.
    """

    def __init__(self, spec: dict | None) -> None:
        self.spec = spec
        #: the targets of the current (or last) fit
        self.targets: M.EnergyTargets | None = None
        self.watch: M.TargetWatch | None = None

    def start(self, energy_now_j: Callable[[], float], clock: Callable[[], float]) -> None:
        """A fit starts: its energy so far is ``energy_now_j()``, its time ``clock()``."""
        if self.spec is None:
            return
        self.targets = M.EnergyTargets(self.spec)
        self.watch = M.TargetWatch(self.targets, energy_now_j, clock)

    def part(self, trainer: Trainer) -> list[float]:
        """What the targets add to a reduce: nothing without targets."""
        return self.watch.part(lambda: trainer.callback_metrics) if self.watch is not None else []

    def settle(self, trainer: Trainer, summed: list[float]) -> None:
        """Log the targets reached, from the summed :meth:`part` (empty where none was added: test,
        predict, validate alone)."""
        if self.watch is None or not summed:
            return
        n_processes = trainer.world_size if distributed(trainer) else 1
        log_metrics(trainer, self.watch.settle(summed, trainer.global_step, n_processes))

    def warn_never_logged(self, trainer: Trainer) -> None:
        if self.watch is not None and self.watch.targets.never_logged():
            rank_zero_warn(self.watch.never_logged_message(trainer.callback_metrics))

    def energy_j(self) -> float:
        """This process's energy since the fit started (0 without targets)."""
        return self.watch.energy_j() if self.watch is not None else 0.0

    def state(self) -> dict[str, Any]:
        """The checkpoint's part: the targets met and the fit's time (the same on every process)."""
        watch = self.watch
        return {
            "fit_time_s": watch.time_s() if watch else 0.0,
            "targets": watch.targets.state_dict() if watch else None,
        }

    def restore(self, state: dict[str, Any], fit_energy_j: float) -> None:
        """Go on from a checkpoint's :meth:`state` and this process's ``fit_energy_j``."""
        if self.watch is None or not state.get("targets"):
            return
        self.watch.targets.load_state_dict(state["targets"])
        self.watch.restored_s = float(state["fit_time_s"])
        self.watch.restored_j = fit_energy_j

    def rows(self, source: str) -> dict[str, list[dict]]:
        """The summary's ``targets`` section ({} without targets)."""
        return {"targets": self.targets.rows(source)} if self.targets is not None else {}


class FitFigures:
    """The figures of an :class:`~lightning_green.callbacks.efficiency.EfficiencyLogger`'s fit: training
    energy, samples and tokens from the start of training, logged at the sampler's log steps; the
    targets, settled with the sums of those log steps, of validation loops and of train end; the
    results at the end of training or at a stop; the checkpoint's part, restored when training starts.

    Args:
        counter: the training batches' samples and tokens (the callback counts each batch).
        carbon_intensity_g_per_kwh: grid carbon intensity (gCO2e/kWh).
        pue: data-centre power usage effectiveness.
        count_tokens: make the token figures.
        targets: the parsed targets (:func:`~lightning_green.energy.metrics.parse_targets`), or None.
    """

    def __init__(
        self,
        counter: BatchCounter,
        carbon_intensity_g_per_kwh: float,
        pue: float,
        count_tokens: bool,
        targets: dict | None,
    ) -> None:
        self.counter = counter
        self.training = TrainingEnergy(
            counter, carbon_intensity_g_per_kwh, pue, count_tokens, self._evaluation_energy_j
        )
        self.targets = FitTargets(targets)
        #: how the last fit stopped before the end of training, or None (it ended, or none ran)
        self.stop: FitStop | None = None
        self._sampler: SamplerInterface | None = None
        self._trainer: Trainer | None = None
        self._pending_state: dict | None = None
        # training started and its figures are not made yet (the end of training or a stop makes them)
        self._training = False

    def attach(self, trainer: Trainer, sampler: SamplerInterface) -> None:
        """A stage is set up: its Trainer and sampler. A checkpoint of this stage loads after."""
        self._trainer = trainer
        self._sampler = sampler
        self._pending_state = None

    def fit_starts(self) -> None:
        """The fit starts: the targets are watched from here (validation included)."""
        if self._sampler.measuring:
            self.targets.start(self._sampler.measured_now_j, self._sampler.clock)

    def training_starts(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Training starts: count the parameters, go on from a loaded checkpoint, listen to log steps."""
        self.training.reset()
        self.stop = None
        if not self._sampler.measuring:
            return
        n_params = sum(p.numel() for p in pl_module.parameters())
        self.training.start(n_params, self._sampler.energy_now_j())
        self._apply_state(trainer)
        self._sampler.add_log_step_listener(self._log_step)
        self._training = True

    def validation_ended(self, trainer: Trainer, energy_j: float) -> list[float]:
        """A validation loop of the fit used ``energy_j`` of this process (not training energy); returns
        what the targets add to the loop's reduce."""
        self.training.validation_j += energy_j
        return self.targets.part(trainer)

    def training_ended(self, trainer: Trainer) -> dict[str, float]:
        """Training ended: every process's figures (a collective), the targets settled; {} when
        training did not start or its figures are made."""
        if not self._training:
            return {}
        self._training = False
        local = self.training.local(self._sampler.energy_now_j())
        summed = reduce_sum(trainer, [*local, *self.targets.part(trainer)])
        self.targets.settle(trainer, summed[4:])
        self.targets.warn_never_logged(trainer)
        return self.training.results(*summed[:4])

    def stopped(self) -> dict[str, float]:
        """The fit stopped before the end of training: the figures of the steps that ran, from this
        process's counts (no collective: the other processes may be gone); {} as in :meth:`training_ended`."""
        if not self._training:
            return {}
        self._training = False
        trainer = self._trainer
        scope = "this process" if trainer.world_size > 1 else "all processes"
        self.stop = FitStop(step=trainer.global_step, scope=scope)
        return self.training.results(*self.training.local(self._sampler.energy_now_j()))

    def state(self) -> dict[str, Any]:
        """Training energy, samples and tokens so far of every process, and the targets' part (a
        collective when the process group is up)."""
        if self._sampler is not None:
            train_energy_j = self.training.energy_j(self._sampler.energy_now_j())
        else:
            train_energy_j = self.training.restored_j
        local = {
            "train_energy_j": train_energy_j,
            "samples": self.counter.samples,
            "tokens": self.counter.tokens,
            "fit_energy_j": self.targets.energy_j(),
        }
        trainer = self._trainer
        per_rank = gather_objects(trainer, local) if trainer is not None and distributed(trainer) else [local]
        return {"version": 2, "per_rank": per_rank, **self.targets.state()}

    def load(self, state: dict[str, Any]) -> None:
        """A checkpoint's :meth:`state`, applied when training starts."""
        self._pending_state = dict(state)

    def _log_step(self, step: int, reduce: Reduce) -> Callable[[float], dict[str, float]]:
        """The PowerSampler's log-step listener (training thread): settle the targets, note the counts;
        the figures are built by the returned function from the energy at the window's end."""
        if self.targets.watch is not None:
            self.targets.settle(self._trainer, reduce(self.targets.part(self._trainer)))
        return self.training.log_step(reduce)

    def _evaluation_energy_j(self) -> float:
        return self._sampler.evaluation_energy_j

    def _apply_state(self, trainer: Trainer) -> None:
        state = self._pending_state or {}
        self._pending_state = None
        keys = ("train_energy_j", "samples", "tokens", "fit_energy_j")
        mine = state_for_rank(state.get("per_rank") or [], trainer.world_size, trainer.global_rank, keys)
        self.targets.restore(state, float((mine or {}).get("fit_energy_j", 0.0)))
        if mine is None:
            return
        self.training.restore(float(mine["train_energy_j"]), int(mine["samples"]), int(mine["tokens"]))
