"""The end-of-run summary: a table printed with ``rich`` and the same figures as JSON."""

from __future__ import annotations

import json
import math
import os
from typing import Any

from lightning_green.energy.metrics import J_PER_KWH


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:.{digits}g}"
    return str(value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def write_json(summary: dict, path: str | os.PathLike) -> str:
    """Write ``summary`` to ``path`` (folders created; NaN and infinities become null)."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(_jsonable(summary), f, indent=2)
    return path


def render(summary: dict) -> None:
    """Print the summary as rich tables: sensors, the totals, then each extra section."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:  # a log file or a pipe: don't squeeze the table into 80 columns
        console = Console(width=120)
    title = f"lightning_green energy summary ({summary['stage']}, {summary['status']})"
    table = Table(title=title, title_justify="left")
    for col in ("sensor", "source", "energy J", "mean W", "peak W", "seconds", "gaps", "status"):
        table.add_column(col, justify="left" if col in ("sensor", "source", "status") else "right")
    notes = []
    for s in summary["sensors"]:
        status = "ok" if not s["partial"] else ("failed" if s["failed"] else "gaps")
        if s.get("note"):
            notes.append(f"{s['name']}: {s['note']}")
        table.add_row(
            s["name"], s["source"], _fmt(s["energy_j"]), _fmt(s["mean_power_w"]), _fmt(s["peak_power_w"]),
            _fmt(s["duration_s"]), str(s["gaps"]), status,
        )
    console.print(table)
    sources = "+".join(summary["sources"]) or "none"
    cluster = summary.get("cluster") or {}
    lines = notes + [f"total energy (this process): {_fmt(summary['energy_j'])} J = {_fmt(summary['energy_j'] / J_PER_KWH)} kWh  [source: {sources}]"]
    if cluster.get("world_size", 1) > 1:
        per_rank = ", ".join(f"rank {r['rank']} (node {r['node_rank']}): {_fmt(r['energy_j'])} J" for r in cluster["per_rank"])
        imbalance = _fmt(cluster["imbalance"]) if not math.isnan(cluster["imbalance"]) else "n/a (no per-process device sensor)"
        lines.append(f"cluster total ({cluster['world_size']} processes, {cluster['num_nodes']} nodes): {_fmt(cluster['total_j'])} J; {per_rank}; device-energy imbalance (max/mean): {imbalance}")
    if summary["partial"]:
        lines.append("partial figures: " + "; ".join(summary["partial"]))
    for reason in summary["skipped"]:
        lines.append("skipped: " + reason)
    for line in lines:
        console.print(line, markup=False, highlight=False)
    for section, rows in summary["sections"].items():
        if not rows:
            continue
        sub = Table(title=section, title_justify="left")
        columns = list(dict.fromkeys(k for row in rows for k in row))
        for col in columns:
            sub.add_column(col)
        for row in rows:
            sub.add_row(*(_fmt(row.get(c)) for c in columns))
        console.print(sub)
