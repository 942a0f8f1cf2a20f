"""Trains with a fixed simulated power limit until SIGTERM arrives.

``python sigterm_child.py STATE_JSON READY_FILE``: the simulated device's limit lives in STATE_JSON; once
the limit is in force, READY_FILE is written and every step sleeps 2 s, so a restore that shows up
within 1.5 s comes from the SIGTERM handler, not from Lightning's graceful stop.
"""

import sys
import time

from _common import TwoLayer
from lightning.pytorch import Callback, Trainer

from lightning_green import PowerLimitSearch
from lightning_green.power_limit import SimulatedPowerControl
from lightning_green.strategies import EnergyAwareDDPStrategy

LIMIT_W = 200.0


class Ready(Callback):
    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 3:
            with open(self.path, "w") as f:
                f.write("ready")
        if trainer.global_step >= 3:
            time.sleep(2.0)


def main(state_path: str, ready_path: str) -> None:
    control = SimulatedPowerControl(state_path=state_path)
    strategy = EnergyAwareDDPStrategy(power_limit=PowerLimitSearch(LIMIT_W, power_control=control, cache=False))
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        strategy=strategy,
        max_steps=10_000,
        logger=False,
        callbacks=[Ready(ready_path)],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(TwoLayer())


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
