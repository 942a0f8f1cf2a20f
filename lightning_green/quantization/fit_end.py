"""The conversion at the end of a QAT fit, around the callback: which module is converted, and how its
figures are published (kept in the report, logged, added to the PowerSampler's summary)."""

from __future__ import annotations

import copy

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn

from lightning_green import run_summary as rs
from lightning_green.log_queue import log_metrics
from lightning_green.quantization.evaluate import EnergyProbe, QatReport, reduce_sum_optional

__all__ = ["conversion_target", "publish_conversion"]


def conversion_target(trainer: Trainer, pl_module: LightningModule) -> LightningModule:
    """The module to convert at the end of fit: itself, or a copy under ddp_spawn/ddp_fork (the main
    process could not load the workers' quantized weights)."""
    # Lightning's launcher class, private to it: imported where it is checked
    from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

    if not isinstance(trainer.strategy.launcher, _MultiProcessingLauncher):
        return pl_module
    target = copy.deepcopy(pl_module)
    target.trainer = trainer
    rank_zero_warn(
        "QuantizationAwareTraining: under a spawn/fork launcher the main process cannot load quantized weights,"
        " so the figures come from a converted copy and the model returned by fit is the trained float model:"
        " call `qat.convert(model)` on it."
    )
    return target


def publish_conversion(
    trainer: Trainer,
    report: QatReport,
    probe: EnergyProbe,
    *,
    method: str,
    scheme: str,
    size_before: int,
    size_after: int,
    energy_j: float | None,
    prefix: str,
) -> None:
    """The conversion at the end of fit is done: its sizes, step and QAT energy (``energy_j`` of this
    process, summed over processes: a collective) go to ``report``, which global rank 0 logs under
    ``prefix``; the report's rows go to the PowerSampler's summary as the ``qat`` section."""
    energy_j = reduce_sum_optional(trainer, energy_j)
    report.update(
        method=method,
        converted_at_step=trainer.global_step,
        size_bytes_before=size_before,
        size_bytes_after=size_after,
        size_ratio=size_after / size_before,
        energy_j=energy_j,
        energy_source=probe.sources() if energy_j is not None else None,
    )
    if trainer.is_global_zero:
        log_metrics(trainer, report.metrics(prefix))
    probe.add_summary(
        f"{rs.QAT_TITLE} ({scheme})",
        report.summary_rows(),
        section_id=rs.QAT,
        fields={"scheme": scheme},
    )
