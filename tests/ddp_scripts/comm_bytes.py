"""Two ranks (``strategy="ddp_green"``, gloo on CPU) train :class:`TwoLayer` once per compression preset in
the same processes; each rank writes ``rank<r>.json`` to the folder given as the first argument.

Run by tests/test_ddp_green.py: ``python comm_bytes.py OUT_DIR``.
"""

import os
import sys

import torch
from _common import RecordingLogger, TwoLayer, write_json
from lightning.pytorch import Trainer, seed_everything

from lightning_green.strategies import EnergyAwareDDPStrategy

STEPS = 6


def main(out_dir: str) -> None:
    results = {}
    for preset in ("none", "fp16", "bf16", "powersgd"):
        seed_everything(0)
        logger = RecordingLogger()
        strategy = EnergyAwareDDPStrategy(comm_compression=preset, powersgd_rank=2, powersgd_start_step=2)
        trainer = Trainer(
            accelerator="cpu",
            devices=2,
            strategy=strategy,
            max_steps=STEPS,
            log_every_n_steps=2,
            logger=logger,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        model = TwoLayer()
        trainer.fit(model)
        comm_logs = [(m, step) for m, step in logger.calls if any(k.startswith("comm/") for k in m)]
        results[preset] = {
            "stats": strategy.comm_stats.as_dict(),
            "pg_initialized_after_fit": torch.distributed.is_initialized(),
            "comm_logs": comm_logs,
            "losses": model.losses,
            "world_size": trainer.world_size,
        }
    write_json(os.path.join(out_dir, f"rank{trainer.global_rank}.json"), results)


if __name__ == "__main__":
    main(sys.argv[1])
