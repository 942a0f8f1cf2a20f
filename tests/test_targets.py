"""Energy-to-target arithmetic (EnergyTargets), with plain calls and simulated energy and time."""

import math

import pytest
import torch

from lightning_green.energy.metrics import EnergyTargets, parse_targets, target_keys


def test_bare_numbers_mean_min_for_losses_else_max():
    assert parse_targets({"val_loss": 1.5, "val_acc": 0.9, "train/loss_epoch": 2}) == {
        "val_loss": (1.5, "min"),
        "val_acc": (0.9, "max"),
        "train/loss_epoch": (2.0, "min"),
    }
    assert parse_targets({"val_loss": (3.0, "max"), "val_acc": [0.1, "min"]}) == {
        "val_loss": (3.0, "max"),
        "val_acc": (0.1, "min"),
    }


@pytest.mark.parametrize(
    "targets",
    [
        {"val_loss": "low"},
        {"val_loss": True},
        {"val_loss": math.nan},
        {"val_loss": (1.0, "lowest")},
        {"val_loss": (1.0, "min", 3)},
        {"val_loss": ("1", "min")},
        {"": 1.0},
        [("val_loss", 1.0)],
    ],
)
def test_bad_targets_raise_naming_the_argument(targets):
    with pytest.raises(ValueError, match="targets"):
        EnergyTargets(targets)


def test_unknown_mode_lists_the_allowed_ones():
    with pytest.raises(ValueError, match=r"'min', 'max'"):
        EnergyTargets({"val_acc": (0.9, "up")})


def constant_power_run(
    targets: EnergyTargets, losses: list[float], power_w: float = 100.0, step_s: float = 0.5
) -> list[tuple[int, list[str]]]:
    """Validation every 10 steps of ``step_s`` seconds at ``power_w``: energy = power x time exactly."""
    out = []
    for i, loss in enumerate(losses):
        step = 10 * (i + 1)
        time_s = step * step_s
        out.append(
            (
                step,
                targets.update(
                    {"val_loss": torch.tensor(loss), "val_acc": 1 - loss / 4}, step, power_w * time_s, time_s
                ),
            )
        )
    return out


def test_energy_and_time_of_the_first_update_that_reaches_the_target():
    targets = EnergyTargets({"val_loss": 1.5, "val_acc": (0.5, "max")})
    calls = constant_power_run(targets, [2.4, 1.9, 1.5, 1.2, 1.6, 1.0])
    assert calls == [(10, []), (20, ["val_acc"]), (30, ["val_loss"]), (40, []), (50, []), (60, [])]
    loss = targets.reached["val_loss"]
    assert loss == {"value": 1.5, "step": 30, "energy_j": 1500.0, "time_s": 15.0}  # 100 W x 15 s, reached at equality
    assert targets.reached["val_acc"]["step"] == 20 and targets.reached["val_acc"]["energy_j"] == 1000.0
    assert targets.never_logged() == []


def test_a_target_never_reached_and_one_never_logged():
    targets = EnergyTargets({"val_loss": 0.5, "val_ppl": 10.0})
    constant_power_run(targets, [2.0, 1.0])
    assert targets.reached == {}
    assert targets.never_logged() == ["val_ppl"]
    rows = {r["metric"]: r for r in targets.rows("simulated")}
    assert (
        rows["val_loss"]["reached"] is False and rows["val_loss"]["joules"] is None and rows["val_loss"]["step"] is None
    )
    assert rows["val_ppl"]["mode"] == "max" and rows["val_ppl"]["source"] == "simulated"


def test_nan_does_not_reach_a_max_or_min_target():
    targets = EnergyTargets({"val_loss": 1.0, "val_acc": 0.5})
    assert targets.update({"val_loss": math.nan, "val_acc": math.nan}, 1, 10.0, 1.0) == []
    assert targets.never_logged() == []  # logged, though NaN


def test_rows_report_reached_targets_with_the_source():
    targets = EnergyTargets({"val_loss": 1.5})
    constant_power_run(targets, [1.4], power_w=40.0)
    assert targets.rows("estimate") == [
        {
            "metric": "val_loss",
            "target": 1.5,
            "mode": "min",
            "reached": True,
            "value": pytest.approx(1.4),
            "step": 10,
            "joules": 200.0,
            "seconds": 5.0,
            "source": "estimate",
        }
    ]


def test_resumed_run_keeps_targets_already_met():
    first = EnergyTargets({"val_loss": 1.5, "val_acc": 0.9})
    constant_power_run(first, [1.4])
    state = first.state_dict()
    resumed = EnergyTargets({"val_loss": 1.5, "val_acc": 0.9})
    resumed.load_state_dict(state)
    assert resumed.reached["val_loss"]["energy_j"] == 500.0
    assert resumed.update({"val_loss": 1.0, "val_acc": 0.95}, 99, 9e9, 99.0) == [
        "val_acc"
    ]  # val_loss not reached twice
    assert resumed.reached["val_loss"]["step"] == 10
    state["reached"]["val_loss"]["step"] = -1
    assert resumed.reached["val_loss"]["step"] == 10  # the state dict is a copy


def test_restored_state_drops_targets_no_longer_asked_for():
    first = EnergyTargets({"val_loss": 1.5})
    constant_power_run(first, [1.4])
    other = EnergyTargets({"val_acc": 0.9})
    other.load_state_dict(first.state_dict())
    assert other.reached == {} and other.never_logged() == ["val_acc"]


def test_logged_keys_carry_units():
    assert target_keys("val_loss") == ("efficiency/energy_to_target/val_loss_j", "efficiency/time_to_target/val_loss_s")


def test_processes_decide_together_from_summed_parts():
    """Two processes: only rank 1 sees the target met; the summed parts make both record it, with the
    energy of both and their mean time."""
    ranks = [EnergyTargets({"val_loss": 1.5, "val_acc": 0.9}) for _ in range(2)]
    parts = [
        ranks[0].probe({"val_loss": 1.6, "val_acc": 0.5}, 300.0, 10.0),
        ranks[1].probe({"val_loss": 1.4}, 200.0, 12.0),
    ]
    assert parts == [[300.0, 10.0, 0.0, 0.0], [200.0, 12.0, 1.0, 0.0]]
    summed = [a + b for a, b in zip(*parts, strict=False)]
    assert [t.settle(summed, step=40, n_processes=2) for t in ranks] == [["val_loss"], ["val_loss"]]
    assert ranks[0].reached["val_loss"] == {"value": 1.6, "step": 40, "energy_j": 500.0, "time_s": 11.0}
    assert ranks[1].reached["val_loss"]["value"] == 1.4
    assert ranks[0].pending() and ranks[0].never_logged() == [] and ranks[1].never_logged() == ["val_acc"]
