"""Run by tests/test_qat.py in a subprocess: QAT under strategy="ddp_green" on 2 CPU processes, then
``trainer.test`` of the converted model on both processes.

Lightning starts rank 1 by running this same command again; each rank writes ``rank<N>.json``
(its QAT report and which parameters ended up quantized) to the folder given as the argument.
"""

import json
import os
import sys

import torch
from lightning.pytorch import Trainer

sys.path.insert(0, os.path.dirname(__file__))

from test_qat import QatModel, quantized_params  # noqa: E402

from lightning_green import PowerSampler, SimulatedSensor  # noqa: E402
from lightning_green.quantization import QuantizationAwareTraining  # noqa: E402


def main(out_dir: str) -> None:
    qat = QuantizationAwareTraining(start_step=1)
    sampler = PowerSampler(
        sensors=[SimulatedSensor(power_w=100.0)], interval_s=0.01, print_summary=False, summary_dir=out_dir
    )
    trainer = Trainer(
        strategy="ddp_green",
        accelerator="cpu",
        devices=2,
        max_steps=3,
        limit_val_batches=2,
        limit_test_batches=2,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        callbacks=[sampler, qat],
        default_root_dir=out_dir,
    )
    model = QatModel(width=128)
    trainer.fit(model)
    x = torch.ones(2, 32)
    output = model(x).tolist()
    # the converted weights are tensor subclasses that torch's broadcast cannot send: ddp_green skips them
    trainer.test(model, verbose=False)
    result = {
        "report": qat.report.as_dict(),
        "quantized": quantized_params(model),
        "output": output,
        "tested": trainer.state.finished,
    }
    with open(os.path.join(out_dir, f"rank{trainer.global_rank}.json"), "w") as f:
        json.dump(result, f, default=str)


if __name__ == "__main__":
    main(sys.argv[1])
