"""Small models and callbacks shared by the Trainer tests."""

from __future__ import annotations

import time

from lightning.pytorch import Callback
from lightning.pytorch.demos.boring_classes import BoringModel


class SleepyModel(BoringModel):
    """BoringModel whose training step takes at least ``step_s`` seconds."""

    def __init__(self, step_s: float = 0.01, fail_at: int | None = None, interrupt_at: int | None = None):
        super().__init__()
        self.step_s, self.fail_at, self.interrupt_at = step_s, fail_at, interrupt_at

    def training_step(self, batch, batch_idx):
        if self.fail_at is not None and self.global_step >= self.fail_at:
            raise RuntimeError("boom in training_step")
        if self.interrupt_at is not None and self.global_step >= self.interrupt_at:
            raise KeyboardInterrupt
        time.sleep(self.step_s)
        return super().training_step(batch, batch_idx)


def logged(logger_mock, key):
    """[(step, value)] of every log_metrics call on a Mock logger that holds ``key``."""
    out = []
    for call in logger_mock.log_metrics.call_args_list:
        metrics = call.kwargs.get("metrics", call.args[0] if call.args else {})
        if key in metrics:
            out.append((call.kwargs.get("step"), metrics[key]))
    return out


def tiny_trainer(**kwargs):
    from lightning.pytorch import Trainer

    defaults = dict(
        max_steps=5,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        logger=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    defaults.update(kwargs)
    return Trainer(**defaults)


class FakeClock(Callback):
    """Simulated time, the one clock of the tests: a callable monotonic clock that moves only when told,
    so window arithmetic is exact whatever the machine's load. It moves ``batch_s`` at every training
    batch start and ``val_s`` at every validation batch start (as a callback in the Trainer), ``tick_s``
    after every read (a sensor's own clock: one thread per clock), and by :meth:`advance` /
    :meth:`sleep` when a test or the code under test says so. With :attr:`reads` set to an
    ``EnergySession``, the sensors are read at every training batch end but the last (the final reading
    is there)."""

    def __init__(self, batch_s: float = 0.0, *, t: float = 1000.0, val_s: float = 0.0, tick_s: float = 0.0):
        self.t = t
        self.batch_s = batch_s
        self.val_s = val_s
        self.tick_s = tick_s
        self.reads = None

    def __call__(self) -> float:
        now = self.t
        self.t += self.tick_s
        return now

    def advance(self, seconds: float) -> None:
        self.t += seconds

    def sleep(self, seconds: float) -> None:
        """``time.sleep`` in simulated time: the code under test's wait moves the clock."""
        self.advance(seconds)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.t += self.batch_s

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.t += self.val_s

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.reads is not None and trainer.global_step < trainer.max_steps:
            self.reads.read_now()
