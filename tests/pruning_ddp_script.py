"""Run by tests/test_pruning_callback.py in a subprocess: StructuredPruning under ``ddp_green`` on 2 CPU
processes. Lightning starts rank 1 by running this same command again; each rank writes
``rank<N>.json`` (the parameters' shapes and sums after fit, and the config) to the folder given."""

import json
import os
import sys

from lightning.pytorch import Callback, Trainer

sys.path.insert(0, os.path.dirname(__file__))

from test_pruning_callback import LM  # noqa: E402

from lightning_green import StructuredPruning  # noqa: E402


class WrapperProbe(Callback):
    """After each step: is the DDP wrapper around the module's present Parameters?"""

    def __init__(self):
        self.wraps_present: list[bool] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        wrapped = trainer.strategy.model.module.parameters()
        self.wraps_present.append(all(p is q for p, q in zip(wrapped, pl_module.parameters(), strict=True)))


def main(out_dir: str) -> None:
    probe = WrapperProbe()
    pruning = StructuredPruning(amount=0.5, start_step=2, end_step=4, events=2, importance="taylor")
    trainer = Trainer(
        strategy="ddp_green",
        accelerator="cpu",
        devices=2,
        max_steps=6,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        callbacks=[pruning, probe],
        default_root_dir=out_dir,
    )
    model = LM()
    trainer.fit(model)
    result = {
        "params": {n: [list(p.shape), float(p.detach().double().sum())] for n, p in model.named_parameters()},
        "intermediate_size": model.gpt.config.intermediate_size,
        "n_head": model.gpt.config.n_head,
        "events": pruning.pruner.state_dict()["events"],
        "wraps_present": probe.wraps_present,
    }
    with open(os.path.join(out_dir, f"rank{trainer.global_rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1])
