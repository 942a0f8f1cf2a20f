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


class Clock(Callback):
    """Records time.monotonic() at setup and at every training batch end, by global step."""

    def __init__(self):
        self.t_setup = None
        self.at_step: dict[int, float] = {}

    def setup(self, trainer, pl_module, stage):
        self.t_setup = time.monotonic()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.at_step[trainer.global_step] = time.monotonic()


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
    """A clock that moves ``batch_s`` at every training batch start, and only then: window
    arithmetic is exact whatever the machine's load."""

    def __init__(self, batch_s: float):
        self.t, self.batch_s = 1000.0, batch_s
        self.reads = (
            None  # an EnergySession to read at every batch end but the last (the final reading is there), if set
        )

    def __call__(self):
        return self.t

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.t += self.batch_s

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.reads is not None and trainer.global_step < trainer.max_steps:
            self.reads.read_now()
