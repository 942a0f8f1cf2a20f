"""Energy-to-target in EfficiencyLogger, on a Trainer, with a constant 100 W simulated sensor and a
clock that moves only at batch starts: the arithmetic is exact whatever the machine's load."""

import json
import subprocess
import sys
import warnings
from unittest.mock import Mock

import pytest
from helpers import FakeClock, logged, tiny_trainer
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.strategies import SingleDeviceStrategy

from lightning_green import EfficiencyLogger, PowerSampler
from lightning_green.callbacks.trainer_steps import global_step_reader
from lightning_green.sensors import SimulatedSensor

STEP_S, VAL_S = 0.01, 0.05  # simulated seconds per training batch and per validation batch
WATTS = 100.0
ENERGY_KEY, TIME_KEY = "efficiency/energy_to_target/val_loss_j", "efficiency/time_to_target/val_loss_s"


class Scripted(BoringModel):
    """Logs ``val_loss`` from a script by global step (validation) and ``train_acc`` = step / 10 (each step)."""

    def __init__(self, val_loss_at: dict[int, float]):
        super().__init__()
        self.val_loss_at = val_loss_at

    def training_step(self, batch, batch_idx):
        self.log("train_acc", self.global_step / 10.0, on_step=True)
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.val_loss_at[self.global_step])
        return super().validation_step(batch, batch_idx)


def mock_logger():
    logger = Mock()
    logger.log_dir = logger.save_dir = None
    return logger


def run(tmp_path, targets, val_loss_at, max_steps=8, ckpt_path=None, extra=(), then=(), strategy="auto"):
    logger, clock = mock_logger(), FakeClock(STEP_S, val_s=VAL_S)
    ps = PowerSampler(
        sensors=[SimulatedSensor(WATTS, clock=clock)],
        interval_s=3600.0,
        summary_dir=str(tmp_path),
        print_summary=False,
        clock=clock,
    )
    eff = EfficiencyLogger(targets=targets)
    trainer = tiny_trainer(
        max_steps=max_steps,
        log_every_n_steps=2,
        val_check_interval=2,
        check_val_every_n_epoch=None,
        limit_val_batches=1,
        logger=logger,
        callbacks=[clock, ps, eff, *extra],
        enable_checkpointing=bool(extra),
        strategy=strategy,
    )
    model = Scripted(val_loss_at)
    trainer.fit(model, ckpt_path=ckpt_path)
    for stage in then:  # "validate", "test": loops outside fit do not check targets
        getattr(trainer, stage)(model, verbose=False)
    return logger, ps, eff


LOSSES = {2: 3.0, 4: 2.0, 6: 1.4, 8: 1.0, 10: 5.0, 12: 5.0}


def test_energy_to_target_is_the_energy_up_to_the_validation_that_reached_it(tmp_path):
    logger, ps, eff = run(tmp_path, {"val_loss": 1.5}, LOSSES)
    # reached in the validation after step 6: 6 training batches and 3 validation batches so far
    seconds = 6 * STEP_S + 3 * VAL_S
    assert logged(logger, TIME_KEY) == [
        (6, pytest.approx(seconds, rel=1e-9))
    ]  # once only, though step 8 is below 1.5 too
    assert logged(logger, ENERGY_KEY) == [(6, pytest.approx(WATTS * seconds, rel=0.05))]
    assert logged(logger, ENERGY_KEY)[0][1] == pytest.approx(WATTS * seconds, rel=1e-6)  # exact on a simulated clock
    assert eff.targets.reached["val_loss"]["value"] == pytest.approx(1.4)


def test_train_metric_reached_at_a_log_step(tmp_path):
    logger, _, eff = run(tmp_path, {"train_acc": 0.45}, LOSSES)
    # train_acc = global step before the batch / 10, checked at log steps (every 2): 0.5 in batch 6,
    # seen at that batch's end (not the step before's 0.4), with 6 batches and 2 validation batches behind it
    [(step, seconds)] = logged(logger, "efficiency/time_to_target/train_acc_s")
    assert step == 6 and seconds == pytest.approx(6 * STEP_S + 2 * VAL_S)
    assert logged(logger, "efficiency/energy_to_target/train_acc_j") == [(6, pytest.approx(WATTS * seconds, rel=1e-6))]


def test_summary_rows_and_compare_show_them(tmp_path):
    _, ps, _ = run(tmp_path, {"val_loss": 1.5, "val_acc": (0.9, "max")}, LOSSES, then=("validate", "test"))
    rows = {r["metric"]: r for r in ps.summary_by_stage["fit"]["sections"]["targets"]["rows"]}
    targets = {stage: ps.summary_by_stage[stage]["sections"]["targets"]["rows"] for stage in ("fit", "test")}
    assert targets["test"] == targets["fit"]
    seconds = 6 * STEP_S + 3 * VAL_S
    assert rows["val_loss"] == {
        "metric": "val_loss",
        "target": 1.5,
        "mode": "min",
        "reached": True,
        "value": pytest.approx(1.4),
        "step": 6,
        "joules": pytest.approx(WATTS * seconds),
        "seconds": pytest.approx(seconds),
        "source": "simulated",
    }
    assert rows["val_acc"]["reached"] is False and rows["val_acc"]["joules"] is None and rows["val_acc"]["step"] is None
    path = tmp_path / "energy_summary_fit.json"
    assert json.loads(path.read_text())["sections"]["targets"]["rows"][0]["joules"] == pytest.approx(WATTS * seconds)
    out = subprocess.run(
        [sys.executable, "-m", "lightning_green", "compare", str(path)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    energy_line = next(line for line in out.stdout.splitlines() if "to val_loss: energy" in line)
    assert f"{WATTS * seconds:.4g}" in energy_line.replace(",", ""), energy_line
    assert "not reached" in next(line for line in out.stdout.splitlines() if "to val_acc: energy" in line)


def test_a_target_never_logged_gets_one_warning_naming_it(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logger, _, eff = run(tmp_path, {"val_ppl": 10.0, "val_loss": 1.5}, LOSSES)
    said = [str(w.message) for w in caught if "targets" in str(w.message)]
    assert len(said) == 1 and "val_ppl" in said[0] and "val_loss," not in said[0].split("Metrics logged")[0]
    assert not logged(logger, "efficiency/energy_to_target/val_ppl_j")


class RestoreAfterSetup(SingleDeviceStrategy):
    """Restores callbacks after ``on_fit_start``, as FSDP and DeepSpeed do."""

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True


@pytest.mark.parametrize("restore_after_setup", [False, True])
def test_resumed_run_keeps_targets_met_and_counts_energy_from_the_first_start(tmp_path, restore_after_setup):
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=8, save_top_k=-1)
    _, _, eff1 = run(tmp_path, {"val_loss": 1.5, "train_acc": 0.85}, LOSSES, max_steps=8, extra=[ckpt])
    first = dict(eff1.targets.reached["val_loss"])
    assert "train_acc" not in eff1.targets.reached
    strategy = RestoreAfterSetup("cpu") if restore_after_setup else "auto"
    logger, ps, eff2 = run(
        tmp_path,
        {"val_loss": 1.5, "train_acc": 0.85},
        LOSSES,
        max_steps=12,
        ckpt_path=tmp_path / "epoch=0-step=8.ckpt",
        strategy=strategy,
    )
    assert eff2.targets.reached["val_loss"] == first  # kept, and not logged again
    assert logged(logger, ENERGY_KEY) == []
    # train_acc (0.9 in batch 10) first >= 0.85 at step 10. The checkpoint was taken at the end of batch
    # 8, before that step's validation: 8 batches and 3 validation batches; the resumed run adds batches 9 and 10
    [(step, seconds)] = logged(logger, "efficiency/time_to_target/train_acc_s")
    assert step == 10 and seconds == pytest.approx((8 * STEP_S + 3 * VAL_S) + 2 * STEP_S)
    assert logged(logger, "efficiency/energy_to_target/train_acc_j") == [(10, pytest.approx(WATTS * seconds, rel=1e-6))]
    targets = ps.summary["sections"]["targets"]["rows"]
    assert {r["metric"]: r["step"] for r in targets} == {"val_loss": 6, "train_acc": 10}


@pytest.mark.parametrize(
    "targets", [{"val_loss": "low"}, {"val_acc": (0.9, "up")}, [("val_loss", 1.0)], {"val_loss": (1.0,)}]
)
def test_bad_targets_raise_at_construction(targets):
    with pytest.raises(ValueError, match="targets"):
        EfficiencyLogger(targets=targets)


class StepWatcher(Callback):
    def __init__(self):
        self.pairs = []

    def on_train_start(self, trainer, pl_module):
        self.read = global_step_reader(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.pairs.append((self.read(), trainer.global_step))


class Manual(BoringModel):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        loss = self.step(batch)
        self.manual_backward(loss)
        if batch_idx % 2:
            opt.step()
            opt.zero_grad()
        return loss


@pytest.mark.parametrize("model, kwargs", [(BoringModel, {"accumulate_grad_batches": 3}), (Manual, {})])
def test_global_step_reader_reads_what_trainer_global_step_reads(model, kwargs):
    watcher = StepWatcher()
    tiny_trainer(max_steps=4, callbacks=[watcher], **kwargs).fit(model())
    assert [a for a, _ in watcher.pairs] == [b for _, b in watcher.pairs]
    assert watcher.pairs[-1][1] == 4


class RankScripted(Scripted):
    """Rank 1 logs a lower val_loss than rank 0, without sync_dist: only rank 1 sees the target met."""

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.val_loss_at[self.global_step] - 0.5 * self.global_rank)
        return BoringModel.validation_step(self, batch, batch_idx)


def test_two_processes_decide_together_and_sum_their_energy(tmp_path):
    clock = FakeClock(STEP_S, val_s=VAL_S)
    ps = PowerSampler(
        sensors=[SimulatedSensor(WATTS, clock=clock)],
        interval_s=3600.0,
        summary_dir=str(tmp_path),
        print_summary=False,
        clock=clock,
    )
    trainer = tiny_trainer(
        max_steps=6,
        devices=2,
        strategy="ddp_spawn",
        log_every_n_steps=2,
        val_check_interval=2,
        check_val_every_n_epoch=None,
        limit_val_batches=1,
        callbacks=[clock, ps, EfficiencyLogger(targets={"val_loss": 1.6})],
    )
    trainer.fit(RankScripted({2: 3.0, 4: 2.0, 6: 1.4}))
    [row] = json.loads((tmp_path / "energy_summary_fit.json").read_text())["sections"]["targets"]["rows"]
    # rank 1 sees 2.0 - 0.5 = 1.5 <= 1.6 after step 4 (rank 0 sees 2.0): 4 batches, 2 validation batches, each process
    seconds = 4 * STEP_S + 2 * VAL_S
    assert (row["reached"], row["step"], row["value"]) == (True, 4, pytest.approx(2.0))  # rank 0's own value
    assert row["seconds"] == pytest.approx(seconds) and row["joules"] == pytest.approx(2 * WATTS * seconds, rel=1e-6)
