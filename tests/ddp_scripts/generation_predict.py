"""Two ranks (gloo on CPU) run ``trainer.predict`` with generated tokens counted, once with ``strategy="ddp"``
and once with ``"ddp_green"`` in the same processes; each rank writes ``<strategy>_rank<r>.json`` (the
generation figures every rank holds) to the folder given as the first argument, and rank 0 the predict
summary under ``<strategy>/``.

Time is simulated: each rank's clock moves only inside ``predict_step``, by 0.25 s of prefill and
``rank + 1`` seconds of decode per batch; rank ``r`` generates ``4 + 2 r`` tokens per prompt. Rank 0
reads a 50 W host-level sensor (rank 1 skips it: one reader per node) and each rank its own 100 W device.

Run by tests/test_generation.py: ``python generation_predict.py OUT_DIR``.
"""

import os
import sys

import torch
from _common import write_json
from lightning.pytorch import LightningModule, Trainer
from torch.utils.data import DataLoader

from lightning_green import EfficiencyLogger, PowerSampler, find_power_sampler
from lightning_green.sensors import SimulatedSensor

HOST_W, DEVICE_W = 50.0, 100.0


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Generator(LightningModule):
    def __init__(self, clock: FakeClock) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 2)
        self.clock = clock

    def predict_step(self, batch, batch_idx):
        new = 4 + 2 * self.global_rank
        sampler = find_power_sampler(self.trainer)
        with sampler.generation_phase("prefill", tokens=batch.numel()):
            self.clock.t += 0.25
        with sampler.generation_phase("decode", tokens=batch.shape[0] * new):
            self.clock.t += 1.0 * (self.global_rank + 1)
        return torch.cat([batch, torch.ones(batch.shape[0], new, dtype=batch.dtype)], dim=1)

    def predict_dataloader(self):
        return DataLoader(torch.zeros(4, 8, dtype=torch.long), batch_size=1)  # 2 prompts per rank


def main(out_dir: str) -> None:
    for strategy in ("ddp", "ddp_green"):
        clock = FakeClock()
        sampler = PowerSampler(
            sensors=[
                SimulatedSensor(HOST_W, name="host", host_level=True, domain="cpu", clock=clock),
                SimulatedSensor(DEVICE_W, name="dev", clock=clock),
            ],
            interval_s=3600.0,
            clock=clock,
            print_summary=False,
            report_picture=False,
            summary_dir=os.path.join(out_dir, strategy),
        )
        efficiency = EfficiencyLogger(generated_tokens="output")
        trainer = Trainer(
            accelerator="cpu",
            devices=2,
            strategy=strategy,
            logger=False,
            callbacks=[sampler, efficiency],
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.predict(Generator(clock), return_predictions=False)
        write_json(
            os.path.join(out_dir, f"{strategy}_rank{trainer.global_rank}.json"),
            {"generation": efficiency.generation, "sensors": [s["name"] for s in sampler.summary["sensors"]]},
        )


if __name__ == "__main__":
    main(sys.argv[1])
