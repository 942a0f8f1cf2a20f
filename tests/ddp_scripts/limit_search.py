"""Two ranks (plain ``strategy="ddp"``, gloo on CPU) search a power limit with the PowerLimitSearch
callback on simulated devices that differ: rank 1's workload is less clock-bound (``beta``).

Time is simulated: each rank's clock moves by its own device's step time ``T(L)`` at every batch end,
so the windows are exact. Each rank writes ``rank<r>.json`` (its choice, its profiles, the limit at
every step and the limit left on its device) to the folder given as the first argument; the simulated
devices keep their limits in ``dev<r>.json`` there.

Run by tests/test_power_limit.py: ``python limit_search.py OUT_DIR``.
"""

import os
import sys
from dataclasses import asdict

from _common import TwoLayer, write_json
from lightning.pytorch import Callback, Trainer, seed_everything

from lightning_green import PowerLimitSearch, PowerSampler
from lightning_green.power_limit import SimulatedPowerControl

STEP_S = 0.04
BETA = {0: 0.8, 1: 0.4}
WARMUP, SETTLE, PROFILE, LIMIT_STEP_W = 1, 1, 2, 50.0
MAX_STEPS = WARMUP + 6 * (SETTLE + PROFILE) + 2  # six candidates (400 W down to 150 W), then two steps at the choice


class StepClock(Callback):
    """Simulated time: a batch lasts ``T(L)`` of the limit in force; the sensors are read at every batch
    end but the last (the sampler's final reading is there). Records the limit of every step."""

    def __init__(self, control: SimulatedPowerControl) -> None:
        self.control, self.t, self.session, self.limits = control, 1000.0, None, []

    def __call__(self) -> float:
        return self.t

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.limits.append(self.control.get_limit_w())
        self.t += self.control.step_time_s(step_s=STEP_S)
        if trainer.global_step < trainer.max_steps:
            self.session.read_now()


def main(out_dir: str) -> None:
    rank = int(os.environ.get("LOCAL_RANK", "0"))  # set by Lightning's launcher in the second process
    seed_everything(0)
    control = SimulatedPowerControl(
        min_w=150, max_w=400, beta=BETA[rank], state_path=os.path.join(out_dir, f"dev{rank}.json")
    )
    clock = StepClock(control)
    sampler = PowerSampler(
        sensors=[control.sensor(clock=clock)], interval_s=3600.0, print_summary=False, summary_dir=out_dir, clock=clock
    )
    clock.session = sampler.session
    search = PowerLimitSearch(
        "search",
        power_control=control,
        warmup_steps=WARMUP,
        profile_steps=PROFILE,
        settle_steps=SETTLE,
        limit_step_w=LIMIT_STEP_W,
        cache=False,
        clock=clock,
    )
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=MAX_STEPS,
        logger=False,
        callbacks=[sampler, clock, search],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(TwoLayer())
    write_json(
        os.path.join(out_dir, f"rank{trainer.global_rank}.json"),
        {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "strategy": type(trainer.strategy).__name__,
            "beta": BETA[rank],
            "chosen_w": search.search.chosen_w,
            "profiles": [asdict(p) for p in search.search.profiles],
            "limits": clock.limits,
            "limit_after_fit_w": control.get_limit_w(),
        },
    )


if __name__ == "__main__":
    main(sys.argv[1])
