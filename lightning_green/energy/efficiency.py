"""The figures of :class:`~lightning_green.callbacks.efficiency.EfficiencyLogger`, Trainer-free.

* :class:`TrainingEnergy`: a fit's training energy, samples and tokens, its log-window figures (EER,
  samples and tokens per joule, carbon) and its results at the end (or at a stop);
* :class:`EvaluationEnergy`: the energy, samples and tokens of one validation, test or predict loop,
  and its EPI.

Collectives come in as a function (``reduce``: the element-wise sum over processes), energy as joules.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from lightning_green.energy import metrics as M
from lightning_green.energy.session import Reduce


class Counts(Protocol):
    """Running totals of training samples and tokens (``BatchCounter`` keeps them, per batch)."""

    samples: int
    tokens: int


class TrainingEnergy:
    """A fit's training energy and counts, and the figures made of them (this process's; sums come
    from ``reduce``).

    Training energy is this process's energy since training started, less what was not training
    (the validation loops of fit, and ``evaluation_energy_j()``: the blocks measured apart), plus what
    a checkpoint restored.

    Args:
        counts: the running totals of training samples and tokens.
        carbon_intensity_g_per_kwh: grid carbon intensity (gCO2e/kWh).
        pue: data-centre power usage effectiveness.
        count_tokens: make the token figures.
        evaluation_energy_j: this process's joules of evaluation blocks since training started.
    """

    def __init__(
        self,
        counts: Counts,
        carbon_intensity_g_per_kwh: float,
        pue: float,
        count_tokens: bool,
        evaluation_energy_j: Callable[[], float],
    ) -> None:
        self.counts = counts
        self.carbon_intensity_g_per_kwh = carbon_intensity_g_per_kwh
        self.pue = pue
        self.count_tokens = count_tokens
        self.evaluation_energy_j = evaluation_energy_j
        self.reset()

    def reset(self) -> None:
        self.n_params = 0
        self.counts.samples = 0
        self.counts.tokens = 0
        #: energy of the validation loops inside fit (not training energy)
        self.validation_j = 0.0
        #: this process's energy when training started
        self.start_j = 0.0
        #: training energy before a resume
        self.restored_j = 0.0
        # the figures at the last log step
        self._window_j = 0.0
        self._window_samples = 0
        self._window_tokens = 0
        self._window_not_training_j = 0.0

    def start(self, n_params: int, energy_j: float) -> None:
        """Training starts with ``n_params`` parameters, at this process's cumulative ``energy_j``."""
        self.n_params = n_params
        self.start_j = energy_j
        self._window_j = energy_j

    def restore(self, energy_j: float, samples: int, tokens: int) -> None:
        """The training energy and counts a checkpoint carried."""
        self.restored_j = energy_j
        self.counts.samples = samples
        self.counts.tokens = tokens
        self._window_samples = samples
        self._window_tokens = tokens

    def not_training_j(self) -> float:
        """Since training started: the validation loops of fit and the evaluation blocks."""
        return self.validation_j + self.evaluation_energy_j()

    def energy_j(self, now_j: float) -> float:
        """This process's training energy, given its cumulative ``now_j``."""
        return self.restored_j + now_j - self.start_j - self.not_training_j()

    def local(self, now_j: float) -> list[float]:
        """``[training energy, samples, tokens, cumulative energy]`` of this process (to be summed)."""
        return [self.energy_j(now_j), self.counts.samples, self.counts.tokens, now_j]

    def log_step(self, reduce: Reduce) -> Callable[[float], dict[str, float]]:
        """At a log step (training thread): note the counts; the returned ``finish(now_j)`` builds the
        window's figures from the energy at the window's end (see :meth:`window_metrics`)."""
        samples = self.counts.samples
        tokens = self.counts.tokens
        not_training_j = self.not_training_j()

        def finish(now_j: float) -> dict[str, float]:
            return self.window_metrics(reduce, samples, tokens, not_training_j, now_j)

        return finish

    def window_metrics(
        self, reduce: Reduce, samples: int, tokens: int, not_training_j: float, now_j: float
    ) -> dict[str, float]:
        """The window's rates, EER and carbon from the counts noted at its log step (may run on a log
        thread: it reads the counts it is given, and the last window's, which only it writes)."""
        local = [
            # training energy so far
            self.restored_j + now_j - self.start_j - not_training_j,
            # the window's training energy
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
        if self.count_tokens:
            metrics["efficiency/tokens_per_j"] = M.per_joule(window_tokens, window_j)
        self._window_j = now_j
        self._window_samples = samples
        self._window_tokens = tokens
        self._window_not_training_j = not_training_j
        return metrics

    def results(self, train_j: float, samples: float, tokens: float, total_j: float) -> dict[str, float]:
        """The fit's figures from its (summed) training energy, counts and cumulative energy."""
        out = {
            "train_energy_j": train_j,
            "train_samples": samples,
            "eer_j_per_param": M.eer_j_per_param(train_j, self.n_params),
            "eer_kwh_per_param": M.eer_j_per_param(M.kwh(train_j), self.n_params),
            "samples_per_j": M.per_joule(samples, train_j),
            "carbon_gco2e": M.carbon_g(total_j, self.carbon_intensity_g_per_kwh, self.pue),
            "n_params": self.n_params,
        }
        if self.count_tokens:
            out["train_tokens"] = tokens
            out["tokens_per_j"] = M.per_joule(tokens, train_j)
        return out


class EvaluationEnergy:
    """One validation, test or predict loop: its energy, samples and tokens, and its EPI.

    Args:
        count_tokens: make the per-token figure.
    """

    def __init__(self, count_tokens: bool) -> None:
        self.count_tokens = count_tokens
        self.start_j = 0.0
        self.samples = 0
        self.tokens = 0

    def start(self, energy_j: float) -> None:
        """The loop starts at this process's cumulative ``energy_j``."""
        self.start_j = energy_j
        self.samples = 0
        self.tokens = 0

    def add(self, samples: int, tokens: int) -> None:
        self.samples += samples
        self.tokens += tokens

    def local(self, now_j: float) -> list[float]:
        """``[energy, samples, tokens]`` of this process since :meth:`start` (to be summed)."""
        return [now_j - self.start_j, self.samples, self.tokens]

    def figures(self, stage: str, summed: Sequence[float]) -> tuple[dict[str, float], dict[str, float]]:
        """``(metrics to log, results to keep)`` of the loop of ``stage`` from its summed :meth:`local`."""
        energy_j = summed[0]
        samples = summed[1]
        tokens = summed[2]
        metrics = {"efficiency/epi_j": M.epi_j(energy_j, samples)}
        results = {
            f"{stage}_energy_j": energy_j,
            f"{stage}_samples": samples,
            f"{stage}_epi_j": metrics["efficiency/epi_j"],
        }
        if self.count_tokens:
            metrics["efficiency/epi_j_per_token"] = M.epi_j(energy_j, tokens)
            results[f"{stage}_epi_j_per_token"] = metrics["efficiency/epi_j_per_token"]
        return metrics, results
