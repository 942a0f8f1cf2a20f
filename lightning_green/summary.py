"""The end-of-stage summary: built from an :class:`~lightning_green.energy.session.EnergySession`,
printed as ``rich`` tables and written as JSON.

Every stage's summary gives that stage's own energy, time and mean power (``stage_energy_j``,
``duration_s``, ``stage_mean_power_w``: J = W x s in a row) and, labelled apart, the process's
cumulative energy over every stage and any checkpoint it resumed from (``energy_j``, also
``cumulative_energy_j``).
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
from typing import Any, Callable

from lightning_green.distributed import cluster_figures, distributed, gather_objects
from lightning_green.energy.metrics import J_PER_KWH

log = logging.getLogger("lightning_green")

#: Stages whose summary is printed and written (validate and predict keep theirs in memory).
SUMMARY_STAGES = ("fit", "test")

Provider = Callable[[], "dict[str, list[dict]]"]


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


class SummarySections:
    """Extra tables for the next summary: sections set once, and providers asked when it is built.

    A provider that raises costs its own section only (it becomes an ``error in ...`` row, and a
    warning), never the summary.
    """

    def __init__(self) -> None:
        self.sections: dict[str, list[dict]] = {}
        self.providers: list[Provider] = []

    def add_section(self, title: str, rows: list[dict]) -> None:
        self.sections[title] = list(rows)

    def add_provider(self, provider: Provider) -> None:
        if provider not in self.providers:
            self.providers.append(provider)

    def clear_sections(self) -> None:
        self.sections = {}

    def collect(self) -> dict[str, list[dict]]:
        out = dict(self.sections)
        for provider in self.providers:
            try:
                out.update(provider() or {})
            except Exception as err:  # noqa: BLE001 - a broken provider must not lose the summary
                name = getattr(provider, "__qualname__", repr(provider))
                log.warning("lightning_green: the summary section of %s is missing: %r", name, err)
                out[f"error in {name}"] = [{"error": str(err)}]
        return out


def now_iso() -> str:
    """Wall-clock time with the local zone, for ``started_at``."""
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def sensor_rows(meter) -> list[dict]:
    """Per-sensor figures of a stage, each labelled: the stage's own and the cumulative energy."""
    rows = []
    for name in meter.names:
        row = meter.stats(name)
        row["stage_energy_j"] = row["energy_this_run_j"]
        row["cumulative_energy_j"] = row["energy_j"]
        rows.append(row)
    return rows


def build_summary(
    *,
    stage: str,
    status: str,
    started_at: str,
    duration_s: float,
    rank: int,
    sensors: list[dict],
    unattributed_j: float,
    cluster: dict,
    skipped: list[str],
    sections: dict[str, list[dict]],
    trace: dict[str, list],
) -> dict:
    """The summary dict of one stage of one process (see the module docstring for the two energies)."""
    energy_j = unattributed_j + sum(s["energy_j"] for s in sensors)
    stage_j = sum(s["energy_this_run_j"] for s in sensors)
    return {
        "stage": stage,
        "status": status,
        "started_at": started_at,
        "duration_s": duration_s,
        "rank": rank,
        "sensors": sensors,
        "sources": sorted({s["source"] for s in sensors}),
        "energy_j": energy_j,
        "cumulative_energy_j": energy_j,
        "energy_this_run_j": stage_j,
        "stage_energy_j": stage_j,
        "stage_mean_power_w": stage_j / duration_s if duration_s > 0 else float("nan"),
        "restored_j": unattributed_j + sum(s["restored_j"] for s in sensors),
        "cluster": cluster,
        "partial": [f"{s['name']}: " + (s["failed"] or f"{s['gaps']} rejected readings") for s in sensors if s["partial"]],
        "skipped": list(skipped),
        "sections": sections,
        "trace": trace,
    }


def local_cluster(rank: int, node_rank: int, sensors: list[dict], unattributed_j: float) -> dict:
    """The cluster figures of a single process (no collective)."""
    energy_j = unattributed_j + sum(s["energy_j"] for s in sensors)
    device_j = sum(s["energy_j"] for s in sensors if not s["host_level"])
    stage_j = sum(s["energy_this_run_j"] for s in sensors)
    return cluster_figures([{"rank": rank, "node_rank": node_rank, "energy_j": energy_j, "device_energy_j": device_j, "stage_energy_j": stage_j}])


def gather_cluster(trainer: Any, session: Any, with_state: bool) -> tuple[dict, list | None]:
    """Every process's energy for the summary (a collective at stage end: all ranks call it) and,
    with ``with_state``, every process's checkpoint state."""
    meter, now = session.meter, session.clock()
    stage_j = sum(meter.stats(n)["energy_this_run_j"] for n in meter.names)
    mine = {"rank": trainer.global_rank, "node_rank": trainer.node_rank, "energy_j": session.energy_at_j(now),
            "device_energy_j": session.device_energy_j(now), "stage_energy_j": stage_j}
    gathered = gather_objects(trainer, (mine, session.local_state() if with_state else None))
    return cluster_figures([g[0] for g in gathered]), [g[1] for g in gathered]


def stage_summary(session: Any, *, t0: float, origin_t: float, node_rank: int, cluster: dict | None, **fields: Any) -> dict:
    """:func:`build_summary` of a finished :class:`~lightning_green.energy.session.EnergySession`
    (``cluster``: as gathered, or None for this process alone)."""
    meter = session.meter
    sensors = sensor_rows(meter)
    trace = {n: [[round(t - origin_t, 4), round(p, 3)] for t, p in meter.trace(n)] for n in meter.names}
    cluster = cluster or local_cluster(fields["rank"], node_rank, sensors, session.unattributed_j)
    return build_summary(duration_s=session.clock() - t0, sensors=sensors, unattributed_j=session.unattributed_j, cluster=cluster, trace=trace, **fields)


def checkpoint_state(trainer: Any, local: dict, per_rank_gathered: list | None) -> dict:
    """A PowerSampler's checkpoint: every process's energy so far, and the total."""
    if trainer is not None and trainer.world_size > 1 and not distributed(trainer) and per_rank_gathered:
        per_rank = list(per_rank_gathered)
        per_rank[trainer.global_rank] = local
    else:
        per_rank = gather_objects(trainer, local) if trainer is not None else [local]
    return {"version": 1, "world_size": len(per_rank), "per_rank_energy_j": per_rank, "total_j": sum(sum(r.values()) for r in per_rank)}


def emit(summary: dict, directory: str, print_table: bool) -> None:
    """Write ``energy_summary_<stage>.json`` to ``directory`` (``summary["path"]`` set on success;
    a failure is a warning) and print the table."""
    path = os.path.join(directory, f"energy_summary_{summary['stage']}.json")
    try:
        write_json(summary, path)
        summary["path"] = path
    except OSError as err:
        log.warning("lightning_green: could not write %s: %s", path, err)
    if print_table:
        render(summary)
        if "path" in summary:
            from lightning.pytorch.utilities.rank_zero import rank_zero_info

            rank_zero_info(f"lightning_green: energy summary written to {path}")


def render(summary: dict) -> None:
    """Print the summary as rich tables: sensors, the totals, then each extra section."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:  # a log file or a pipe: don't squeeze the table into 80 columns
        console = Console(width=120)
    title = f"lightning_green energy summary ({summary['stage']}, {summary['status']})"
    table = Table(title=title, title_justify="left")
    columns = ("sensor", "source", "stage J", "mean W", "seconds", "peak W", "cumulative J", "gaps", "status")
    for col in columns:
        table.add_column(col, justify="left" if col in ("sensor", "source", "status") else "right")
    notes = []
    for s in summary["sensors"]:
        status = "ok" if not s["partial"] else ("failed" if s["failed"] else "gaps")
        if s.get("note"):
            notes.append(f"{s['name']}: {s['note']}")
        table.add_row(
            s["name"], s["source"], _fmt(s["energy_this_run_j"]), _fmt(s["mean_power_w"]), _fmt(s["duration_s"]),
            _fmt(s["peak_power_w"]), _fmt(s["energy_j"]), str(s["gaps"]), status,
        )
    console.print(table)
    sources = "+".join(summary["sources"]) or "none"
    cluster = summary.get("cluster") or {}
    stage_j = summary["energy_this_run_j"]
    lines = notes + [
        f"this stage ({summary['stage']}, this process): {_fmt(stage_j)} J in {_fmt(summary['duration_s'])} s"
        f" = {_fmt(stage_j / summary['duration_s'] if summary['duration_s'] > 0 else float('nan'))} W mean  [source: {sources}]",
        f"total energy (this process, cumulative over every stage and any resumed checkpoint):"
        f" {_fmt(summary['energy_j'])} J = {_fmt(summary['energy_j'] / J_PER_KWH)} kWh  [source: {sources}]",
    ]
    if cluster.get("world_size", 1) > 1:
        per_rank = ", ".join(f"rank {r['rank']} (node {r['node_rank']}): {_fmt(r['energy_j'])} J" for r in cluster["per_rank"])
        imbalance = _fmt(cluster["imbalance"]) if not math.isnan(cluster["imbalance"]) else "n/a (no per-process device sensor)"
        lines.append(f"cluster total, cumulative ({cluster['world_size']} processes, {cluster['num_nodes']} nodes): {_fmt(cluster['total_j'])} J; {per_rank}; device-energy imbalance (max/mean): {imbalance}")
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
