"""A plain Fabric loop measured by FabricEnergy, for the tests that need a process of their own.

``python fabric_loop.py OUT_DIR --no-finish``: one process that never calls ``finish()`` (the summary
is written at exit). ``python fabric_loop.py OUT_DIR --ddp``: ``Fabric(strategy="ddp", devices=2)`` on
CPU, which re-runs this script for rank 1; each rank writes ``rank<r>.json`` with what its logger got
and the sensors it read. Both use simulated sensors and a clock that moves 20 ms per step.
"""

from __future__ import annotations

import os
import sys

import torch
from _common import RecordingLogger, write_json
from lightning.fabric import Fabric

from lightning_green.fabric import FabricEnergy
from lightning_green.sensors import SimulatedSensor

HOST_W, DEVICE_W, BATCH_S, STEPS, EVERY, TOKENS_PER_STEP = 50.0, 100.0, 0.02, 6, 2, 16


class StepClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def main(out_dir: str, ddp: bool, finish: bool) -> None:
    clock = StepClock()
    sensors = [SimulatedSensor(DEVICE_W, name="dev", clock=clock)]
    if ddp:
        sensors.append(SimulatedSensor(HOST_W, name="host", host_level=True, domain="cpu", clock=clock))
    energy = FabricEnergy(
        sensors=sensors,
        interval_s=3600.0,
        log_every_n_steps=EVERY,
        tokens_per_step=TOKENS_PER_STEP,
        print_summary=False,
        summary_dir=out_dir,
        clock=clock,
    )
    logger = RecordingLogger()
    fabric = Fabric(
        accelerator="cpu",
        devices=2 if ddp else 1,
        strategy="ddp" if ddp else "auto",
        callbacks=[energy],
        loggers=[logger],
    )
    fabric.launch()
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    model, optimizer = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    x = torch.randn(4, 8)
    for step in range(1, STEPS + 1):
        clock.t += BATCH_S
        fabric.backward(model(x).pow(2).mean())
        optimizer.step()
        optimizer.zero_grad()
        if step < STEPS:  # the last step's reading is finish()'s own
            energy.session.read_now()
    if not finish:
        return  # the summary is written at exit
    energy.finish()
    logged: dict[str, list] = {}
    for metrics, step in logger.calls:
        for key, value in metrics.items():
            logged.setdefault(key, []).append([step, value])
    sensors_read = [s.name for s in energy.session.sensors]
    write_json(os.path.join(out_dir, f"rank{fabric.global_rank}.json"), {"logged": logged, "sensors": sensors_read})


if __name__ == "__main__":
    main(sys.argv[1], ddp="--ddp" in sys.argv, finish="--no-finish" not in sys.argv)
