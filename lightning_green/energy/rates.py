"""Samples and tokens per joule over logging windows, EER and carbon, from counts the caller gives.

:class:`RateWindow` is the efficiency part of a training loop that has no batches to look at (a
Fabric loop: the caller says how many samples and tokens each step or block held). It plugs into a
:class:`~lightning_green.energy.loops.TrainingLog` as a log-step listener and gives the run's totals
at the end. Trainer-free: collectives come in as a function, energy as numbers.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

from lightning_green.energy import metrics as M
from lightning_green.energy.session import Reduce


class RateWindow:
    """Samples and tokens of a training loop, per joule over each logging window and over the run.

    Counts come two ways, added up: a fixed number per optimizer step (``samples_per_step``,
    ``tokens_per_step``: nothing to do per step, the step count is read at log time) and whatever
    :meth:`add` is given. A figure whose count was never given (no fixed count, nothing added) is not
    logged: 0 samples is not a rate.

    Args:
        samples_per_step: samples each optimizer step of this process holds, or None.
        tokens_per_step: tokens each optimizer step of this process holds, or None.
        carbon_intensity_g_per_kwh: grid carbon intensity (gCO2e/kWh).
        pue: data-centre power usage effectiveness (>= 1.0).

    Example::

        rates = RateWindow(tokens_per_step=4096)
        rates.begin(energy_j=0.0)
        training_log.add_listener(rates.listener)
    """

    def __init__(
        self,
        samples_per_step: int | None = None,
        tokens_per_step: int | None = None,
        carbon_intensity_g_per_kwh: float = M.DEFAULT_CARBON_INTENSITY_G_PER_KWH,
        pue: float = 1.0,
    ) -> None:
        self.samples_per_step = samples_per_step
        self.tokens_per_step = tokens_per_step
        self.carbon_intensity_g_per_kwh = carbon_intensity_g_per_kwh
        self.pue = pue
        self.n_params = 0
        # optimizer steps so far, as the caller last told (read at log time only)
        self.steps = 0
        self.added_samples = 0
        self.added_tokens = 0
        self.counts_samples = samples_per_step is not None
        self.counts_tokens = tokens_per_step is not None
        # this process's evaluation joules so far
        self.not_training_j: Callable[[], float] = float
        self._start_j = 0.0
        # at the last window's end: energy, samples, tokens, not-training energy
        self._last = (0.0, 0, 0, 0.0)

    def begin(self, energy_j: float, not_training_j: Callable[[], float] = float) -> None:
        """Training starts with this process's cumulative ``energy_j``; ``not_training_j()`` gives the
        joules since then that are not training (evaluation blocks)."""
        self._start_j = energy_j
        self.not_training_j = not_training_j
        self._last = (energy_j, self.samples(), self.tokens(), not_training_j())

    def add(self, samples: int = 0, tokens: int = 0) -> None:
        """Count ``samples`` and ``tokens`` of this process (on top of the fixed counts per step)."""
        self.added_samples += samples
        self.added_tokens += tokens
        self.counts_samples = self.counts_samples or samples > 0
        self.counts_tokens = self.counts_tokens or tokens > 0

    def samples(self) -> int:
        return self.steps * (self.samples_per_step or 0) + self.added_samples

    def tokens(self) -> int:
        return self.steps * (self.tokens_per_step or 0) + self.added_tokens

    def train_j(self, energy_j: float) -> float:
        """This process's training energy up to its cumulative ``energy_j``: less the evaluation blocks."""
        return energy_j - self._start_j - self.not_training_j()

    def listener(self, step: int, reduce: Reduce) -> Callable[[float], dict[str, float]]:
        """The :class:`~lightning_green.energy.loops.TrainingLog` log-step listener: notes the counts
        (training thread) and returns the window's figures as a function of the energy at its end."""
        return functools.partial(self.window_metrics, reduce, self.samples(), self.tokens(), self.not_training_j())

    def window_metrics(
        self, reduce: Reduce, samples: int, tokens: int, not_training_j: float, energy_j: float
    ) -> dict[str, float]:
        """``efficiency/eer_j_per_param``, ``efficiency/samples_per_j``, ``efficiency/tokens_per_j`` and
        ``carbon/gco2e`` of the window that ended at this process's cumulative ``energy_j`` (one
        collective; may run on a log thread: it reads what it is given and the last window's end)."""
        last_j, last_samples, last_tokens, last_not_training_j = self._last
        local = [
            energy_j - self._start_j - not_training_j,
            energy_j - last_j - (not_training_j - last_not_training_j),
            samples - last_samples,
            tokens - last_tokens,
            energy_j,
        ]
        train_j, window_j, window_samples, window_tokens, total_j = reduce(local)
        self._last = (energy_j, samples, tokens, not_training_j)
        metrics = {"carbon/gco2e": M.carbon_g(total_j, self.carbon_intensity_g_per_kwh, self.pue)}
        if self.n_params:
            metrics["efficiency/eer_j_per_param"] = M.eer_j_per_param(train_j, self.n_params)
        if self.counts_samples:
            metrics["efficiency/samples_per_j"] = M.per_joule(window_samples, window_j)
        if self.counts_tokens:
            metrics["efficiency/tokens_per_j"] = M.per_joule(window_tokens, window_j)
        return metrics

    def totals(self, energy_j: float, reduce: Reduce) -> dict[str, float]:
        """The run's figures, summed over processes (one collective): training energy, samples, tokens,
        their rates, EER and carbon; counts never given are left out."""
        summed: Sequence[float] = reduce([self.train_j(energy_j), self.samples(), self.tokens(), energy_j])
        train_j, samples, tokens, total_j = summed
        out = {
            "train_energy_j": train_j,
            "carbon_gco2e": M.carbon_g(total_j, self.carbon_intensity_g_per_kwh, self.pue),
        }
        if self.n_params:
            out.update(
                n_params=self.n_params,
                eer_j_per_param=M.eer_j_per_param(train_j, self.n_params),
                eer_kwh_per_param=M.eer_j_per_param(M.kwh(train_j), self.n_params),
            )
        if self.counts_samples:
            out.update(train_samples=samples, samples_per_j=M.per_joule(samples, train_j))
        if self.counts_tokens:
            out.update(train_tokens=tokens, tokens_per_j=M.per_joule(tokens, train_j))
        return out

    def rows(self, results: dict[str, float], source: str) -> list[dict]:
        """The summary's ``efficiency`` section: each figure of :meth:`totals` with its energy's source
        (counts have none), then the carbon settings."""
        counts = ("train_samples", "train_tokens", "n_params")
        rows = [{"figure": k, "value": v, "source": "" if k in counts else source} for k, v in results.items()]
        rows.append(
            {"figure": "carbon_intensity_g_per_kwh", "value": self.carbon_intensity_g_per_kwh, "source": "setting"}
        )
        rows.append({"figure": "pue", "value": self.pue, "source": "setting"})
        return rows
