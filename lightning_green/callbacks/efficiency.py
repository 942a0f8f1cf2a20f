"""EfficiencyLogger: EER, EPI, samples/tokens per joule and carbon, from a PowerSampler's energy."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, Union

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.data import extract_batch_size
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from typing_extensions import override

from lightning_green.callbacks.power import PowerSampler, find_power_sampler
from lightning_green.checks import checked_count
from lightning_green.distributed import distributed, gather_floats, gather_objects, reduce_sum
from lightning_green.energy import metrics as M
from lightning_green.energy.generation import (
    GenerationTally,
    check_generated_tokens,
    cluster_generation,
    first_tensor,
    generation_metrics,
    generation_rows,
    predict_results,
)
from lightning_green.energy.session import Reduce
from lightning_green.errors import MisconfiguredTrainer
from lightning_green.log_queue import log_metrics
from lightning_green.messages import WarnOnce
from lightning_green.resume import state_for_rank

CountFn = Union[None, str, Callable[[Any], int]]
TargetSpec = Union[float, "tuple[float, str]"]
_COUNT_NAMES = ("numel",)


def _check_count_fn(arg: str, fn: CountFn) -> CountFn:
    if fn is None or callable(fn) or fn in _COUNT_NAMES:
        return fn
    raise ValueError(f"`{arg}` must be None, 'numel' or a callable batch -> int, got {fn!r}")


class BatchCounter:
    """Samples and tokens of a batch, by the rules of :class:`EfficiencyLogger` (Trainer-free).

    A user callable that returns anything but a whole number >= 0 raises ``TypeError`` naming the
    argument and what it returned, on its first use. A batch whose size Lightning cannot find counts
    0 samples, with one warning.
    """

    def __init__(self, samples_per_batch: CountFn = None, tokens_per_batch: CountFn = None) -> None:
        self.samples_per_batch = samples_per_batch
        self.tokens_per_batch = tokens_per_batch
        self._plain = samples_per_batch is None and tokens_per_batch is None
        self._warn = WarnOnce()
        self.samples = self.tokens = 0  # running totals of :meth:`add`

    def add(self, batch: Any) -> None:
        """Add ``batch`` to :attr:`samples` and :attr:`tokens`. Per training batch, so the common
        batches (a tensor, or a list or tuple led by one) take a fast rule with no call and no tuple."""
        if self._plain:
            first = batch[0] if isinstance(batch, (list, tuple)) and batch else batch
            shape = first.shape if isinstance(first, torch.Tensor) else ()  # one call into torch, not two
            if shape:
                self.samples += shape[0]
                return
        samples, tokens = self(batch)
        self.samples += samples
        self.tokens += tokens

    def __call__(self, batch: Any) -> tuple[int, int]:
        samples = (
            self._count("samples_per_batch", self.samples_per_batch, batch)
            if self.samples_per_batch is not None
            else self._batch_size(batch)
        )
        tokens = (
            self._count("tokens_per_batch", self.tokens_per_batch, batch) if self.tokens_per_batch is not None else 0
        )
        return samples, tokens

    def _batch_size(self, batch: Any) -> int:
        first = first_tensor(batch)  # what extract_batch_size finds, without its tree walk
        if first is not None and first.dim() > 0:
            return first.shape[0]
        try:
            return extract_batch_size(batch)
        except Exception as err:  # noqa: BLE001 - an unusual batch must not stop training
            self._warn(
                "batch_size",
                f"EfficiencyLogger: cannot find the batch size ({err}); such batches count 0 samples, so samples_per_j and EPI are partial. Pass `samples_per_batch`.",
            )
            return 0

    @staticmethod
    def _count(arg: str, fn: CountFn, batch: Any) -> int:
        if fn == "numel":
            tensor = first_tensor(batch)
            return int(tensor.numel()) if tensor is not None else 0
        return checked_count(arg, fn(batch))


def stage_results(results: Mapping[str, float], stage: str) -> dict[str, float]:
    """The figures of ``results`` that belong to ``stage``: for ``fit`` its training and validation
    figures, for ``validate``/``test``/``predict`` those named after it."""
    if stage == "fit":
        return {k: v for k, v in results.items() if not k.startswith(("test_", "predict_"))}
    return {k: v for k, v in results.items() if k.startswith(f"{stage}_")}


def efficiency_rows(
    results: Mapping[str, float], source: str, carbon_intensity_g_per_kwh: float, pue: float
) -> list[dict]:
    """The summary's ``efficiency`` section: each figure with the source of its energy, and the settings."""
    energy_words = ("energy", "eer", "epi", "per_j", "j_per", "carbon")
    rows = [
        {"figure": k, "value": v, "source": source if any(w in k for w in energy_words) else ""}
        for k, v in results.items()
    ]
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
        - ``efficiency/tokens_per_j`` (1/J): training tokens per joule over the window, when tokens are counted.
        - ``efficiency/epi_j`` (J/sample): Energy Per Inference, at the end of each validation/test/predict loop.
        - ``efficiency/epi_j_per_token`` (J/token): the same per token, when tokens are counted.
        - with ``generated_tokens``, at the end of each predict loop, all processes:
          ``efficiency/j_per_generated_token`` (J/token), ``efficiency/s_per_generated_token`` (s/token:
          the longest process's time / every process's tokens) and ``efficiency/generated_tokens_per_j`` (1/J).
        - ``carbon/gco2e`` (gCO2e): all energy so far × ``pue`` × ``carbon_intensity_g_per_kwh`` / 3.6e6.
        - ``efficiency/energy_to_target/<metric>_j`` (J) and ``efficiency/time_to_target/<metric>_s`` (s),
          with ``targets``, once: all processes' energy and the time since the start of fit,
          validation included, when ``<metric>`` first reaches its target.

    Energy-to-target (Zeus's energy-to-accuracy): targets are checked against ``trainer.callback_metrics``
    after each validation loop of fit, at training log steps and at the end of training, with one
    all-reduce: a target is reached when any process sees it reached (log with ``sync_dist=True`` and all
    see the same value). The summary's ``targets`` section lists each target (reached or not, step,
    joules, seconds, source); a resumed run keeps the targets met; a target whose metric was never
    logged gets one warning at fit end.

    Samples per batch are found with Lightning's ``extract_batch_size`` unless ``samples_per_batch`` is
    given. Tokens are counted only when ``tokens_per_batch`` is given: ``"numel"`` counts the elements
    of the batch's first tensor (token ids of shape ``[batch, sequence]``), a callable ``batch -> int``
    counts anything else. A training batch is counted as it starts, so a batch that a LightningModule
    skips (``on_train_batch_start`` returning -1) is counted too.

    Generated tokens are counted in ``trainer.predict`` only when ``generated_tokens`` is given:
    ``"output"`` counts them from ``predict_step``'s output, a tensor of token ids holding the prompt then
    the new tokens: ``rows x (output.shape[-1] - prompt width)``, the prompt being the batch's
    ``input_ids`` (a mapping) or its first tensor (the rule in full: :mod:`lightning_green.energy.generation`);
    an output the rule cannot read warns once and that batch counts its samples. A callable
    ``(output, batch) -> int`` counts anything else. The predict summary's ``generation`` table gives every
    process's figures, each process's and the imbalance.

    Args:
        carbon_intensity_g_per_kwh: grid carbon intensity in gCO2e/kWh; default 475, the world average
            (IEA 2019). No network look-up is made.
        pue: data-centre power usage effectiveness (>= 1.0); 1.0 counts IT energy only.
        tokens_per_batch: ``None``, ``"numel"`` or a callable ``batch -> int``.
        samples_per_batch: ``None`` (``extract_batch_size``), ``"numel"`` or a callable ``batch -> int``.
        targets: ``{metric: value}`` or ``{metric: (value, "min" | "max")}``; a bare value means
            ``"min"`` (reached at or below) for a name containing ``"loss"``, else ``"max"``.
        generated_tokens: ``None``, ``"output"`` or a callable ``(output, batch) -> int`` (predict only).

    Raises:
        ValueError: a negative carbon intensity, ``pue < 1``, a bad counting function or bad ``targets``.
        TypeError: on first use, a counting callable (``generated_tokens`` too) that returned no whole number
            >= 0 (the message names the argument).
        MisconfigurationException: in ``setup``, when the Trainer has no ``PowerSampler`` (a ``RuntimeError``).

    Example::

        trainer = Trainer(callbacks=[PowerSampler(), EfficiencyLogger(tokens_per_batch="numel", targets={"val_loss": 1.5})])
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
        self.tokens_per_batch = _check_count_fn("tokens_per_batch", tokens_per_batch)
        self.samples_per_batch = _check_count_fn("samples_per_batch", samples_per_batch)
        self._counter = BatchCounter(self.samples_per_batch, self.tokens_per_batch)
        self.generated_tokens = check_generated_tokens(generated_tokens)
        self._generation_tally = (
            GenerationTally(generated_tokens, self._batch_samples) if generated_tokens is not None else None
        )
        self.generation: dict | None = None  # the last predict loop's figures (energy/generation.cluster_generation)
        self._target_spec = M.parse_targets(targets) if targets is not None else None
        self.targets: M.EnergyTargets | None = None  # of the current (or last) fit
        self._watch: M.TargetWatch | None = None
        self._power: PowerSampler | None = None
        self._trainer: Trainer | None = None
        self._pending_state: dict | None = None
        self.results: dict[str, float] = {}  # every stage's figures, the latest of each
        self._reset()

    def _reset(self) -> None:
        self.n_params = 0
        self._counter.samples = self._counter.tokens = 0  # training samples and tokens so far (this process)
        self._eval_in_fit_j = 0.0  # energy of the validation loops inside fit (not training energy)
        self._fit_start_j, self._restored_train_j = 0.0, 0.0  # at train start; training energy before a resume
        self._window_j, self._window_samples, self._window_tokens, self._window_not_training_j = (
            0.0,
            0,
            0,
            0.0,
        )  # at the last log
        self._eval = {"samples": 0, "tokens": 0, "start_j": 0.0}

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._power = find_power_sampler(trainer)
        if self._power is None:
            raise MisconfiguredTrainer(
                "EfficiencyLogger needs a PowerSampler in the same Trainer: Trainer(callbacks=[PowerSampler(), EfficiencyLogger()])"
            )
        self._power.add_summary_provider(self._summary_rows)
        self._trainer, self._pending_state = trainer, None  # a checkpoint of this stage loads after setup

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._target_spec is not None:
            self.targets = M.EnergyTargets(self._target_spec)
            self._watch = M.TargetWatch(self.targets, self._power.session.measured_now_j, self._power.session.clock)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._reset()
        self.n_params = sum(p.numel() for p in pl_module.parameters())
        self._fit_start_j = self._window_j = self._power.energy_now_j()
        self._apply_state(trainer)
        self._power.add_log_step_listener(self._log_step)

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._counter.add(batch)  # at the start, so a log step's figures hold its own batch whichever hook runs first

    def _log_step(self, step: int, reduce: Reduce) -> Callable[[float], dict[str, float]]:
        """The PowerSampler's log-step listener (training thread): settle the targets, note the counts;
        the figures are built by the returned function from the energy at the window's end."""
        if self._watch is not None:
            self._log_targets(self._trainer, reduce(self._target_part(self._trainer)))
        return functools.partial(
            self._window_metrics, reduce, self._counter.samples, self._counter.tokens, self._not_training_j()
        )

    def _window_metrics(
        self, reduce: Reduce, samples: int, tokens: int, not_training_j: float, now_j: float
    ) -> dict[str, float]:
        """The window's rates, EER and carbon from the counts noted at its log step (may run on the log
        thread: it reads the counts it is given, and the last window's, which only it writes)."""
        local = [
            self._restored_train_j + now_j - self._fit_start_j - not_training_j,  # training energy so far
            now_j - self._window_j - (not_training_j - self._window_not_training_j),
            samples - self._window_samples,
            tokens - self._window_tokens,
            now_j,
        ]
        train_j, window_j, window_samples, window_tokens, total_j = reduce(local)
        metrics = {
            "efficiency/eer_j_per_param": M.eer_j_per_param(train_j, self.n_params),
            "efficiency/samples_per_j": M.per_joule(window_samples, window_j),
            "carbon/gco2e": M.carbon_g(total_j, self.carbon_intensity_g_per_kwh, self.pue),
        }
        if self.tokens_per_batch is not None:
            metrics["efficiency/tokens_per_j"] = M.per_joule(window_tokens, window_j)
        self._window_j, self._window_samples, self._window_tokens, self._window_not_training_j = (
            now_j,
            samples,
            tokens,
            not_training_j,
        )
        return metrics

    def _train_energy_j(self, now_j: float) -> float:
        """This process's training energy: fit so far less what was not training, plus any restored."""
        return self._restored_train_j + now_j - self._fit_start_j - self._not_training_j()

    def _not_training_j(self) -> float:
        """Since train start: the validation loops of fit and the PowerSampler's evaluation blocks."""
        return self._eval_in_fit_j + self._power.training.evaluation_j

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        now_j = self._power.energy_now_j()
        summed = reduce_sum(
            trainer,
            [
                self._train_energy_j(now_j),
                self._counter.samples,
                self._counter.tokens,
                now_j,
                *self._target_part(trainer),
            ],
        )
        train_j, samples, tokens, total_j = summed[:4]
        self._log_targets(trainer, summed[4:])
        if self._watch is not None and self._watch.targets.never_logged():
            rank_zero_warn(self._watch.never_logged_message(trainer.callback_metrics))
        self.results.update(
            train_energy_j=train_j,
            train_samples=samples,
            eer_j_per_param=M.eer_j_per_param(train_j, self.n_params),
            eer_kwh_per_param=M.eer_j_per_param(M.kwh(train_j), self.n_params),
            samples_per_j=M.per_joule(samples, train_j),
            carbon_gco2e=M.carbon_g(total_j, self.carbon_intensity_g_per_kwh, self.pue),
            n_params=self.n_params,
        )
        if self.tokens_per_batch is not None:
            self.results.update(train_tokens=tokens, tokens_per_j=M.per_joule(tokens, train_j))

    def _eval_start(self, trainer: Trainer, *_hook_args: Any) -> None:
        if trainer.sanity_checking:
            return
        self._eval = {"samples": 0, "tokens": 0, "start_j": self._power.energy_now_j()}
        if trainer.predicting and self._generation_tally is not None:
            self._generation_tally.start(self._power.session)

    def _eval_batch(self, trainer: Trainer, pl_module: LightningModule, batch: Any, *_hook_args: Any) -> None:
        if trainer.sanity_checking:
            return
        samples, tokens = self._counter(batch)
        self._eval["samples"] += samples
        self._eval["tokens"] += tokens

    def _eval_end(self, stage: str, trainer: Trainer, *_hook_args: Any) -> None:
        if trainer.sanity_checking:
            return
        local_j = self._power.energy_now_j() - self._eval["start_j"]
        in_fit = stage == "validate" and trainer.state.fn == "fit"
        if in_fit:
            self._eval_in_fit_j += local_j
        summed = reduce_sum(
            trainer,
            [local_j, self._eval["samples"], self._eval["tokens"], *(self._target_part(trainer) if in_fit else ())],
        )
        energy_j, samples, tokens = summed[:3]
        self._log_targets(trainer, summed[3:])
        metrics = {"efficiency/epi_j": M.epi_j(energy_j, samples)}
        if self.tokens_per_batch is not None:
            metrics["efficiency/epi_j_per_token"] = M.epi_j(energy_j, tokens)
        self.results.update(
            {f"{stage}_energy_j": energy_j, f"{stage}_samples": samples, f"{stage}_epi_j": metrics["efficiency/epi_j"]}
        )
        if "efficiency/epi_j_per_token" in metrics:
            self.results[f"{stage}_epi_j_per_token"] = metrics["efficiency/epi_j_per_token"]
        if stage != "predict":
            log_metrics(trainer, metrics)
        elif self._generation_tally is not None:
            self._end_generation(trainer)

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

    def _end_generation(self, trainer: Trainer) -> None:
        """Every process's generated tokens, energy and time (a collective), logged and kept for the summary."""
        row = self._generation_tally.local_row(self._power.session, trainer.node_rank)
        self.generation = cluster_generation(gather_floats(trainer, row))
        self.results.update(predict_results(self.generation["total"]))
        log_metrics(trainer, generation_metrics(self.generation["total"]))

    def _batch_samples(self, batch: Any) -> int:
        """A batch's samples by this logger's rules (what a batch counts when its generated tokens cannot be)."""
        return self._counter(batch)[0]

    # The validation, test and predict loops share one start, batch and end helper each (end is told
    # the stage): nine one-line hooks would be a quarter of this class.
    on_validation_start = on_test_start = on_predict_start = _eval_start
    on_validation_batch_start = on_test_batch_start = on_predict_batch_start = _eval_batch
    on_validation_end = functools.partialmethod(_eval_end, "validate")
    on_test_end = functools.partialmethod(_eval_end, "test")
    on_predict_end = functools.partialmethod(_eval_end, "predict")

    # ------------------------------------------------------------------ checkpoints
    @override
    def state_dict(self) -> dict[str, Any]:
        """Training energy, samples and tokens so far of every process, so EER and the rates go on
        after a resume (a collective when the process group is up, like Lightning's checkpointing)."""
        now_j = self._power.energy_now_j() if self._power is not None else 0.0
        local = {
            "train_energy_j": self._train_energy_j(now_j) if self._power is not None else self._restored_train_j,
            "samples": self._counter.samples,
            "tokens": self._counter.tokens,
            "fit_energy_j": self._watch.energy_j() if self._watch else 0.0,
        }
        trainer = self._trainer
        per_rank = gather_objects(trainer, local) if trainer is not None and distributed(trainer) else [local]
        watch = self._watch
        return {
            "version": 2,
            "per_rank": per_rank,
            "fit_time_s": watch.time_s() if watch else 0.0,
            "targets": watch.targets.state_dict() if watch else None,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending_state = dict(state_dict)

    def _apply_state(self, trainer: Trainer) -> None:
        state, self._pending_state = self._pending_state or {}, None
        keys = ("train_energy_j", "samples", "tokens", "fit_energy_j")
        mine = state_for_rank(state.get("per_rank") or [], trainer.world_size, trainer.global_rank, keys)
        if self._watch is not None and state.get("targets"):  # targets and time: the same on every process
            self._watch.targets.load_state_dict(state["targets"])
            self._watch.restored_s, self._watch.restored_j = (
                float(state["fit_time_s"]),
                float((mine or {}).get("fit_energy_j", 0.0)),
            )
        if mine is None:
            return
        self._restored_train_j = float(mine["train_energy_j"])
        self._counter.samples, self._counter.tokens = int(mine["samples"]), int(mine["tokens"])
        self._window_samples, self._window_tokens = self._counter.samples, self._counter.tokens

    # ------------------------------------------------------------------ helpers
    def _target_part(self, trainer: Trainer) -> list[float]:
        """What the targets add to a reduce: nothing without targets."""
        return self._watch.part(lambda: trainer.callback_metrics) if self._watch is not None else []

    def _log_targets(self, trainer: Trainer, summed: list[float]) -> None:
        if self._watch is not None and summed:  # empty where no part was added (test, predict, validate alone)
            log_metrics(
                trainer,
                self._watch.settle(summed, trainer.global_step, trainer.world_size if distributed(trainer) else 1),
            )

    def _summary_rows(self) -> dict[str, list[dict]]:
        source = self._power.sources(all_processes=True)  # the figures are sums over every process
        out = {"targets": self.targets.rows(source)} if self.targets is not None else {}
        if results := stage_results(self.results, self._power.record.stage):  # a test's summary: not the fit's figures
            out["efficiency"] = efficiency_rows(results, source, self.carbon_intensity_g_per_kwh, self.pue)
        if self.generation is not None and self._power.record.stage == "predict":
            out["generation"] = generation_rows(self.generation, source)
        return out
