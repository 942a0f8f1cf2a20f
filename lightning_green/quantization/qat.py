"""Quantization-aware training (QAT) as a Lightning callback.

The callback is glue: it decides *when* to choose the scheme, prepare, turn fake quantization on,
convert, and how a checkpoint loads. The scheme table is :mod:`.schemes`, the kernel micro-benchmark
:mod:`.kernels`, layer selection and the two backends :mod:`.layers` (torch int8: :mod:`.int8`;
``torchao``: ``_torchao.py``), the figures :mod:`.evaluate`, the checkpoints (load hooks and the
callback's state) :mod:`.checkpoints`, the module converted at fit end and how its figures are published
:mod:`.fit_end`.

**Scheme.** ``scheme="auto"`` (the default) times the candidate kernels on the model's own Linear
shapes in :meth:`setup` (a few tens of ms) and keeps the fastest: on CPU torch's dynamic int8
kernel (``"int8_dynamic"``: fbgemm/onednn on x86), on CUDA the ``torchao`` schemes. An explicit
scheme is timed too and a warning says when its converted model will be slower than float. The
fake quantization computes what the deployed kernel computes.

**Layers.** Every ``nn.Linear`` (and with ``quantize_embeddings`` every ``nn.Embedding``) that
``filter_fn`` keeps, except layers whose weight is read outside their own ``forward``
(``nn.MultiheadAttention.out_proj``, tied weights) and, for grouped schemes, widths that are not a
multiple of ``group_size``: those stay float, with one warning and ``report["layers_left_float"]``.
The model is prepared in ``setup("fit")``, before the optimizers and any DDP wrapper; parameter
names do not change. Fake quantization is on from ``trainer.global_step >= start_step``. Layers
built in ``configure_model`` do not exist yet then: build them in ``__init__``.

**Conversion** happens in ``on_train_end`` (``convert_on_fit_end=True``; a ``PowerSampler`` is
still measuring), or through :meth:`convert` / :meth:`export`. Under ``ddp_spawn``/``ddp_fork``
the workers convert a copy for the figures; call :meth:`convert` on the returned model.

**Checkpoints.** ``trainer.test/validate/predict(ckpt_path=...)`` with this callback in the Trainer
evaluates the converted model of that file's weights, whatever the file holds: float weights
(``ModelCheckpoint``'s ``last``/``best`` written during a QAT fit, before the conversion) are loaded
and then converted; a converted model's weights are loaded into a converted model. This holds in
the Trainer that ran ``fit`` and in a fresh Trainer with a fresh model. ``eval_as="float"``
evaluates the float model instead (fake quantization off; a converted file is dequantized).
``trainer.fit(ckpt_path=...)`` resumes mid-QAT; from a converted file it continues from the
dequantized weights, with a warning. Weights-only checkpoints skip the callback: use full ones.

**Figures** (validation loss, seconds and energy per sample of the float and the converted model,
over the first validation dataloader as ``limit_val_batches`` allows, summed over ranks; the loss
from ``loss_fn(module, batch)`` or from ``validation_step``'s return or its logged ``val_loss``)
are kept in :attr:`report` (a :class:`~.evaluate.QatReport`), logged through ``trainer.loggers``
at the conversion step, and added to the ``PowerSampler`` summary with each energy figure's source.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_green.callbacks.power import find_power_sampler
from lightning_green.quantization import layers
from lightning_green.quantization.checkpoints import QatCheckpoints
from lightning_green.quantization.evaluate import (
    EnergyProbe,
    LossFn,
    QatReport,
    evaluate,
    state_dict_size_bytes,
)
from lightning_green.quantization.fit_end import conversion_target, publish_conversion
from lightning_green.quantization.kernels import Timer, resolve_scheme
from lightning_green.quantization.layers import FilterFn
from lightning_green.quantization.schemes import AUTO, SCHEMES, check_arguments


class QuantizationAwareTraining(Callback):
    r"""Train with fake quantization, then convert the model to a quantized one that is cheaper per token.

    How it chooses the scheme and layers, converts, loads checkpoints and measures: see the module
    docstring of :mod:`lightning_green.quantization.qat` (and the README).

    **Logged metrics**: ``<prefix>/<figure>`` for every figure of :data:`~.evaluate.FIGURES` that was
    measured: sizes (bytes) and their ratio, validation loss, seconds and J per sample of both models
    and their ratios, the setup micro-benchmark's kernel ratios, and ``qat/energy_j`` (training from
    fit start to the conversion, over fits, ranks and resumes). See the README's table.

    Args:
        scheme: ``"auto"`` or one of :data:`~.schemes.SCHEMES`: ``"int8_dynamic"``,
            ``"int8_dynamic_int4_weight"``, ``"int4_weight_only"``, ``"int8_weight_only"``,
            ``"float8_dynamic"`` (CUDA sm89+).
        group_size: values per group along ``in_features`` for grouped schemes, a power of two.
        start_step: optimizer step from which fake quantization is on.
        filter_fn: ``filter_fn(module, fqn) -> bool`` to choose among the eligible layers.
        quantize_embeddings: also quantize ``nn.Embedding`` weights (weight only).
        convert_on_fit_end: convert the model when training ends.
        loss_fn: ``loss_fn(pl_module, batch) -> scalar tensor`` for the validation loss figures.
        eval_as: what ``test/validate/predict(ckpt_path=...)`` evaluates: ``"converted"`` or ``"float"``.
        kernel_timer: ``timer(label, fn) -> seconds`` for the setup micro-benchmark (tests inject one);
            ``None``: a :class:`~.kernels.KernelTimer`, which a busy machine cannot mislead (it times
            on one CPU thread and drops preempted rounds). Every setup times the kernels again,
            a resumed fit too: the timings are not restored from a checkpoint.
        prefix: first part of every metric key.

    Raises:
        ValueError: a bad argument (the message names it and the allowed values); in :meth:`setup`, an
            explicit scheme that cannot run on the device (listing those that can), or no layer to quantize.

    Example::

        qat = QuantizationAwareTraining(start_step=100)
        trainer = Trainer(max_steps=1000, callbacks=[qat, ModelCheckpoint(save_last=True)])
        trainer.fit(model, datamodule=dm)  # converted at the end
        trainer.test(model, datamodule=dm, ckpt_path="last")  # the converted model of last.ckpt
        print(qat.report["scheme"], qat.report["size_ratio"], qat.report.get("epi_ratio"))
    """

    def __init__(
        self,
        scheme: str = AUTO,
        group_size: int = 32,
        start_step: int = 0,
        filter_fn: FilterFn | None = None,
        quantize_embeddings: bool = False,
        convert_on_fit_end: bool = True,
        loss_fn: LossFn | None = None,
        eval_as: str = "converted",
        kernel_timer: Timer | None = None,
        prefix: str = "qat",
    ) -> None:
        check_arguments(scheme, group_size, start_step, filter_fn, loss_fn, quantize_embeddings, eval_as)
        self.scheme = scheme
        self.group_size = group_size
        self.start_step = start_step
        self.filter_fn = filter_fn
        self.quantize_embeddings = quantize_embeddings
        self.convert_on_fit_end = convert_on_fit_end
        self.loss_fn = loss_fn
        self.eval_as = eval_as
        self.kernel_timer = kernel_timer
        self.prefix = prefix
        #: Every figure of the last preparation and conversion.
        self.report = QatReport()
        # resolved in setup
        self._scheme: str | None = None if scheme == AUTO else scheme
        self._module: nn.Module | None = None
        self._fitting = False
        # None until a Trainer sets fake quantization by step (prepare() outside one turns it on)
        self._fake_quant_on: bool | None = None
        self._probe = EnergyProbe()
        self._checkpoints = QatCheckpoints(self._convert_model, self._probe)

    @property
    def resolved_scheme(self) -> str:
        """The scheme in use: ``scheme``, or what ``"auto"`` chose (``"auto"`` before :meth:`setup`)."""
        return self._scheme or self.scheme

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._probe.bind(trainer)
        self._setup(trainer, pl_module, stage)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._fitting = True
        self._probe.attach(find_power_sampler(trainer))

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._sync_fake_quant(pl_module, trainer.global_step)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._fitting = False
        energy_j = self._probe.close_phase()
        if self.convert_on_fit_end and layers.is_prepared(pl_module):
            self._convert_at_fit_end(trainer, pl_module, energy_j)

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._fitting = False

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._fitting = False
        self._checkpoints.unhook()

    @override
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        layers.encode_for_checkpoint(checkpoint.get("state_dict", {}))

    @override
    def state_dict(self) -> dict[str, Any]:
        converted = self._module is not None and layers.is_converted(self._module)
        return self._checkpoints.state(self._settings(), self.start_step, converted, self.report)

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.report = self._checkpoints.restore(state_dict, self._settings(), self.report)

    def prepare(self, model: nn.Module, device: str | torch.device = "cpu") -> nn.Module:
        """Prepare ``model`` in place outside a Trainer (fake quantization on; build the optimizer after).
        ``device``: where the converted model will run. Raises ``ValueError``: no layer to quantize."""
        self._resolve(model, torch.device(device))
        if not layers.is_prepared(model):
            self._prepare(model)
        self._module = model
        return model

    def float_copy(self, model: nn.Module | None = None) -> nn.Module:
        """A deep copy of the prepared ``model`` with fake quantization off (call before :meth:`convert`)."""
        model = self._resolve_model(model)
        if not layers.is_prepared(model):
            raise RuntimeError(
                "float_copy() needs a prepared model that is not converted yet: call it before convert()"
            )
        duplicate = copy.deepcopy(model)
        layers.set_fake_quant_enabled(duplicate, False)
        return duplicate

    def convert(self, model: nn.Module | None = None) -> nn.Module:
        """Convert ``model`` (default: the model of the last ``fit``) in place and return it; a model
        not prepared is prepared first (post-training quantization). Sizes go to :attr:`report`.
        Raises ``RuntimeError`` during ``fit``'s training or without a model."""
        if self._fitting:
            raise RuntimeError(
                "QuantizationAwareTraining.convert() was called during training; conversion happens at the end of"
                " fit (convert_on_fit_end=True) or after trainer.fit() returns."
            )
        model = self._resolve_model(model)
        if layers.is_converted(model) and not layers.is_prepared(model):
            return model
        method = self._quantization_method(model)
        if method == "ptq" and layers.is_prepared(model):
            self._warn_ptq("")
        before = state_dict_size_bytes(model)
        self._convert_model(model)
        after = state_dict_size_bytes(model)
        self.report.update(
            method=method,
            size_bytes_before=before,
            size_bytes_after=after,
            size_ratio=after / before,
            energy_j=self._probe.so_far_j(),
        )
        return model

    def export(self, path: str | Path, model: nn.Module | None = None) -> Path:
        """Convert ``model`` if needed and ``torch.save`` its ``state_dict`` to ``path``. To load it:
        build the model, :meth:`convert` it, then ``model.load_state_dict(torch.load(path))``."""
        model = self.convert(model)
        path = Path(path)
        torch.save(model.state_dict(), path)
        self.report.update(export_path=str(path), export_bytes=path.stat().st_size)
        return path

    def _setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._resolve(pl_module, trainer.strategy.root_device)
        # every rank quantizes as rank 0 measured
        self._scheme = trainer.strategy.broadcast(self._scheme)
        self.report.update(scheme=self._scheme)
        self._module = pl_module
        self._checkpoints.hook(pl_module, stage, self.eval_as)
        if stage != "fit":
            return
        dequantized = layers.to_float(pl_module)
        if dequantized:
            rank_zero_warn(
                f"QuantizationAwareTraining: the model was already converted; training continues from the dequantized"
                f" weights of {len(dequantized)} layer(s) (the float weights from before the conversion are gone)."
            )
        if not layers.is_prepared(pl_module):
            self._prepare(pl_module)
        self._fake_quant_on = None
        self._sync_fake_quant(pl_module, trainer.global_step)

    def _settings(self) -> dict[str, Any]:
        """What a checkpoint must agree on for a resume to go on."""
        return {
            "scheme": self.resolved_scheme,
            "group_size": self.group_size,
            "quantize_embeddings": self.quantize_embeddings,
        }

    def _resolve(self, model: nn.Module, device: torch.device) -> None:
        if self._scheme is not None and (self.scheme == AUTO or self.report.scheme == self._scheme):
            return
        scheme, timing, warning = resolve_scheme(
            self.scheme, model, device, self.group_size, self.quantize_embeddings, self.kernel_timer
        )
        if warning:
            rank_zero_warn(f"QuantizationAwareTraining: {warning}")
        if self.quantize_embeddings and not SCHEMES[scheme].embeddings:
            rank_zero_warn(f"QuantizationAwareTraining: scheme {scheme!r} cannot quantize embeddings; they stay float.")
        self._scheme = scheme
        self.report.update(scheme=scheme, group_size=self.group_size)
        if timing is not None:
            self.report.update(kernel_decode_ratio=timing.decode_ratio, kernel_prefill_ratio=timing.prefill_ratio)

    def _prepare(self, model: nn.Module) -> None:
        # convert() of a model that no Trainer set up: run it where its weights are
        if self._scheme is None:
            self._resolve(model, next(model.parameters()).device)
        embeddings = self.quantize_embeddings and SCHEMES[self.resolved_scheme].embeddings
        chosen = layers.prepare_selected(model, self.resolved_scheme, self.group_size, self.filter_fn, embeddings)
        self.report.update(
            layers_quantized=sorted(chosen.linears | chosen.embeddings), layers_left_float=chosen.left_float
        )

    def _sync_fake_quant(self, model: nn.Module, global_step: int) -> None:
        enabled = global_step >= self.start_step
        if enabled != self._fake_quant_on:
            layers.set_fake_quant_enabled(model, enabled)
            self._fake_quant_on = enabled
            # the first step with fake quantization on: a resumed fit keeps its checkpoint's
            if enabled and self.report.fake_quant_from_step is None:
                self.report.update(fake_quant_from_step=global_step)

    def _convert_model(self, model: nn.Module) -> None:
        if not layers.is_prepared(model):
            self._prepare(model)
        layers.convert(model, self.resolved_scheme, self.group_size)

    def _quantization_method(self, model: nn.Module) -> str:
        """``"qat"`` when ``model`` was trained with fake quantization on, else ``"ptq"``."""
        if not layers.is_prepared(model):
            return "ptq"
        if self.report.fake_quant_from_step is not None:
            return "qat"
        # prepared by prepare() outside a Trainer: fake quantization is on from the user's first step
        return "qat" if self._fake_quant_on is None and any(layers.fake_quant_enabled(model)) else "ptq"

    def _warn_ptq(self, when: str) -> None:
        rank_zero_warn(
            f"QuantizationAwareTraining: fake quantization never ran (start_step={self.start_step}{when}), so the"
            " model was quantized without QAT (post-training quantization, report['method'] == 'ptq'); set"
            " start_step below the number of training steps to train with fake quantization."
        )

    def _convert_at_fit_end(self, trainer: Trainer, pl_module: LightningModule, energy_j: float | None) -> None:
        method = self._quantization_method(pl_module)
        if method == "ptq":
            self._warn_ptq(f"; training ended at global step {trainer.global_step}")
        size_before = state_dict_size_bytes(pl_module)
        layers.set_fake_quant_enabled(pl_module, False)
        self.report.set_evaluation("float", evaluate(trainer, pl_module, self._probe, self.loss_fn))
        layers.set_fake_quant_enabled(pl_module, True)
        self._fake_quant_on = True
        target = conversion_target(trainer, pl_module)
        self._convert_model(target)
        size_after = state_dict_size_bytes(target)
        self.report.set_evaluation("converted", evaluate(trainer, target, self._probe, self.loss_fn))
        if target is not pl_module:
            target.trainer = None  # type: ignore[assignment]
        publish_conversion(
            trainer,
            self.report,
            self._probe,
            method=method,
            scheme=self.resolved_scheme,
            size_before=size_before,
            size_after=size_after,
            energy_j=energy_j,
            prefix=self.prefix,
        )

    def _resolve_model(self, model: nn.Module | None) -> nn.Module:
        model = model if model is not None else self._module
        if model is None:
            raise RuntimeError("QuantizationAwareTraining.convert()/export() needs a model: none was given or fitted.")
        return model


__all__ = ["QuantizationAwareTraining", "state_dict_size_bytes"]
