"""A summary dict as text: the energy figures with their scope, and the ``rich`` tables.

Torch-free (``rich`` and :mod:`lightning_green.run_summary` only): the end-of-stage table
(:func:`lightning_green.summary.emit`), ``python -m lightning_green show`` and ``compare`` use it, so
the two commands start without torch or Lightning. :func:`energy_figures` gives the figures with
labels that say their scope (this stage, carried from earlier stages, restored from a checkpoint,
cumulative, all processes at loop end); ``show`` prints them and ``compare`` lines them up across runs.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from rich.console import Console
from rich.table import Table

from lightning_green import run_summary as rs

DURATION = "duration, this stage"
STAGE_ENERGY = "energy, this stage"
CARRIED = "energy carried from earlier stages"
RESTORED = "energy restored from checkpoint"
CUMULATIVE = "energy cumulative"
STAGE_POWER = "mean power, this stage"
ALL_STAGE = "energy all processes, this stage (at loop end)"
ALL_CUMULATIVE = "energy all processes, cumulative (at loop end)"
#: What an energy figure reads when no sensor measured the stage (instead of 0 J).
NO_SENSOR = "no energy measured (no sensor)"
ALL_PROCESSES_NOTE = (
    "energy all processes: every process's figures, gathered at the end of the stage's loop; this"
    " process's own figures are read at teardown, after the loop (work after it, such as QAT's conversion"
    " or a last checkpoint, is only in them), and a host-level sensor (CPU, DRAM) is read by one process"
    " per node, so the all-processes figure can be lower than this process's cumulative"
)
RESTORED_NOTE = "energy restored from checkpoint: as the run that wrote the checkpoint measured it"


class EnergyFigure(NamedTuple):
    """One energy figure of a summary: its label (with its scope), unit, better direction
    (``"lower"``, or None where neither is better) and value (:data:`NO_SENSOR` without a sensor)."""

    figure: str
    unit: str
    better: str | None
    value: Any


def fmt(value: Any, digits: int = 4) -> str:
    """A figure as text: ``-`` for a missing one, ``n/a`` for NaN, 4 significant digits."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:.{digits}g}"
    return str(value)


def is_nan(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def multi_process(summary: dict) -> bool:
    """True when the summary's cluster figures were gathered from several processes at loop end."""
    cluster = summary.get("cluster") or {}
    return (cluster.get("world_size") or 1) > 1 and cluster.get("gathered_at") == "loop_end"


def energy_figures(summary: dict) -> list[EnergyFigure]:
    """The summary's time, energy and power figures, each labelled with its scope (``summary`` in
    the current schema: see :func:`lightning_green.run_summary.upgrade`)."""
    measured = rs.measured(summary)

    def energy(value: Any) -> Any:
        return value if measured else NO_SENSOR

    out = [
        EnergyFigure(DURATION, "s", "lower", summary.get("duration_s")),
        EnergyFigure(STAGE_ENERGY, "J", "lower", energy(summary.get("stage_energy_j"))),
        EnergyFigure(CARRIED, "J", None, energy(summary.get("carried_j"))),
        EnergyFigure(RESTORED, "J", None, energy(summary.get("restored_j"))),
        EnergyFigure(CUMULATIVE, "J", "lower", energy(summary.get("cumulative_energy_j"))),
        EnergyFigure(STAGE_POWER, "W", None, energy(summary.get("stage_mean_power_w"))),
    ]
    if multi_process(summary):
        cluster = summary["cluster"]
        out.append(EnergyFigure(ALL_STAGE, "J", "lower", energy(cluster.get("stage_total_j"))))
        out.append(EnergyFigure(ALL_CUMULATIVE, "J", "lower", energy(cluster.get("total_j"))))
    return out


def sensor_figure(sensor: dict) -> EnergyFigure:
    """One sensor's energy of this stage."""
    return EnergyFigure(f"energy {sensor.get('name', '?')}, this stage", "J", "lower", sensor.get("stage_energy_j"))


def footnotes(summary: dict) -> list[str]:
    """What a reader of :func:`energy_figures` needs to know: where restored energy comes from, and
    why the all-processes figures differ from this process's."""
    notes = []
    if rs.measured(summary) and summary.get("restored_j"):
        notes.append(RESTORED_NOTE)
    if multi_process(summary):
        rank = summary.get("rank")
        notes.append(f"this stage, carried, restored, cumulative: this process (rank {rank}) only")
        notes.append(ALL_PROCESSES_NOTE)
    return notes


def render(summary: dict, console: Any = None) -> None:
    """Print a summary (any schema) as at the end of its stage: the sensors, the energy figures with
    their scope, notes, then each extra section."""
    summary = rs.upgrade(summary)
    if console is None:
        console = Console()
        if not console.is_terminal:
            # a log file or a pipe: don't squeeze the table into 80 columns
            console = Console(width=120)
    sources = "+".join(summary.get("sources") or []) or "none"
    title = f"lightning_green energy summary ({summary['stage']}, {summary['status']})"
    if rs.measured(summary):
        console.print(_sensor_table(summary, title))
    else:
        console.print(f"{title}: {NO_SENSOR}", markup=False, highlight=False)
    lines = [f"{s['name']}: {s['note']}" for s in summary["sensors"] if s.get("note")]
    lines += [_figure_line(f, sources) for f in energy_figures(summary)]
    if multi_process(summary):
        lines.append(_per_rank_line(summary["cluster"]))
    lines += footnotes(summary)
    if summary.get("partial"):
        lines.append("partial figures: " + "; ".join(summary["partial"]))
    for reason in summary.get("skipped") or []:
        lines.append("skipped: " + reason)
    for line in lines:
        console.print(line, markup=False, highlight=False)
    for entry in (summary.get("sections") or {}).values():
        if entry.get("rows"):
            console.print(_section_table(entry))


def _sensor_table(summary: dict, title: str) -> Any:
    table = Table(title=title, title_justify="left")
    columns = (
        "sensor",
        "source",
        "stage J",
        "stage mean W",
        "stage s",
        "peak W",
        "carried J",
        "restored J",
        "cumulative J",
        "gaps",
        "status",
    )
    for col in columns:
        table.add_column(col, justify="left" if col in ("sensor", "source", "status") else "right")
    for s in summary["sensors"]:
        status = "ok" if not s.get("partial") else ("failed" if s.get("failed") else "gaps")
        table.add_row(
            s["name"],
            str(s.get("source")),
            fmt(s.get("stage_energy_j")),
            fmt(s.get("stage_mean_power_w")),
            fmt(s.get("duration_s")),
            fmt(s.get("peak_power_w")),
            fmt(s.get("carried_j")),
            fmt(s.get("restored_j")),
            fmt(s.get("cumulative_energy_j")),
            fmt(s.get("gaps")),
            status,
        )
    return table


def _figure_line(figure: EnergyFigure, sources: str) -> str:
    if figure.value == NO_SENSOR:
        return f"{figure.figure}: {NO_SENSOR}"
    text = f"{figure.figure}: {fmt(figure.value)} {figure.unit}"
    if figure.unit == "s":
        return text
    return f"{text}  [source: {sources}]"


def _per_rank_line(cluster: dict) -> str:
    per_rank = ", ".join(
        f"rank {r.get('rank')} (node {r.get('node_rank')}): {fmt(r.get('energy_j'))} J"
        for r in cluster.get("per_rank") or []
    )
    imbalance = cluster.get("imbalance")
    shown = "n/a (no per-process device sensor)" if is_nan(imbalance) else fmt(imbalance)
    processes = f"{cluster['world_size']} processes, {fmt(cluster.get('num_nodes'))} nodes"
    return (
        f"per process, cumulative (at loop end; {processes}): {per_rank}; device-energy imbalance (max/mean): {shown}"
    )


def _section_table(entry: dict) -> Any:
    title = entry.get("title") or ""
    fields = [str(v) for k, v in entry.items() if k not in ("kind", "title", "rows") and v is not None]
    shown = [v for v in fields if v not in title]
    if shown:
        title += f" ({', '.join(shown)})"
    rows = entry["rows"]
    table = Table(title=title, title_justify="left")
    columns = list(dict.fromkeys(k for row in rows for k in row))
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*(fmt(row.get(c)) for c in columns))
    return table
