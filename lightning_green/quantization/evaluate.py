"""Loss, time and energy per sample of the float and the converted model, and the QAT report.

:class:`QatReport` is the one record of a preparation and conversion: :meth:`QatReport.metrics`
gives the logged metrics and :meth:`QatReport.summary_rows` the summary table, both from the one
:data:`FIGURES` table. :func:`evaluate` runs the first validation dataloader itself (``self.log``
calls captured, not sent to the Trainer), under ``PowerSampler.measure_evaluation()`` when there is one
(so its energy is never counted as training energy).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.data import extract_batch_size

from lightning_green.distributed import reduce_sum

LossFn = Callable[[LightningModule, Any], torch.Tensor]

#: (report field, summary label, unit, field naming its energy source or ""). Every one is logged as
#: ``<prefix>/<field>`` when it is set.
FIGURES: tuple[tuple[str, str, str, str], ...] = (
    ("size_bytes_before", "size, float", "bytes", ""),
    ("size_bytes_after", "size, converted", "bytes", ""),
    ("size_ratio", "size ratio", "converted/float", ""),
    ("val_loss_float", "val loss, float", "loss", ""),
    ("val_loss_converted", "val loss, converted", "loss", ""),
    ("time_float_s", "time per sample, float", "s/sample", ""),
    ("time_converted_s", "time per sample, converted", "s/sample", ""),
    ("time_ratio", "time ratio", "converted/float", ""),
    ("kernel_decode_ratio", "kernel time at 1 token (setup micro-benchmark)", "converted/float", ""),
    ("kernel_prefill_ratio", "kernel time at 64 tokens (setup micro-benchmark)", "converted/float", ""),
    ("epi_float_j", "EPI, float", "J/sample", "epi_float_source"),
    ("epi_converted_j", "EPI, converted", "J/sample", "epi_converted_source"),
    ("epi_ratio", "EPI ratio", "converted/float", "epi_converted_source"),
    ("energy_j", "QAT phase energy", "J", "energy_source"),
)

#: The values of :attr:`QatReport.method`, and how the summary shows them.
METHODS = {
    "qat": "qat (quantization-aware training)",
    "ptq": "ptq (post-training quantization: no training step ran with fake quantization)",
}

#: The setup micro-benchmark's figures: measured by each run, never restored from a checkpoint.
KERNEL_FIGURES = ("kernel_decode_ratio", "kernel_prefill_ratio")
#: Figures set in setup, before a checkpoint is restored: a resumed run keeps its own.
SETUP_FIGURES = ("scheme", "group_size", "layers_quantized", "layers_left_float", *KERNEL_FIGURES)


@dataclass
class QatReport:
    """Every figure of the last preparation and conversion; unset figures are ``None``.

    Reads like a mapping of the set figures (``report["size_ratio"]``, ``report.get("epi_ratio")``).
    """

    scheme: str | None = None
    group_size: int | None = None
    #: ``"qat"``: converted after training with fake quantization; ``"ptq"``: converted without it
    #: (post-training quantization: the model was never trained with fake quantization on).
    method: str | None = None
    layers_quantized: list[str] = field(default_factory=list)
    layers_left_float: list[str] = field(default_factory=list)
    fake_quant_from_step: int | None = None
    converted_at_step: int | None = None
    kernel_decode_ratio: float | None = None
    kernel_prefill_ratio: float | None = None
    size_bytes_before: int | None = None
    size_bytes_after: int | None = None
    size_ratio: float | None = None
    val_samples: int | None = None
    val_loss_float: float | None = None
    val_loss_converted: float | None = None
    time_float_s: float | None = None
    time_converted_s: float | None = None
    time_ratio: float | None = None
    epi_float_j: float | None = None
    epi_converted_j: float | None = None
    epi_ratio: float | None = None
    epi_float_source: str | None = None
    epi_converted_source: str | None = None
    energy_j: float | None = None
    energy_source: str | None = None
    export_path: str | None = None
    export_bytes: int | None = None

    def __getitem__(self, key: str) -> Any:
        value = getattr(self, key) if key in self._names() else None
        if value is None:
            raise KeyError(key)
        return value

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key in self._names() and getattr(self, key) is not None

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default

    @classmethod
    def from_dict(cls, figures: Mapping[str, Any]) -> QatReport:
        """A report of the known figures in ``figures`` (as :meth:`as_dict` wrote them)."""
        return cls(**{k: v for k, v in figures.items() if k in cls._names()})

    def as_dict(self) -> dict[str, Any]:
        """The set figures."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    def restored(self, checkpoint: Mapping[str, Any]) -> QatReport:
        """The report a checkpoint's figures give in this run: its kernel timings are dropped (a run
        times the kernels itself, in setup) and this report's :data:`SETUP_FIGURES` that are set
        stay (they describe the model as this run prepared it)."""
        kept = {k: v for k, v in checkpoint.items() if k not in KERNEL_FIGURES}
        report = QatReport.from_dict(kept)
        for key in SETUP_FIGURES:
            value = getattr(self, key)
            if value is not None and value != []:
                setattr(report, key, value)
        return report

    def update(self, **figures: Any) -> None:
        for key, value in figures.items():
            if key not in self._names():
                raise KeyError(f"QatReport has no figure {key!r}")
            setattr(self, key, value)

    def set_evaluation(self, tag: str, figures: Mapping[str, Any]) -> None:
        """Store :func:`evaluate`'s figures for ``tag`` (``"float"`` or ``"converted"``), then the ratios."""
        self.val_samples = figures.get("samples", self.val_samples)
        setattr(self, f"val_loss_{tag}", figures.get("loss"))
        setattr(self, f"time_{tag}_s", figures.get("time_s"))
        setattr(self, f"epi_{tag}_j", figures.get("epi_j"))
        setattr(self, f"epi_{tag}_source", figures.get("source"))
        self.time_ratio = _ratio(self.time_converted_s, self.time_float_s)
        self.epi_ratio = _ratio(self.epi_converted_j, self.epi_float_j)

    def metrics(self, prefix: str) -> dict[str, float]:
        """The logged metrics: ``<prefix>/<figure>`` for every set figure of :data:`FIGURES`."""
        return {f"{prefix}/{key}": float(getattr(self, key)) for key, *_ in FIGURES if getattr(self, key) is not None}

    def summary_rows(self) -> list[dict[str, Any]]:
        """One row per set figure of :data:`FIGURES` (figure, value, unit, source), after a first row
        saying how the model was quantized when that is known."""
        rows = []
        if self.method is not None:
            rows.append({"figure": "method", "value": METHODS[self.method], "unit": "", "source": ""})
        for key, label, unit, src in FIGURES:
            if getattr(self, key) is not None:
                source = getattr(self, src) if src else None
                rows.append({"figure": label, "value": getattr(self, key), "unit": unit, "source": source or ""})
        return rows

    @classmethod
    def _names(cls) -> set[str]:
        return {f.name for f in fields(cls)}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def state_dict_size_bytes(module: torch.nn.Module) -> int:
    """Bytes ``torch.save(module.state_dict())`` writes, counted without keeping them in memory."""
    counter = _ByteCounter()
    torch.save(module.state_dict(), counter)
    return counter.count


class _ByteCounter:
    """A write-only file object that only counts what it is given."""

    def __init__(self) -> None:
        self.count = 0

    def write(self, data: bytes) -> int:
        self.count += len(data)
        return len(data)

    def flush(self) -> None:
        pass


class LogCapture:
    """Stands in for ``LightningModule.log``/``log_dict`` while :func:`evaluate` runs ``validation_step``."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}

    def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        self.values[name] = value

    def log_dict(self, dictionary: Mapping[str, Any], *args: Any, **kwargs: Any) -> None:
        self.values.update(dictionary)


def step_loss(output: Any, logged: Mapping[str, Any]) -> torch.Tensor | None:
    """The loss of one ``validation_step`` call: its returned scalar, its returned ``"loss"``, or the
    value it logged as ``val_loss`` (then ``val/loss``, ``loss``, then any key holding ``loss``)."""
    if isinstance(output, torch.Tensor) and output.numel() == 1:
        return output
    if isinstance(output, Mapping) and isinstance(output.get("loss"), torch.Tensor):
        return output["loss"]
    keys = [k for k in ("val_loss", "val/loss", "loss") if k in logged] + [k for k in logged if "loss" in k]
    for key in keys:
        value = logged[key]
        if isinstance(value, (int, float)):
            return torch.tensor(float(value))
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            return value
    return None


class EnergyProbe:
    """The QAT callback's use of a ``PowerSampler`` (or of none): failures warn once and give ``None``."""

    def __init__(self, sampler: Any = None) -> None:
        self.sampler = sampler
        self._warned = False
        #: Energy of the QAT phase before this run (from a checkpoint, or earlier fits), J.
        self.prior_j = 0.0
        self._start_j: float | None = None
        self.trainer: Trainer | None = None

    def bind(self, trainer: Trainer) -> None:
        """The Trainer counted for: its collectives sum checkpointed energy, its rank carries restored energy."""
        self.trainer = trainer

    def checkpoint_j(self) -> float | None:
        """The QAT phase's energy so far, all ranks (a collective while the process group is up)."""
        local = self.so_far_j()
        return local if self.trainer is None else reduce_sum_optional(self.trainer, local)

    def restore_j(self, total_j: float) -> None:
        """All ranks' energy from a checkpoint, carried once (by global rank 0) so the sum at conversion
        counts it once, whatever the world size now."""
        self.prior_j = total_j if self.trainer is None or self.trainer.global_rank == 0 else 0.0

    # spawn pickles callbacks: the Trainer is bound again in setup
    def __getstate__(self) -> dict:
        return {**self.__dict__, "trainer": None}

    def attach(self, sampler: Any) -> None:
        """Use ``sampler`` from now on and start counting the QAT phase, unless it already counts."""
        self.sampler = sampler
        if self._start_j is None:
            self._start_j = self.now_j()

    def so_far_j(self) -> float | None:
        """Energy of the QAT phase on this rank: earlier runs plus this one."""
        now = self.now_j() if self._start_j is not None else None
        if now is None or self._start_j is None:
            return self.prior_j or None
        return self.prior_j + now - self._start_j

    def close_phase(self) -> float | None:
        """End the QAT phase's count (at the conversion); later fits add to it."""
        energy_j = self.so_far_j()
        self.prior_j = energy_j or 0.0
        self._start_j = None
        return energy_j

    def warn(self, err: BaseException) -> None:
        if not self._warned:
            self._warned = True
            rank_zero_warn(f"QuantizationAwareTraining: energy figures skipped, the PowerSampler failed: {err!r}")

    def now_j(self) -> float | None:
        if self.sampler is None:
            return None
        try:
            # unmoved by a checkpoint restored mid-fit
            return float(self.sampler.measured_now_j())
        # monitoring never stops training
        except Exception as err:
            self.warn(err)
            return None

    def sources(self, measurement: Any = None) -> str | None:
        """Where a figure comes from: the measurement's sources, else the sampler's."""
        if measurement is not None and measurement.sources:
            return "+".join(sorted(set(map(str, measurement.sources))))
        return self.sampler.sources() if self.sampler is not None else None

    @contextlib.contextmanager
    def measure(self) -> Iterator[Any]:
        """``sampler.measure_evaluation()``; yields ``None`` without a sampler or when it fails."""
        stack = contextlib.ExitStack()
        measurement = None
        if self.sampler is not None:
            try:
                measurement = stack.enter_context(self.sampler.measure_evaluation())
            # monitoring never stops training
            except Exception as err:
                self.warn(err)
        holder = [measurement]
        try:
            yield holder
        finally:
            try:
                stack.close()
            # monitoring never stops training
            except Exception as err:
                self.warn(err)
                holder[0] = None

    def add_summary(self, title: str, rows: list[dict[str, Any]], section_id: str, fields: dict[str, Any]) -> None:
        if self.sampler is None:
            return
        try:
            self.sampler.add_summary_section(title, rows, section_id=section_id, fields=fields)
        # monitoring never stops training
        except Exception as err:
            self.warn(err)


def evaluate(trainer: Trainer, model: LightningModule, probe: EnergyProbe, loss_fn: LossFn | None) -> dict[str, Any]:
    """Validation loss, seconds and joules per sample of ``model`` over the first validation dataloader,
    summed over ranks: ``{"samples", "loss", "time_s", "epi_j", "source"}`` (what could be measured)."""
    batches = validation_batches(trainer)
    if batches is None or (loss_fn is None and not _overrides(model, "validation_step")):
        return {}
    loss_sum, samples, missing_loss = 0.0, 0, False
    was_training = model.training
    model.eval()
    with probe.measure() as holder, torch.inference_mode():
        t0 = time.perf_counter()
        try:
            for batch_idx, batch in batches:
                batch = trainer.strategy.batch_to_device(batch)
                loss = _batch_loss(model, batch, batch_idx, loss_fn)
                n = _batch_size(batch)
                samples += n
                if loss is None:
                    missing_loss = True
                else:
                    loss_sum += float(loss.detach().float()) * n
        finally:
            elapsed_s = time.perf_counter() - t0
            model.train(was_training)
    measurement = holder[0]
    energy_j = measurement.energy_j if measurement is not None else None
    loss_sum, samples_all, energy_j, elapsed_s = _reduce_sum(trainer, [loss_sum, float(samples), energy_j, elapsed_s])
    figures: dict[str, Any] = {"samples": int(samples_all)}
    if samples_all <= 0:
        return figures
    figures["time_s"] = elapsed_s / samples_all
    if missing_loss:
        rank_zero_warn(
            "QuantizationAwareTraining: validation_step returned no loss and logged none named like 'val_loss';"
            " pass `loss_fn` to get qat/val_loss_* figures."
        )
    else:
        figures["loss"] = loss_sum / samples_all
    if energy_j is not None:
        figures["epi_j"] = energy_j / samples_all
        figures["source"] = probe.sources(measurement)
    return figures


def _batch_loss(model: LightningModule, batch: Any, batch_idx: int, loss_fn: LossFn | None) -> torch.Tensor | None:
    if loss_fn is not None:
        return loss_fn(model, batch)
    capture = LogCapture()
    model.log, model.log_dict = capture.log, capture.log_dict  # type: ignore[method-assign]
    try:
        output = model.validation_step(batch, batch_idx)
    finally:
        del model.log, model.log_dict
    return step_loss(output, capture.values)


def validation_batches(trainer: Trainer) -> Iterator[tuple[int, Any]] | None:
    """``(batch_idx, batch)`` of the first validation dataloader, as many as ``limit_val_batches`` allows."""
    # no-op when validation already ran
    trainer.fit_loop.epoch_loop.val_loop.setup_data()
    loaders = trainer.val_dataloaders
    if loaders is None:
        return None
    if isinstance(loaders, Mapping):
        loaders = list(loaders.values())
    loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
    limits = trainer.num_val_batches
    limit = limits[0] if limits else float("inf")
    if limit == 0:
        return None

    def batches() -> Iterator[tuple[int, Any]]:
        for batch_idx, batch in enumerate(loader):
            if batch_idx >= limit:
                return
            yield batch_idx, batch

    return batches()


def _batch_size(batch: Any) -> int:
    try:
        return int(extract_batch_size(batch))
    except Exception:
        return 1


def _overrides(model: torch.nn.Module, name: str) -> bool:
    method = getattr(type(model), name, None)
    return method is not None and method is not getattr(LightningModule, name, None)


def reduce_sum_optional(trainer: Trainer, value: float | None) -> float | None:
    """``value`` summed over all ranks; ``None`` on any rank gives ``None``."""
    return _reduce_sum(trainer, [value])[0]


def _reduce_sum(trainer: Trainer, values: list[float | None]) -> list[float | None]:
    sums = reduce_sum(trainer, [math.nan if v is None else float(v) for v in values])
    return [None if math.isnan(v) else v for v in sums]
