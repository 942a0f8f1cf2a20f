"""EfficiencyLogger: EER, EPI, samples/tokens per joule and carbon, from a PowerSampler's energy."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

from lightning_green.callbacks.batch_counts import BatchCounter, CountFn, check_count_fn
from lightning_green.callbacks.fit_figures import FitFigures, FitStop, FitTargets
from lightning_green.callbacks.power import PowerSampler, find_power_sampler
from lightning_green.distributed import gather_floats, reduce_sum
from lightning_green.energy import metrics as M
from lightning_green.energy.efficiency import EvaluationEnergy
from lightning_green.energy.generation import (
    GenerationTally,
    check_generated_tokens,
    cluster_generation,
    generation_metrics,
    generation_rows,
    predict_results,
)
from lightning_green.errors import MisconfiguredTrainer
from lightning_green.log_queue import log_metrics

__all__ = [
    "BatchCounter",
    "EfficiencyLogger",
    "FitStop",
    "FitTargets",
    "TargetSpec",
    "efficiency_rows",
    "stage_results",
]

TargetSpec = float | tuple[float, str]


def stage_results(results: Mapping[str, float], stage: str) -> dict[str, float]:
    """The figures of ``results`` that belong to ``stage``: for ``fit`` its training and validation
    figures, for ``validate``/``test``/``predict`` those named after it."""
    if stage == "fit":
        return {k: v for k, v in results.items() if not k.startswith(("test_", "predict_"))}
    return {k: v for k, v in results.items() if k.startswith(f"{stage}_")}


def efficiency_rows(
    results: Mapping[str, float],
    source: str,
    carbon_intensity_g_per_kwh: float,
    pue: float,
    stopped: FitStop | None = None,
) -> list[dict]:
    """The summary's ``efficiency`` section: each figure with the source of its energy, and the
    settings. With ``stopped``, the fit stopped before the end of training: each figure's row has
    ``complete: false`` (the figures of the steps that ran) and ``scope`` (whose energy they hold)."""
    energy_words = ("energy", "eer", "epi", "per_j", "j_per", "carbon")
    rows = []
    for figure, value in results.items():
        row = {"figure": figure, "value": value, "source": source if any(w in figure for w in energy_words) else ""}
        if stopped is not None:
            row["complete"] = False
            row["scope"] = stopped.scope
        rows.append(row)
    rows.append({"figure": "carbon_intensity_g_per_kwh", "value": carbon_intensity_g_per_kwh, "source": "setting"})
    rows.append({"figure": "pue", "value": pue, "source": "setting"})
    return rows


class EfficiencyLogger(Callback):
    r"""Log energy efficiency and carbon from the energy a :class:`PowerSampler` measures.

    Needs a ``PowerSampler`` in the same Trainer. Training energy is the energy of ``fit`` minus its
    validation loops and the blocks of :meth:`PowerSampler.measure_evaluation` (QAT's at the end of fit,
    whatever the callback order); inference energy is that of each validation, test or predict loop.

    Logged metrics (through ``trainer.loggers``; energy summed over all processes):
        - ``efficiency/eer_j_per_param`` (J/parameter): Energy Efficiency Ratio, training energy so far /
          number of model parameters (the summary also gives kWh per parameter).
        - ``efficiency/samples_per_j`` (1/J): training samples per joule over the logging window.
        - ``efficiency/tokens_per_j`` (1/J): training tokens per joule over the window, when tokens are
          counted.
        - ``efficiency/epi_j`` (J/sample): Energy Per Inference, at the end of each validation/test loop.
        - ``efficiency/epi_j_per_token`` (J/token): the same per token, when tokens are counted.
        - with ``generated_tokens``, at the end of each predict loop, all processes:
          ``efficiency/j_per_generated_token`` (J/token), ``efficiency/s_per_generated_token`` (s/token: the
          longest process's time / every process's tokens), ``efficiency/generated_tokens_per_j`` (1/J).
        - ``carbon/gco2e`` (gCO2e): all energy so far × ``pue`` × ``carbon_intensity_g_per_kwh`` / 3.6e6.
        - ``efficiency/energy_to_target/<metric>_j`` (J) and ``efficiency/time_to_target/<metric>_s`` (s),
          with ``targets``, once: all processes' energy and the time since the start of fit,
          validation included, when ``<metric>`` first reaches its target.

    Energy-to-target (Zeus's energy-to-accuracy): targets are checked against ``trainer.callback_metrics``
    after each validation loop of fit and at log steps (one all-reduce); the rule in full is in
    ``docs/metrics.md``. Generated tokens (``trainer.predict``, with ``generated_tokens``): the rule is in
    :mod:`lightning_green.energy.generation`.

    A fit that stops early (an exception, Ctrl+C, SIGTERM) keeps the figures of the steps that ran in
    :attr:`results`; :attr:`fit_stop` says so, and the summary's rows have ``complete: false`` and a
    ``scope`` (with several processes, this process's own: no collective is left). Without a sensor
    (:attr:`PowerSampler.measuring` False) nothing is logged and no figure kept.

    Samples per batch: Lightning's ``extract_batch_size`` unless ``samples_per_batch`` is given; tokens
    only with ``tokens_per_batch`` (``"numel"``: the elements of the batch's first tensor, token ids of
    shape ``[batch, sequence]``). A training batch is counted as it starts (a skipped one too).

    Args:
        carbon_intensity_g_per_kwh: grid carbon intensity in gCO2e/kWh; default 475, the world average
            (IEA 2019). No network look-up is made.
        pue: data-centre power usage effectiveness (>= 1.0); 1.0 counts IT energy only.
        tokens_per_batch: ``None``, ``"numel"`` or a callable ``batch -> int``.
        samples_per_batch: ``None`` (``extract_batch_size``), ``"numel"`` or a callable ``batch -> int``.
        targets: ``{metric: value}`` or ``{metric: (value, "min" | "max")}``; a bare value means
            ``"min"`` (reached at or below) for a name containing ``"loss"``, else ``"max"``.
        generated_tokens: ``None``, ``"output"`` (token ids with the prompt, returned by ``predict_step``)
            or a callable ``(output, batch) -> int`` (predict only).

    Raises:
        ValueError: a negative carbon intensity, ``pue < 1``, a bad counting function or bad ``targets``.
        TypeError: on first use, a counting callable (``generated_tokens`` too) that returned no whole
            number >= 0 (the message names the argument).
        MisconfigurationException: in ``setup``, when the Trainer has no ``PowerSampler``.

    Example::

        trainer = Trainer(callbacks=[PowerSampler(), EfficiencyLogger(targets={"val_loss": 1.5})])
    """

    def __init__(
        self,
        carbon_intensity_g_per_kwh: float = M.DEFAULT_CARBON_INTENSITY_G_PER_KWH,
        pue: float = 1.0,
        tokens_per_batch: CountFn = None,
        samples_per_batch: CountFn = None,
        targets: Mapping[str, TargetSpec] | None = None,
        generated_tokens: str | Callable[[Any, Any], int] | None = None,
    ) -> None:
        super().__init__()
        M.check_carbon_args(carbon_intensity_g_per_kwh, pue)
        self.carbon_intensity_g_per_kwh = float(carbon_intensity_g_per_kwh)
        self.pue = float(pue)
        self.tokens_per_batch = check_count_fn("tokens_per_batch", tokens_per_batch)
        self.samples_per_batch = check_count_fn("samples_per_batch", samples_per_batch)
        self._counter = BatchCounter(self.samples_per_batch, self.tokens_per_batch)
        count_tokens = self.tokens_per_batch is not None
        parsed_targets = M.parse_targets(targets) if targets is not None else None
        self._fit = FitFigures(self._counter, self.carbon_intensity_g_per_kwh, self.pue, count_tokens, parsed_targets)
        self._eval = EvaluationEnergy(count_tokens)
        self.generated_tokens = check_generated_tokens(generated_tokens)
        self._generation_tally = GenerationTally(generated_tokens, self._batch_samples) if generated_tokens else None
        #: the last predict loop's generation figures (:func:`~lightning_green.energy.generation.cluster_generation`)
        self.generation: dict | None = None
        self._sampler: PowerSampler | None = None
        #: every stage's figures, the latest of each
        self.results: dict[str, float] = {}

    @property
    def targets(self) -> M.EnergyTargets | None:
        """The targets of the current (or last) fit, or None."""
        return self._fit.targets.targets

    @property
    def n_params(self) -> int:
        """The model's parameters, counted when training started (EER divides by them)."""
        return self._fit.training.n_params

    @property
    def fit_stop(self) -> FitStop | None:
        """How the last fit stopped before the end of training, or None (it ended, or none ran)."""
        return self._fit.stop

    # ------------------------------------------------------------------ fit hooks
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._attach(trainer)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._fit.fit_starts()

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._fit.training_starts(trainer, pl_module)

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        # at the start, so a log step's figures hold its own batch whichever hook runs first
        self._counter.add(batch)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.results.update(self._fit.training_ended(trainer))

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self.results.update(self._fit.stopped())

    # ------------------------------------------------------------------ evaluation hooks
    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._eval_start(trainer)

    @override
    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._eval_start(trainer)

    @override
    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._eval_start(trainer)

    @override
    def on_validation_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._eval_batch(trainer, batch)

    @override
    def on_test_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._eval_batch(trainer, batch)

    @override
    def on_predict_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._eval_batch(trainer, batch)

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._eval_end(trainer, "validate")

    @override
    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._eval_end(trainer, "test")

    @override
    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._eval_end(trainer, "predict")

    @override
    def on_predict_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._generation_tally is not None:
            self._generation_tally.add(outputs, batch)

    # ------------------------------------------------------------------ checkpoints
    @override
    def state_dict(self) -> dict[str, Any]:
        """Training energy, samples and tokens so far of every process, so EER and the rates go on
        after a resume (a collective when the process group is up, like Lightning's checkpointing)."""
        return self._fit.state()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._fit.load(state_dict)

    # ------------------------------------------------------------------ setup
    def _attach(self, trainer: Trainer) -> None:
        self._sampler = find_power_sampler(trainer)
        if self._sampler is None:
            raise MisconfiguredTrainer(
                "EfficiencyLogger needs a PowerSampler in the same Trainer: "
                "Trainer(callbacks=[PowerSampler(), EfficiencyLogger()])"
            )
        self._sampler.add_summary_provider(self._summary_rows)
        self._fit.attach(trainer, self._sampler)

    # ------------------------------------------------------------------ helpers of evaluation loops
    def _eval_start(self, trainer: Trainer) -> None:
        if trainer.sanity_checking or not self._sampler.measuring:
            return
        self._eval.start(self._sampler.energy_now_j())
        if trainer.predicting and self._generation_tally is not None:
            self._generation_tally.start(self._sampler)

    def _eval_batch(self, trainer: Trainer, batch: Any) -> None:
        if trainer.sanity_checking or not self._sampler.measuring:
            return
        samples, tokens = self._counter(batch)
        self._eval.add(samples, tokens)

    def _eval_end(self, trainer: Trainer, stage: str) -> None:
        if trainer.sanity_checking or not self._sampler.measuring:
            return
        local = self._eval.local(self._sampler.energy_now_j())
        in_fit = stage == "validate" and trainer.state.fn == "fit"
        target_part = self._fit.validation_ended(trainer, local[0]) if in_fit else []
        summed = reduce_sum(trainer, [*local, *target_part])
        self._fit.targets.settle(trainer, summed[3:])
        metrics, results = self._eval.figures(stage, summed[:3])
        self.results.update(results)
        if stage != "predict":
            log_metrics(trainer, metrics)
        elif self._generation_tally is not None:
            self._end_generation(trainer)

    def _end_generation(self, trainer: Trainer) -> None:
        """Every process's generated tokens, energy and time (a collective), logged and kept for the summary."""
        row = self._generation_tally.local_row(self._sampler, trainer.node_rank)
        self.generation = cluster_generation(gather_floats(trainer, row))
        self.results.update(predict_results(self.generation["total"]))
        log_metrics(trainer, generation_metrics(self.generation["total"]))

    def _batch_samples(self, batch: Any) -> int:
        """A batch's samples by this logger's rules (what a batch counts when its generated tokens cannot be)."""
        return self._counter(batch)[0]

    # ------------------------------------------------------------------ summary
    def _summary_rows(self) -> dict[str, list[dict]]:
        """The summary's ``targets`` and ``efficiency`` sections; a fit that stopped before
        ``on_train_end`` gets the figures of the steps that ran, whichever callback's
        ``on_exception`` runs first."""
        if not self._sampler.measuring:
            return {}
        self.results.update(self._fit.stopped())
        # the figures are sums over every process
        source = self._sampler.sources(all_processes=True)
        out = self._fit.targets.rows(source)
        stage = self._sampler.stage
        # a test's summary: not the fit's figures
        results = stage_results(self.results, stage)
        if results:
            stopped = self.fit_stop if stage == "fit" else None
            out["efficiency"] = efficiency_rows(results, source, self.carbon_intensity_g_per_kwh, self.pue, stopped)
        if self.generation is not None and stage == "predict":
            out["generation"] = generation_rows(self.generation, source)
        return out
