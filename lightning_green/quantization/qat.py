"""Quantization-aware training (QAT) as a Lightning callback, on top of ``torchao``.

The callback is glue: it decides *when* to prepare, turn fake quantization on, and convert; the
``torchao`` calls live in :mod:`lightning_green.quantization._torchao`; the figures (sizes, losses,
energy per inference) are computed by small helpers here that need no Trainer.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.data import extract_batch_size
from torch import nn
from typing_extensions import override

from lightning_green.callbacks._dist import reduce_sum
from lightning_green.callbacks.power import find_power_sampler
from lightning_green.quantization import _torchao

FilterFn = Callable[[nn.Module, str], bool]
LossFn = Callable[[LightningModule, Any], torch.Tensor]


def state_dict_size_bytes(module: nn.Module) -> int:
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


class _LogCapture:
    """Stands in for ``LightningModule.log``/``log_dict`` while the callback runs ``validation_step``
    itself: nothing reaches the Trainer's results, the values are kept for :func:`_step_loss`."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}

    def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        self.values[name] = value

    def log_dict(self, dictionary: Mapping[str, Any], *args: Any, **kwargs: Any) -> None:
        self.values.update(dictionary)


def _step_loss(output: Any, logged: Mapping[str, Any]) -> Optional[torch.Tensor]:
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


def _is_power_of_two(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0 and value & (value - 1) == 0


class QuantizationAwareTraining(Callback):
    r"""Train with fake quantization, then convert the model to a quantized one, with ``torchao``.

    The model is prepared in :meth:`setup` (``stage="fit"``), before the optimizers are built and
    before a distributed strategy wraps it: the selected ``nn.Linear`` layers (and, with
    ``quantize_embeddings``, ``nn.Embedding`` layers) are swapped for fake-quantized ones whose
    parameters keep their names, so float checkpoints load into the prepared model and the other way
    round. Fake quantization stays off until ``trainer.global_step >= start_step``.

    At the end of training (``convert_on_fit_end=True``, in ``on_train_end`` so a ``PowerSampler``
    is still measuring) the callback measures the float model (fake quantization off), converts the
    model in place, measures it again and logs the figures below. Conversion never happens in the
    middle of training; with ``convert_on_fit_end=False`` call :meth:`convert` or :meth:`export` after
    ``fit`` (they record sizes only). :meth:`prepare` prepares a model outside a Trainer (Fabric, a
    plain loop).

    Checkpoints: a checkpoint taken mid-QAT holds float weights under the usual names and resumes
    with ``trainer.fit(ckpt_path=...)``. A checkpoint saved after conversion holds quantized
    weights (written as plain tensors, because Lightning loads checkpoints with a callable
    ``map_location`` that torch cannot apply to tensor subclasses); while this callback is in the
    Trainer, ``trainer.test/validate/predict(ckpt_path=...)`` converts the model just before the
    weights load, and ``trainer.fit(ckpt_path=...)`` continues training from the dequantized weights
    (with a warning). Calling ``trainer.fit`` again after a conversion does the same: the float
    weights from before the conversion are gone, training goes on from the quantized values.
    Weights-only checkpoints (``save_weights_only=True``) of a converted model skip the callback's
    hooks and cannot be loaded by Lightning: use full checkpoints or :meth:`export`.

    Validation loss: the callback runs the first validation dataloader itself (as many batches as
    the Trainer's ``limit_val_batches`` allows) and takes each batch's loss from ``loss_fn(module,
    batch)`` when given, otherwise from ``validation_step``: its returned scalar tensor, its returned
    ``"loss"``, or the value it logs as ``val_loss`` (``self.log`` calls are captured, not sent to the
    Trainer). The loss is averaged over samples, across all ranks. With no validation loop the loss
    and EPI figures are skipped.

    Energy: with a ``PowerSampler`` in the Trainer, the same validation batches are timed under
    ``PowerSampler.measure()`` for the float and the converted model; EPI is joules per sample (first
    dimension of the batch), summed over ranks. ``qat/energy_j`` is the energy of training with this
    callback, from each fit's ``on_fit_start`` to its end of training, up to the conversion: summed
    over fits, over ranks and over resumed runs (a resumed run takes rank 0's earlier share for every
    rank). Without a ``PowerSampler`` the energy figures are skipped.

    Under ``ddp_spawn``/``ddp_fork`` the main process cannot load quantized weights from a worker,
    so the workers convert a copy for the figures and the model that returns to the main process
    is the trained float model: call :meth:`convert` on it.

    Layers built in ``LightningModule.setup`` or ``configure_model`` do not exist yet when this
    callback prepares the model (Lightning calls callbacks first): build them in ``__init__``.

    **Logged metrics** (through ``trainer.loggers``, at the step of the conversion; ``<prefix>``
    is ``qat``):

    - ``qat/size_bytes_before`` (bytes): serialised ``state_dict`` of the float model.
    - ``qat/size_bytes_after`` (bytes): serialised ``state_dict`` of the converted model.
    - ``qat/size_ratio`` (ratio): after / before.
    - ``qat/val_loss_float`` (the module's loss unit): validation loss without fake quantization
      (with a validation loop; so is the next one).
    - ``qat/val_loss_converted`` (the module's loss unit): validation loss of the converted model.
    - ``qat/epi_float_j`` (J per sample): energy per inference of the float model (with a validation
      loop and a ``PowerSampler``; so are the next ones).
    - ``qat/epi_converted_j`` (J per sample): energy per inference of the converted model.
    - ``qat/energy_j`` (J): energy spent from the start of QAT to the conversion.

    Every figure, with the energy source of the energy ones, is also kept in :attr:`report` and, with a
    ``PowerSampler``, added to its end-of-run summary.

    Args:
        scheme: named quantization scheme, one of
            ``"int8_dynamic_int4_weight"`` (int8 dynamic activations, int4 per-group weights),
            ``"int4_weight_only"``, ``"int8_weight_only"`` (per channel) and ``"float8_dynamic"``
            (needs CUDA compute capability 8.9+).
        group_size: values per quantization group along ``in_features``, a power of two. Layers whose
            ``in_features`` is not a multiple of it stay in float (one warning lists them). Ignored by
            schemes that do not quantize in groups.
        start_step: optimizer step from which fake quantization is on; before it the prepared model
            computes in float.
        filter_fn: ``filter_fn(module, fqn) -> bool`` to choose layers among the eligible ones (names as
            in ``pl_module.named_modules()``), as in ``torchao.quantize_``.
        quantize_embeddings: also quantize ``nn.Embedding`` weights (weight only).
        convert_on_fit_end: convert the model when training ends.
        loss_fn: ``loss_fn(pl_module, batch) -> scalar tensor`` for the validation loss figures;
            ``None`` uses ``validation_step`` as described above.
        prefix: first part of every metric key.

    Raises:
        ValueError: ``scheme`` is unknown, ``group_size`` is not a positive power of two,
            ``start_step`` is negative, ``filter_fn``/``loss_fn`` is not callable, or
            ``quantize_embeddings`` is set for a scheme that cannot quantize embeddings; in
            :meth:`setup`, the scheme cannot run on the Trainer's device or the model has no layer to
            quantize.

    Example::

        from lightning_green import QuantizationAwareTraining

        qat = QuantizationAwareTraining(scheme="int8_dynamic_int4_weight", group_size=32, start_step=100)
        trainer = Trainer(max_steps=1000, callbacks=[qat])
        trainer.fit(model, datamodule=dm)  # converted at the end
        print(qat.report["size_ratio"], qat.report.get("val_loss_converted"))
        qat.export("model_int4.pt")
    """

    def __init__(
        self,
        scheme: str = "int8_dynamic_int4_weight",
        group_size: int = 32,
        start_step: int = 0,
        filter_fn: Optional[FilterFn] = None,
        quantize_embeddings: bool = False,
        convert_on_fit_end: bool = True,
        loss_fn: Optional[LossFn] = None,
        prefix: str = "qat",
    ) -> None:
        if not isinstance(scheme, str) or scheme not in _torchao.SCHEMES:
            raise ValueError(f"`scheme` must be one of {sorted(_torchao.SCHEMES)}, got {scheme!r}")
        if not _is_power_of_two(group_size):
            raise ValueError(f"`group_size` must be a positive power of two (16, 32, 64, 128, ...), got {group_size!r}")
        if not isinstance(start_step, int) or isinstance(start_step, bool) or start_step < 0:
            raise ValueError(f"`start_step` must be an integer >= 0, got {start_step!r}")
        if filter_fn is not None and not callable(filter_fn):
            raise ValueError(f"`filter_fn` must be None or a callable (module, fqn) -> bool, got {filter_fn!r}")
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError(f"`loss_fn` must be None or a callable (pl_module, batch) -> tensor, got {loss_fn!r}")
        if quantize_embeddings and not _torchao.SCHEMES[scheme].embeddings:
            allowed = [s.name for s in _torchao.SCHEMES.values() if s.embeddings]
            raise ValueError(
                f"`quantize_embeddings=True` needs a scheme that quantizes embeddings, one of {allowed}; got {scheme!r}"
            )
        self.scheme = scheme
        self.group_size = group_size
        self.start_step = start_step
        self.filter_fn = filter_fn
        self.quantize_embeddings = quantize_embeddings
        self.convert_on_fit_end = convert_on_fit_end
        self.loss_fn = loss_fn
        self.prefix = prefix
        #: Every figure of the last preparation and conversion (sizes, losses, EPI, energy, sources).
        self.report: dict[str, Any] = {}
        self._module: Optional[nn.Module] = None
        self._stage: Optional[str] = None
        self._fitting = False
        self._fake_quant_on: Optional[bool] = None
        self._load_hook: Any = None
        self._sampler: Any = None
        self._energy_start_j: Optional[float] = None
        self._energy_prior_j = 0.0
        self._energy_warned = False

    # ------------------------------------------------------------------ hooks

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._setup(trainer, pl_module, stage)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._fitting = True
        self._sampler = find_power_sampler(trainer)
        if self._energy_start_j is None:
            self._energy_start_j = self._energy_now_j()

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._sync_fake_quant(pl_module, trainer.global_step)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Before any callback's on_fit_end, so the PowerSampler is still measuring and its summary
        # is not written yet.
        self._fitting = False
        energy_j = self._close_energy_phase()
        if self.convert_on_fit_end and self._is_prepared(pl_module):
            self._convert_at_fit_end(trainer, pl_module, energy_j)

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._fitting = False

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._fitting = False
        if self._load_hook is not None:
            self._load_hook.remove()
            self._load_hook = None

    @override
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        # Lightning could not load the quantized tensors as they are (see _torchao.encode_quantized_tensors).
        _torchao.encode_quantized_tensors(checkpoint.get("state_dict", {}))

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "scheme": self.scheme,
            "group_size": self.group_size,
            "quantize_embeddings": self.quantize_embeddings,
            "start_step": self.start_step,
            "converted": self._module is not None and self._is_converted(self._module),
            "energy_j": self._energy_so_far_j(),
            "report": dict(self.report),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        mismatched = {
            key: state_dict[key]
            for key in ("scheme", "group_size", "quantize_embeddings")
            if key in state_dict and state_dict[key] != getattr(self, key)
        }
        if mismatched:
            rank_zero_warn(
                f"QuantizationAwareTraining: the checkpoint was written with {mismatched}; this callback uses"
                f" scheme={self.scheme!r}, group_size={self.group_size}, quantize_embeddings={self.quantize_embeddings}."
            )
        self._energy_prior_j = float(state_dict.get("energy_j") or 0.0)
        self.report = dict(state_dict.get("report") or {})

    # ------------------------------------------------------------------ public methods

    def prepare(self, model: nn.Module) -> nn.Module:
        """Prepare ``model`` for QAT outside a Trainer (Lightning Fabric or a plain loop), in place.

        The same layer selection, warning and errors as in :meth:`setup`. Fake quantization is on
        (``start_step`` is a Trainer notion); build the optimizer after this call. A model already
        prepared is returned as is.

        Args:
            model: the module to prepare.

        Returns:
            The same module, prepared.

        Raises:
            ValueError: the model has no layer to quantize.
        """
        if not self._is_prepared(model):
            self._prepare(model)
        self._module = model
        return model

    def float_copy(self, model: Optional[nn.Module] = None) -> nn.Module:
        """A deep copy of the prepared ``model`` with fake quantization off: the float model QAT trained,
        to compare against the converted one (call it before :meth:`convert`).

        Raises:
            RuntimeError: ``model`` is already converted (its float weights are gone), or there is no model.
        """
        model = self._resolve_model(model)
        if not self._is_prepared(model):
            raise RuntimeError("float_copy() needs a prepared model that is not converted yet: call it before convert()")
        duplicate = copy.deepcopy(model)
        _torchao.set_fake_quant_enabled(duplicate, False)
        return duplicate

    def convert(self, model: Optional[nn.Module] = None) -> nn.Module:
        """Convert ``model`` (default: the model of the last ``fit``) to its quantized form, in place.

        A model that is not prepared (a freshly built one, or the main-process model after
        ``ddp_spawn``) is prepared first, which amounts to post-training quantization of its current
        weights. A model already converted is returned as is. Sizes go to :attr:`report`.

        Args:
            model: the module to convert.

        Returns:
            The same module, converted.

        Raises:
            RuntimeError: called while ``trainer.fit`` is training, or with no model.
            ValueError: the model has no layer to quantize.
        """
        if self._fitting:
            raise RuntimeError(
                "QuantizationAwareTraining.convert() was called during training; conversion happens at the end of"
                " fit (convert_on_fit_end=True) or after trainer.fit() returns."
            )
        model = self._resolve_model(model)
        if self._is_converted(model) and not self._is_prepared(model):
            return model
        before = state_dict_size_bytes(model)
        self._convert_model(model)
        after = state_dict_size_bytes(model)
        self.report.update(
            scheme=self.scheme,
            group_size=self.group_size,
            size_bytes_before=before,
            size_bytes_after=after,
            size_ratio=after / before,
            energy_j=self._energy_so_far_j(),
        )
        return model

    def export(self, path: Union[str, Path], model: Optional[nn.Module] = None) -> Path:
        """Convert ``model`` if needed and write its ``state_dict`` to ``path`` with ``torch.save``.

        To load it, build the model, call :meth:`convert` on it, then ``model.load_state_dict(
        torch.load(path))``.

        Args:
            path: file to write.
            model: the module to export (default: the model of the last ``fit``).

        Returns:
            ``path`` as a :class:`~pathlib.Path`.

        Raises:
            RuntimeError: called while ``trainer.fit`` is training, or with no model.
        """
        model = self.convert(model)
        path = Path(path)
        torch.save(model.state_dict(), path)
        self.report["export_path"] = str(path)
        self.report["export_bytes"] = path.stat().st_size
        return path

    # ------------------------------------------------------------------ setup and prepare

    def _setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        device = trainer.strategy.root_device
        if not _torchao.device_can_run(self.scheme, device):
            raise ValueError(
                f"`scheme={self.scheme!r}` cannot run on device {device} ({_torchao.SCHEMES[self.scheme].requires});"
                f" schemes that can: {_torchao.schemes_for_device(device)}"
            )
        self._module = pl_module
        self._stage = stage
        if self._load_hook is None:
            self._load_hook = pl_module.register_load_state_dict_pre_hook(self._on_load_state_dict)
        if stage != "fit":
            return
        dequantized = _torchao.dequantize_(pl_module)
        if dequantized:
            rank_zero_warn(
                f"QuantizationAwareTraining: the model was already converted; training continues from the dequantized"
                f" weights of {len(dequantized)} parameter(s) (the float weights from before the conversion are gone)."
            )
        if not self._is_prepared(pl_module):
            self._prepare(pl_module)
        self._fake_quant_on = None
        self._sync_fake_quant(pl_module, trainer.global_step)

    def _select_layers(self, model: nn.Module) -> tuple[set[str], set[str], list[str]]:
        """Names of the Linear and Embedding layers to prepare, and descriptions of those left in float."""
        grouped = _torchao.SCHEMES[self.scheme].grouped
        linears: set[str] = set()
        embeddings: set[str] = set()
        misfits: list[str] = []
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear):
                width, kind, chosen = module.in_features, "in_features", linears
            elif isinstance(module, nn.Embedding) and self.quantize_embeddings:
                width, kind, chosen = module.embedding_dim, "embedding_dim", embeddings
            else:
                continue
            if isinstance(module, _torchao.fake_quantized_types()) or _torchao.is_quantized_tensor(module.weight):
                continue
            if self.filter_fn is not None and not self.filter_fn(module, name):
                continue
            if grouped and width % self.group_size != 0:
                misfits.append(f"{name or '<root>'} ({kind}={width})")
                continue
            chosen.add(name)
        return linears, embeddings, misfits

    def _prepare(self, model: nn.Module) -> None:
        linears, embeddings, misfits = self._select_layers(model)
        if misfits:
            rank_zero_warn(
                f"QuantizationAwareTraining: {len(misfits)} layer(s) left in float because their width is not a"
                f" multiple of group_size={self.group_size}: {', '.join(misfits)}"
            )
        if not linears and not embeddings:
            n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
            raise ValueError(
                f"QuantizationAwareTraining found no layer to quantize with scheme={self.scheme!r}: the model has"
                f" {n_linear} nn.Linear layer(s); {len(misfits)} do not fit group_size={self.group_size}"
                + ("; filter_fn excluded the rest" if self.filter_fn is not None else "")
                + ". Layers built in setup()/configure_model() are not created yet when the callback prepares the model."
            )
        _torchao.prepare(
            model,
            self.scheme,
            self.group_size,
            linear_filter=lambda _m, fqn: fqn in linears,
            embedding_filter=(lambda _m, fqn: fqn in embeddings) if embeddings else None,
        )
        self.report.update(
            scheme=self.scheme,
            group_size=self.group_size,
            layers_quantized=sorted(linears | embeddings),
            layers_left_float=misfits,
        )

    def _sync_fake_quant(self, model: nn.Module, global_step: int) -> None:
        enabled = global_step >= self.start_step
        if enabled != self._fake_quant_on:
            _torchao.set_fake_quant_enabled(model, enabled)
            self._fake_quant_on = enabled
            if enabled:
                self.report["fake_quant_from_step"] = global_step

    def _on_load_state_dict(self, module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """Make a checkpoint of a converted model load: dequantize it for training, convert the model otherwise."""
        _torchao.decode_quantized_tensors(state_dict, prefix)
        quantized = [k for k, v in state_dict.items() if k.startswith(prefix) and _torchao.is_quantized_tensor(v)]
        if not quantized:
            return
        if self._stage == "fit":
            for key in quantized:
                state_dict[key] = state_dict[key].dequantize()
            rank_zero_warn(
                "QuantizationAwareTraining: the checkpoint holds a converted model; training continues from its"
                f" dequantized weights ({len(quantized)} tensor(s))."
            )
        elif not self._is_converted(module):
            self._convert_model(module)

    # ------------------------------------------------------------------ convert and measure

    def _convert_model(self, model: nn.Module) -> None:
        if not self._is_prepared(model):
            self._prepare(model)
        _torchao.convert(model, self.scheme, self.group_size)

    def _convert_at_fit_end(self, trainer: Trainer, pl_module: LightningModule, energy_j: Optional[float]) -> None:
        sampler = self._sampler
        size_before = state_dict_size_bytes(pl_module)

        _torchao.set_fake_quant_enabled(pl_module, False)
        float_eval = self._evaluate(trainer, pl_module, sampler)
        _torchao.set_fake_quant_enabled(pl_module, True)
        self._fake_quant_on = True

        target = pl_module
        if _is_spawn_launched(trainer):
            target = copy.deepcopy(pl_module)
            target.trainer = trainer
            rank_zero_warn(
                "QuantizationAwareTraining: under a spawn/fork launcher the main process cannot load quantized weights,"
                " so the figures come from a converted copy and the model returned by fit is the trained float model:"
                " call `qat.convert(model)` on it."
            )
        _torchao.convert(target, self.scheme, self.group_size)
        size_after = state_dict_size_bytes(target)
        converted_eval = self._evaluate(trainer, target, sampler)
        if target is not pl_module:
            target.trainer = None  # type: ignore[assignment]

        energy_j = _reduce_sum(trainer, energy_j)
        report: dict[str, Any] = {
            "scheme": self.scheme,
            "group_size": self.group_size,
            "converted_at_step": trainer.global_step,
            "size_bytes_before": size_before,
            "size_bytes_after": size_after,
            "size_ratio": size_after / size_before,
        }
        for tag, figures in (("float", float_eval), ("converted", converted_eval)):
            if figures.get("loss") is not None:
                report[f"val_loss_{tag}"] = figures["loss"]
            if figures.get("epi_j") is not None:
                report[f"epi_{tag}_j"] = figures["epi_j"]
                report[f"epi_{tag}_source"] = figures["source"]
            report["val_samples"] = figures.get("samples")
        if energy_j is not None:
            report["energy_j"] = energy_j
            report["energy_source"] = _sources_label(sampler)
        self.report.update(report)
        self._log(trainer, report)
        self._add_summary(sampler, report)

    def _evaluate(self, trainer: Trainer, model: LightningModule, sampler: Any) -> dict[str, Any]:
        """Validation loss and energy per sample of ``model`` over the first validation dataloader."""
        batches = _validation_batches(trainer)
        if batches is None or (self.loss_fn is None and not _overrides(model, "validation_step")):
            return {}
        loss_sum, samples, missing_loss = 0.0, 0, False
        was_training = model.training
        model.eval()
        m, stack = self._enter_measure(sampler)
        try:
            with torch.inference_mode():
                for batch_idx, batch in batches:
                    batch = trainer.strategy.batch_to_device(batch)
                    loss = self._batch_loss(model, batch, batch_idx)
                    n = _batch_size(batch)
                    samples += n
                    if loss is None:
                        missing_loss = True
                    else:
                        loss_sum += float(loss.detach().float()) * n
        finally:
            model.train(was_training)
            try:
                stack.close()
            except Exception as err:  # monitoring never stops training
                self._warn_energy(err)
                m = _NoMeasurement()
        totals = _reduce_sum(trainer, [loss_sum, float(samples), getattr(m, "energy_j", None)])
        loss_sum, samples_all, energy_j = totals[0], totals[1], totals[2]
        figures: dict[str, Any] = {"samples": int(samples_all)}
        if missing_loss:
            rank_zero_warn(
                "QuantizationAwareTraining: validation_step returned no loss and logged none named like 'val_loss';"
                " pass `loss_fn` to get qat/val_loss_* figures."
            )
        elif samples_all > 0:
            figures["loss"] = loss_sum / samples_all
        if energy_j is not None and samples_all > 0:
            figures["epi_j"] = energy_j / samples_all
            figures["source"] = _sources_label(sampler, m)
        return figures

    def _batch_loss(self, model: LightningModule, batch: Any, batch_idx: int) -> Optional[torch.Tensor]:
        if self.loss_fn is not None:
            return self.loss_fn(model, batch)
        capture = _LogCapture()
        model.log, model.log_dict = capture.log, capture.log_dict  # type: ignore[method-assign]
        try:
            output = model.validation_step(batch, batch_idx)
        finally:
            del model.log, model.log_dict
        return _step_loss(output, capture.values)

    # ------------------------------------------------------------------ energy

    def _enter_measure(self, sampler: Any) -> tuple[Any, contextlib.ExitStack]:
        """Enter ``sampler.measure()``; a missing or failing sampler gives an empty measurement."""
        stack = contextlib.ExitStack()
        if sampler is None:
            return _NoMeasurement(), stack
        try:
            return stack.enter_context(sampler.measure()), stack
        except Exception as err:  # monitoring never stops training
            self._warn_energy(err)
            return _NoMeasurement(), stack

    def _energy_now_j(self) -> Optional[float]:
        if self._sampler is None:
            return None
        try:
            return float(self._sampler.energy_now_j())
        except Exception as err:  # monitoring never stops training
            self._warn_energy(err)
            return None

    def _energy_so_far_j(self) -> Optional[float]:
        """Energy of the QAT phase on this rank: earlier runs (from the checkpoint) plus this one."""
        now = self._energy_now_j() if self._energy_start_j is not None else None
        if now is None or self._energy_start_j is None:
            return self._energy_prior_j or None
        return self._energy_prior_j + now - self._energy_start_j

    def _close_energy_phase(self) -> Optional[float]:
        """End the QAT phase's energy count (at conversion); later fits add to it."""
        energy_j = self._energy_so_far_j()
        self._energy_prior_j = energy_j or 0.0
        self._energy_start_j = None
        return energy_j

    def _warn_energy(self, err: BaseException) -> None:
        if not self._energy_warned:
            self._energy_warned = True
            rank_zero_warn(f"QuantizationAwareTraining: energy figures skipped, the PowerSampler failed: {err!r}")

    # ------------------------------------------------------------------ reporting

    def _log(self, trainer: Trainer, report: Mapping[str, Any]) -> None:
        names = (
            "size_bytes_before", "size_bytes_after", "size_ratio", "val_loss_float", "val_loss_converted",
            "epi_float_j", "epi_converted_j", "energy_j",
        )  # fmt: skip
        metrics = {f"{self.prefix}/{k}": float(report[k]) for k in names if report.get(k) is not None}
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def _add_summary(self, sampler: Any, report: Mapping[str, Any]) -> None:
        if sampler is None:
            return
        rows = []
        for key, figure, unit in (
            ("size_bytes_before", "size, float", "bytes"),
            ("size_bytes_after", "size, converted", "bytes"),
            ("size_ratio", "size ratio", "converted/float"),
            ("val_loss_float", "val loss, float", "loss"),
            ("val_loss_converted", "val loss, converted", "loss"),
            ("epi_float_j", "EPI, float", "J/sample"),
            ("epi_converted_j", "EPI, converted", "J/sample"),
            ("energy_j", "QAT phase energy", "J"),
        ):
            if report.get(key) is None:
                continue
            source = {
                "epi_float_j": report.get("epi_float_source"),
                "epi_converted_j": report.get("epi_converted_source"),
                "energy_j": report.get("energy_source"),
            }.get(key, "")
            rows.append({"figure": figure, "value": report[key], "unit": unit, "source": source or ""})
        try:
            sampler.add_summary_section(f"Quantization-aware training ({self.scheme})", rows)
        except Exception as err:  # monitoring never stops training
            self._warn_energy(err)

    # ------------------------------------------------------------------ model state

    def _resolve_model(self, model: Optional[nn.Module]) -> nn.Module:
        if model is None:
            model = self._module
        if model is None:
            raise RuntimeError("QuantizationAwareTraining.convert()/export() needs a model: none was given or fitted.")
        return model

    @staticmethod
    def _is_prepared(model: nn.Module) -> bool:
        types = _torchao.fake_quantized_types()
        return any(isinstance(m, types) for m in model.modules())

    @staticmethod
    def _is_converted(model: nn.Module) -> bool:
        return any(_torchao.is_quantized_tensor(p) for p in model.parameters())


class _NoMeasurement:
    """Context manager standing in for ``PowerSampler.measure()`` when there is no sampler."""

    energy_j = None
    sources: list[str] = []

    def __enter__(self) -> _NoMeasurement:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


def _validation_batches(trainer: Trainer) -> Optional[Iterator[tuple[int, Any]]]:
    """``(batch_idx, batch)`` of the first validation dataloader, as many as ``limit_val_batches`` allows."""
    val_loop = trainer.fit_loop.epoch_loop.val_loop
    val_loop.setup_data()  # no-op when validation already ran
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


def _overrides(model: nn.Module, name: str) -> bool:
    method = getattr(type(model), name, None)
    return method is not None and method is not getattr(LightningModule, name, None)


def _is_spawn_launched(trainer: Trainer) -> bool:
    """Whether the workers' weights are sent back to a main process that loads them (ddp_spawn, ddp_fork)."""
    try:
        from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
    except ImportError:  # pragma: no cover - moved in a future Lightning
        return False
    return isinstance(getattr(trainer.strategy, "launcher", None), _MultiProcessingLauncher)


def _reduce_sum(trainer: Trainer, values: Any) -> Any:
    """Sum a float (or a list of floats) over all ranks; ``None`` on any rank gives ``None``."""
    single = not isinstance(values, list)
    items = [values] if single else values
    sums = reduce_sum(trainer, [math.nan if v is None else float(v) for v in items])
    out = [None if math.isnan(v) else v for v in sums]
    return out[0] if single else out


def _sources_label(sampler: Any, measurement: Any = None) -> Optional[str]:
    """Where an energy figure comes from: the measurement's sources, else the sampler's sensors'."""
    sources = list(getattr(measurement, "sources", None) or [])
    if not sources and sampler is not None:
        sources = [getattr(sensor, "source", "?") for sensor in getattr(sampler, "sensors", [])]
    return "+".join(sorted(set(map(str, sources)))) or None


__all__ = ["QuantizationAwareTraining", "state_dict_size_bytes"]
