"""The figures of a pruning run, without a Trainer: sizes and FLOPs before and after, the summary rows."""

from __future__ import annotations

from typing import Any

from torch import nn

from lightning_green.pruning.pruner import StructuredPruner, linear_flops_per_token

#: Figures measured before the first event and at the end: (key stem, label, unit).
BEFORE_AFTER = (
    ("forward_j_per_token", "forward J per token (one forward of the first batch)", "J"),
    ("forward_s_per_token", "forward s per token (one forward of the first batch)", "s"),
)


def size_figures(pruner: StructuredPruner, model: nn.Module) -> dict[str, float]:
    """Parameters by kind now, their ratio to before the first event, and the analytic FLOPs per token."""
    counts = pruner.parameter_counts(model)
    flops = linear_flops_per_token(model)
    return {
        "params": counts["total"],
        "params_mlp": counts["mlp"],
        "params_heads": counts["heads"],
        "params_blocks": counts["blocks"],
        "params_ratio": counts["total"] / pruner.params_before["total"],
        "flops_per_token": flops,
        "flops_ratio": flops / pruner.flops_before,
    }


def summary_rows(pruner: StructuredPruner, model: nn.Module, figures: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows ``figure, before, after, unit, source`` for the PowerSampler summary."""
    before, after = pruner.params_before, pruner.parameter_counts(model)
    rows = [
        {"figure": f"parameters, {kind}", "before": before[kind], "after": after[kind], "unit": "count", "source": ""}
        for kind in ("total", "mlp", "heads", "blocks")
    ]
    rows.append(
        {
            "figure": "FLOPs per token (matrix products, analytic)",
            "before": pruner.flops_before,
            "after": linear_flops_per_token(model),
            "unit": "FLOP",
            "source": "estimate",
        }
    )
    for stem, label, unit in BEFORE_AFTER:
        rows.append(
            {
                "figure": label,
                "before": figures.get(f"{stem}_before"),
                "after": figures.get(f"{stem}_after"),
                "unit": unit,
                "source": figures.get("energy_source", "") if unit == "J" else "",
            }
        )
    if "train_energy_j" in figures:
        rows += training_energy_rows(figures)
    if "val_loss_before" in figures or "val_loss_end" in figures:
        rows.append(
            {
                "figure": "validation loss (before the first event / at the end)",
                "before": figures.get("val_loss_before"),
                "after": figures.get("val_loss_end"),
                "unit": "",
                "source": "",
            }
        )
    return rows


def training_energy_rows(figures: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows for training J per optimizer step before/after and the two EERs (``train_energy_j`` present)."""
    source = figures["train_energy_source"]
    return [
        {
            "figure": "training J per optimizer step (window before the first event / last window of fit)",
            "before": figures.get("train_j_per_step_before"),
            "after": figures.get("train_j_per_step_after"),
            "unit": "J",
            "source": source,
        },
        {
            "figure": "EER: training J / parameters (before the first event / after the last)",
            "before": figures["eer_j_per_initial_param"],
            "after": figures["eer_j_per_final_param"],
            "unit": "J/parameter",
            "source": source,
        },
    ]
