"""StructuredPruning in a Trainer: schedule, optimizer, checkpoints into fresh models, report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from unittest.mock import Mock

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from test_readme import documented_keys
from torch.utils.data import DataLoader, TensorDataset

from lightning_green.callbacks.power import PowerSampler
from lightning_green.callbacks.pruning import StructuredPruning, event_steps
from lightning_green.errors import MisconfiguredTrainer
from lightning_green.quantization import QuantizationAwareTraining
from lightning_green.quantization.int8 import Int8DynamicLinear
from lightning_green.sensors import SimulatedSensor

litgpt = pytest.importorskip("litgpt")
from litgpt.model import GPT  # noqa: E402

VOCAB, T = 64, 12


def config(n_layer: int = 2) -> litgpt.Config:
    return litgpt.Config(
        n_layer=n_layer,
        n_embd=64,
        n_head=4,
        block_size=32,
        vocab_size=VOCAB,
        padded_vocab_size=VOCAB,
        intermediate_size=128,
        bias=True,
    )


class LM(LightningModule):
    def __init__(self, n_layer: int = 2, optimizer: str = "adam"):
        super().__init__()
        torch.manual_seed(0)
        self.gpt = GPT(config(n_layer))
        self.optimizer = optimizer

    def forward(self, x):
        return self.gpt(x)

    def loss(self, batch):
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x).flatten(0, 1), y.flatten())

    def training_step(self, batch, batch_idx):
        return self.loss(batch)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.loss(batch))

    def configure_optimizers(self):
        if self.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        return torch.optim.Adam(self.parameters(), lr=1e-3)

    def train_dataloader(self):
        return loader(seed=0)

    def val_dataloader(self):
        return loader(seed=1, n=4)


def loader(seed: int, n: int = 16) -> DataLoader:
    data = torch.randint(0, VOCAB, (n, T + 1), generator=torch.Generator().manual_seed(seed))
    return DataLoader(TensorDataset(data[:, :-1], data[:, 1:]), batch_size=4)


def trainer_for(callbacks, tmp_path, max_steps=6, logger=False, **kwargs) -> Trainer:
    return Trainer(
        max_steps=max_steps,
        callbacks=callbacks,
        logger=logger,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        num_sanity_val_steps=0,
        limit_val_batches=1,
        val_check_interval=3,
        **kwargs,
    )


def logged(logger: Mock, key: str) -> list[tuple[int, float]]:
    calls = [c for c in logger.log_metrics.call_args_list if c.args]
    return [(c.kwargs["step"], c.args[0][key]) for c in calls if key in c.args[0]]


def test_event_steps():
    assert event_steps(2, 8, 4) == [2, 4, 6, 8]
    assert event_steps(5, 5, 1) == [5]
    assert event_steps(0, 10, 1) == [10]


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_fit_prunes_on_schedule_and_training_goes_on(tmp_path, optimizer):
    model = LM(optimizer=optimizer)
    pruning = StructuredPruning(amount=0.5, start_step=2, end_step=4, events=2)
    logger = Mock()
    trainer = trainer_for([pruning], tmp_path, logger=logger, gradient_clip_val=1.0)
    trainer.fit(model)
    cfg = model.gpt.config
    assert cfg.intermediate_size == 64 and cfg.n_head == 2 and cfg.n_query_groups == 2
    assert [step for step, _ in logged(logger, "prune/fraction")] == [2, 4]
    assert [value for _, value in logged(logger, "prune/fraction")] == [0.25, 0.5]
    ((_, params),) = logged(logger, "prune/params")[-1:]
    assert params == sum(p.numel() for p in model.parameters())
    (optimizer_,) = trainer.optimizers
    in_optimizer = [p for g in optimizer_.param_groups for p in g["params"]]
    assert {id(p) for p in in_optimizer} == {id(p) for p in model.parameters()}
    assert all(optimizer_.state[p] for p in in_optimizer)
    assert pruning.report["params_ratio"] < 0.8


def test_fresh_trainer_and_model_load_a_pruned_checkpoint(tmp_path):
    model = LM()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=3, save_top_k=-1)
    trainer = trainer_for([StructuredPruning(amount=0.5, start_step=2, end_step=4, events=2), checkpoint], tmp_path)
    trainer.fit(model)
    (in_memory,) = trainer.validate(model, verbose=False)
    fresh = LM()
    (loaded,) = trainer_for([StructuredPruning(amount=0.5, start_step=2, end_step=4, events=2)], tmp_path).validate(
        fresh, ckpt_path=str(tmp_path / "last.ckpt"), verbose=False
    )
    assert loaded["val_loss"] == pytest.approx(in_memory["val_loss"], rel=1e-6)
    assert fresh.gpt.config.intermediate_size == 64
    # the Trainer that ran fit evaluates a file written mid-schedule (after the first event) too
    (mid,) = trainer.validate(model, ckpt_path=str(tmp_path / "epoch=0-step=3.ckpt"), verbose=False)
    assert model.gpt.config.intermediate_size == 96 and mid["val_loss"] != in_memory["val_loss"]


def test_fit_resumes_mid_schedule_in_a_fresh_trainer(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1)
    trainer_for([StructuredPruning(amount=0.5, start_step=2, end_step=4, events=2), checkpoint], tmp_path).fit(LM())
    fresh, pruning, logger = LM(), StructuredPruning(amount=0.5, start_step=2, end_step=4, events=2), Mock()
    trainer = trainer_for([pruning], tmp_path, logger=logger)
    trainer.fit(fresh, ckpt_path=str(tmp_path / "epoch=0-step=3.ckpt"))
    assert [step for step, _ in logged(logger, "prune/fraction")] == [4]
    assert fresh.gpt.config.intermediate_size == 64
    # the ratio counts from the unpruned model recorded in the file, not from the reshaped one
    assert pruning.report["params_ratio"] == pytest.approx(
        sum(p.numel() for p in fresh.parameters()) / sum(p.numel() for p in LM().parameters())
    )


def test_depth_mode_in_fit_and_summary_section(tmp_path):
    model = LM(n_layer=4)
    sampler = PowerSampler(
        sensors=[SimulatedSensor(power_w=100.0)],
        interval_s=0.01,
        print_summary=False,
        summary_dir=str(tmp_path),
        report_picture=False,
    )
    pruning = StructuredPruning(amount=0.3, start_step=4, mode="depth")
    trainer_for([sampler, pruning], tmp_path, max_steps=7).fit(model)
    assert len(model.gpt.transformer.h) == 3 and model.gpt.config.n_layer == 3
    section = sampler.summary["sections"]["pruning"]
    assert (section["kind"], section["mode"]) == ("pruning", "depth")
    rows = section["rows"]
    blocks = {r["figure"]: r for r in rows}["parameters, blocks"]
    assert blocks["after"] == blocks["before"] * 3 // 4
    energy = {r["figure"]: r for r in rows}["forward J per token (one forward of the first batch)"]
    assert energy["source"] == "simulated" and energy["before"] > 0 and energy["after"] > 0
    # validation at steps 3 (before the event at step 4) and 7 (batch 3 of the second epoch: the last)
    report = pruning.report
    assert report["val_loss_after_last_event"] == report["val_loss_end"] != report["val_loss_before"]
    loss = {r["figure"]: r for r in rows}["validation loss (before the first event / at the end)"]
    assert (loss["before"], loss["after"]) == (report["val_loss_before"], report["val_loss_end"])


def test_bad_input_is_named():
    for amount in (0, 1, 1.5, -0.1):
        with pytest.raises(ValueError, match="amount"):
            StructuredPruning(amount=amount)
    with pytest.raises(ValueError, match="end_step"):
        StructuredPruning(start_step=5, end_step=2)
    with pytest.raises(ValueError, match="mode"):
        StructuredPruning(mode="diagonal")
    with pytest.raises(ValueError, match="events"):
        StructuredPruning(events=0)
    with pytest.raises(ValueError, match="window_steps"):
        StructuredPruning(window_steps=0)
    trainer = Mock(world_size=2)
    with pytest.raises(MisconfiguredTrainer, match="world_size=2"):
        StructuredPruning().setup(trainer, LM(), "fit")


def test_nothing_prunable_fails_before_the_first_step(tmp_path):
    class Tiny(LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(T, 1)

        def forward(self, x):
            return self.layer(x.float())

        def training_step(self, batch, batch_idx):
            return self(batch[0]).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self):
            return loader(seed=0)

    model = Tiny()
    before = model.layer.weight.detach().clone()
    with pytest.raises(ValueError, match="nothing prunable"):
        trainer_for([StructuredPruning()], "unused").fit(model)
    assert torch.equal(model.layer.weight, before)


def test_ddp_two_processes_remove_the_same_units(tmp_path):
    """`ddp_green` re-runs its command for rank 1, so the fit runs as a script, not inside pytest."""
    script = Path(__file__).with_name("pruning_ddp_script.py")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
    }
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["intermediate_size"] == 64 and ranks[0]["n_head"] == 2
    removed = [[e["removed"] for e in r["events"]] for r in ranks]
    assert removed[0] == removed[1] and len(removed[0]) == 2
    # trained 2 more steps after the last event, the replicas stay identical
    assert ranks[0]["params"] == ranks[1]["params"]
    assert ranks[0]["wraps_present"] == [True] * 6  # the probe runs after the pruning callback


def test_pruning_then_qat_in_one_fit(tmp_path):
    model = LM()
    pruning = StructuredPruning(amount=0.5, start_step=2)
    qat = QuantizationAwareTraining(start_step=3, kernel_timer=lambda label, fn: 1.0 if label == "float" else 0.5)
    trainer_for([pruning, qat], tmp_path, max_steps=5).fit(model)
    fc = model.gpt.transformer.h[0].mlp.fc
    assert isinstance(fc, Int8DynamicLinear) and tuple(fc.weight.shape) == (64, 64)
    assert qat.report["size_ratio"] < 0.5 and pruning.report["params_ratio"] < 0.8
    assert model(torch.zeros(1, T, dtype=torch.long)).shape == (1, T, VOCAB)


class ScheduledLM(LM):
    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=1e-3)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def test_accumulation_lr_scheduler_and_bf16_keep_working(tmp_path):
    model = ScheduledLM()
    pruning = StructuredPruning(amount=0.5, start_step=1, importance="taylor")
    trainer = trainer_for(
        [pruning], tmp_path, max_steps=3, accumulate_grad_batches=2, precision="bf16-mixed", gradient_clip_val=0.5
    )
    trainer.fit(model)
    assert model.gpt.config.intermediate_size == 64 and trainer.global_step == 3
    (optimizer,) = trainer.optimizers
    assert trainer.lr_scheduler_configs[0].scheduler.optimizer is optimizer
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.5**3)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    assert {id(p) for p in params} == {id(p) for p in model.parameters()}
    assert all(optimizer.state[p]["step"] == 3 for p in params)  # Adam state carried, not reset


def test_import_and_construction_need_no_torch_pruning():
    code = (
        "import sys\n"
        "sys.modules['torch_pruning'] = None\n"
        "from lightning_green.callbacks.pruning import StructuredPruning\n"
        "print(StructuredPruning(amount=0.2).amount)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0.2"


WATTS, S_PER_PARAM, VAL_S = 100.0, 1e-6, 0.5
PRUNING_SECTION = "Structured pruning (`StructuredPruning`)"


class ParamsClock(Callback):
    """Moves S_PER_PARAM x the model's parameters at every training batch start and VAL_S at every
    validation batch start, and only then: a step's simulated joules follow the model's size."""

    def __init__(self):
        self.t = 1000.0
        self.params_at_batch: list[int] = []

    def __call__(self):
        return self.t

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        params = sum(p.numel() for p in pl_module.parameters())
        self.params_at_batch.append(params)
        self.t += S_PER_PARAM * params

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.t += VAL_S


def fit_with_energy(tmp_path, extra=(), ckpt_path=None, **pruning_args):
    clock, logger = ParamsClock(), Mock()
    logger.log_dir = logger.save_dir = None
    sampler = PowerSampler(
        sensors=[SimulatedSensor(WATTS, clock=clock)],
        interval_s=3600.0,
        print_summary=False,
        summary_dir=str(tmp_path),
        report_picture=False,
        clock=clock,
    )
    pruning = StructuredPruning(**pruning_args)
    model = LM()
    # validation at steps 3 and 7 (batch 3 of each epoch of 4 batches); events at 4 and 5
    trainer_for([clock, sampler, pruning, *extra], tmp_path, max_steps=7, logger=logger).fit(model, ckpt_path=ckpt_path)
    return clock, sampler, pruning, logger, model


def test_training_j_per_step_before_and_after_and_both_eers(tmp_path):
    clock, sampler, pruning, logger, model = fit_with_energy(
        tmp_path, amount=0.5, start_step=4, end_step=5, events=2, window_steps=2
    )
    before, mid, after = clock.params_at_batch[0], clock.params_at_batch[4], clock.params_at_batch[-1]
    assert clock.params_at_batch == [before] * 4 + [mid] + [after] * 2 and before > mid > after
    # window before: the batches of steps 3 and 4 (the event prunes at the end of step 4); the validation
    # at step 3 (VAL_S at 100 W = 50 J) is left out
    ((step, j_before),) = logged(logger, "prune/train_j_per_step_before")
    assert step == 7 and j_before == pytest.approx(WATTS * S_PER_PARAM * before, rel=1e-9)
    # window after: steps 6 and 7, after the last event at step 5
    ((_, j_after),) = logged(logger, "prune/train_j_per_step_after")
    assert j_after == pytest.approx(WATTS * S_PER_PARAM * after, rel=1e-9)
    # training energy: every training batch, not the two validations nor the report's forward passes
    train_j = WATTS * S_PER_PARAM * sum(clock.params_at_batch)
    final = sum(p.numel() for p in model.parameters())
    assert final == after
    ((_, eer_initial),) = logged(logger, "prune/eer_j_per_initial_param")
    ((_, eer_final),) = logged(logger, "prune/eer_j_per_final_param")
    assert eer_initial == pytest.approx(train_j / before, rel=1e-9)
    assert eer_final == pytest.approx(train_j / final, rel=1e-9)
    rows = {r["figure"]: r for r in sampler.summary["sections"]["pruning"]["rows"]}
    per_step = rows["training J per optimizer step (window before the first event / last window of fit)"]
    assert (per_step["before"], per_step["after"], per_step["source"]) == (j_before, j_after, "simulated")
    eer = rows["EER: training J / parameters (before the first event / after the last)"]
    assert (eer["before"], eer["after"], eer["unit"]) == (eer_initial, eer_final, "J/parameter")


def test_a_fit_logs_exactly_the_documented_pruning_keys(tmp_path):
    _, _, _, logger, _ = fit_with_energy(tmp_path, amount=0.5, start_step=4, end_step=5, events=2, window_steps=2)
    keys = {k for c in logger.log_metrics.call_args_list if c.args for k in c.args[0] if k.startswith("prune/")}
    assert keys == documented_keys(PRUNING_SECTION)


def test_a_resumed_fit_adds_the_checkpoints_training_energy(tmp_path):
    args = dict(amount=0.5, start_step=4, end_step=5, events=2, window_steps=2)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1)
    first, *_ = fit_with_energy(tmp_path, extra=[checkpoint], **args)
    clock, _, pruning, logger, _ = fit_with_energy(tmp_path, ckpt_path=str(tmp_path / "epoch=0-step=3.ckpt"), **args)
    # 3 batches before the file was written (its validation came after it), then steps 4 to 7 here
    assert len(clock.params_at_batch) == 4
    train_j = WATTS * S_PER_PARAM * (sum(first.params_at_batch[:3]) + sum(clock.params_at_batch))
    assert pruning.report["train_energy_j"] == pytest.approx(train_j, rel=1e-9)
    assert pruning.report["eer_j_per_initial_param"] == pytest.approx(train_j / first.params_at_batch[0], rel=1e-9)
    # resumed on the step of the first event: no window before it, the window after is there
    assert logged(logger, "prune/train_j_per_step_before") == []
    ((_, j_after),) = logged(logger, "prune/train_j_per_step_after")
    assert j_after == pytest.approx(WATTS * S_PER_PARAM * clock.params_at_batch[-1], rel=1e-9)
