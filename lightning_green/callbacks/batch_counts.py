"""Samples and tokens of a batch, counted for :class:`~lightning_green.callbacks.efficiency.EfficiencyLogger`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch.utilities.data import extract_batch_size

from lightning_green.checks import checked_count
from lightning_green.energy.generation import first_tensor
from lightning_green.messages import WarnOnce

__all__ = ["BatchCounter", "CountFn", "check_count_fn"]

CountFn = None | str | Callable[[Any], int]
_COUNT_NAMES = ("numel",)


def check_count_fn(arg: str, fn: CountFn) -> CountFn:
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
        #: running totals of :meth:`add`
        self.samples = 0
        self.tokens = 0

    def add(self, batch: Any) -> None:
        """Add ``batch`` to :attr:`samples` and :attr:`tokens`. Per training batch, so the common
        batches (a tensor, or a list or tuple led by one) take a fast rule with no call and no tuple."""
        if self._plain:
            first = batch[0] if isinstance(batch, (list, tuple)) and batch else batch
            # one call into torch, not two
            shape = first.shape if isinstance(first, torch.Tensor) else ()
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
        # what extract_batch_size finds, without its tree walk
        first = first_tensor(batch)
        if first is not None and first.dim() > 0:
            return first.shape[0]
        try:
            return extract_batch_size(batch)
        except Exception as err:  # noqa: BLE001 - an unusual batch must not stop training
            self._warn(
                "batch_size",
                f"EfficiencyLogger: cannot find the batch size ({err}); such batches count 0 samples, so "
                "samples_per_j and EPI are partial. Pass `samples_per_batch`.",
            )
            return 0

    @staticmethod
    def _count(arg: str, fn: CountFn, batch: Any) -> int:
        if fn == "numel":
            tensor = first_tensor(batch)
            return int(tensor.numel()) if tensor is not None else 0
        return checked_count(arg, fn(batch))
