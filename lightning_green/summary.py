"""The end-of-stage summary: built from an :class:`~lightning_green.energy.session.EnergySession`,
printed as ``rich`` tables and written as JSON.

Every stage's summary gives that stage's own energy, time and mean power (``stage_energy_j``,
``duration_s``, ``stage_mean_power_w``: J = W x s in a row) and, labelled apart, the process's
cumulative energy over every stage and any checkpoint it resumed from (``energy_j``, also
``cumulative_energy_j``). What the cumulative holds besides this stage's is split by where it came
from: ``carried_j``, measured by this process in earlier stages (``validate`` then ``fit``, ``fit``
then ``test``), and ``restored_j``, restored from a checkpoint another process saved (``fit(ckpt_path=...)``), so
``energy_j = stage_energy_j + carried_j + restored_j``; each sensor's row has the same figures.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
from collections.abc import Callable
from typing import Any

from lightning_green.energy.loops import LoopTimeline
from lightning_green.energy.metrics import J_PER_KWH

log = logging.getLogger("lightning_green")

# lightning_green.distributed (torch) is imported where a summary is built, not here: `show` renders
# a written summary without torch.

#: Stages whose summary is printed and written (validate keeps its in memory).
SUMMARY_STAGES = ("fit", "test", "predict")

Provider = Callable[[], "dict[str, list[dict]]"]


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:.{digits}g}"
    return str(value)


def _ratio(num: Any, den: Any) -> float:
    """``num / den``, NaN when either is missing (a JSON null) or ``den`` is not > 0."""
    ok = isinstance(num, (int, float)) and isinstance(den, (int, float)) and den > 0
    return num / den if ok else float("nan")


def _is_nan(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def partial_reason(sensor: dict) -> str:
    """Why a sensor's figures are partial, in words, from the meter's stats (a row of an older
    summary may lack some of them)."""
    if sensor.get("failed"):
        how = "; its reader was abandoned, still blocked at stop" if sensor.get("abandoned") else ""
        return f"dropped ({sensor['failed']}){how}; figures up to its last good reading + at most one interval"
    parts = []
    for key, words in (
        ("rejected", "readings rejected"),
        ("transient_errors", "transient read errors (retried)"),
        ("resets", "counter resets"),
    ):
        if sensor.get(key):
            parts.append(f"{sensor[key]} {words}")
    if not parts and sensor.get("gaps"):
        parts.append(f"{sensor['gaps']} readings missed")
    if sensor.get("gap_s"):
        parts.append(
            f"{_fmt(float(sensor['gap_s']), 3)} s of gaps bridged by {sensor.get('gap_bridge') or 'the next reading'}"
        )
    if sensor.get("last_problem"):
        parts.append(f"last: {sensor['last_problem']}")
    return "; ".join(parts) or "partial"


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
    text = json.dumps(_jsonable(summary), indent=2, default=str)  # a tensor in a user's section: its text
    with open(path, "w") as f:
        f.write(text)
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


def sensor_rows(meter, restored: dict[str, float] | None = None) -> list[dict]:
    """Per-sensor figures of a stage, each labelled: the stage's own and the cumulative energy, and
    the rest of the cumulative split into ``restored_j`` (from a checkpoint: ``restored``, per sensor,
    as :meth:`~lightning_green.energy.session.EnergySession.restored_j` gives it) and ``carried_j``
    (measured by this process in earlier stages)."""
    rows = []
    for name in meter.names:
        row = meter.stats(name)
        offset_j = row.pop("offset_j")
        row["restored_j"] = min(offset_j, (restored or {}).get(name, 0.0))
        row["carried_j"] = offset_j - row["restored_j"]
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
    timeline: list[dict] | None = None,
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
        "restored_j": unattributed_j + sum(s["restored_j"] for s in sensors),  # from a checkpoint
        "carried_j": sum(s["carried_j"] for s in sensors),  # from earlier stages of this process
        "cluster": cluster,
        "partial": [f"{s['name']}: {partial_reason(s)}" for s in sensors if s["partial"]],
        "skipped": list(skipped),
        "sections": sections,
        "trace": trace,
        "timeline": list(timeline or []),
    }


def local_cluster(rank: int, node_rank: int, sensors: list[dict], unattributed_j: float) -> dict:
    """The cluster figures of a single process (no collective)."""
    from lightning_green.distributed import cluster_figures

    energy_j = unattributed_j + sum(s["energy_j"] for s in sensors)
    device_j = sum(s["energy_j"] for s in sensors if not s["host_level"])
    stage_j = sum(s["energy_this_run_j"] for s in sensors)
    sources = sorted({s["source"] for s in sensors})
    return cluster_figures(
        [
            {
                "rank": rank,
                "node_rank": node_rank,
                "energy_j": energy_j,
                "device_energy_j": device_j,
                "stage_energy_j": stage_j,
                "sources": sources,
            }
        ]
    )


def gather_cluster(trainer: Any, session: Any, with_state: bool) -> tuple[dict, list | None]:
    """Every process's energy for the summary (a collective at stage end: all ranks call it) and,
    with ``with_state``, every process's checkpoint state."""
    from lightning_green.distributed import cluster_figures, gather_objects

    meter, now = session.meter, session.clock()
    stage_j = sum(meter.stats(n)["energy_this_run_j"] for n in meter.names)
    mine = {
        "rank": trainer.global_rank,
        "node_rank": trainer.node_rank,
        "energy_j": session.energy_at_j(now),
        "device_energy_j": session.device_energy_j(now),
        "stage_energy_j": stage_j,
        "sources": sorted({meter.info(n)["source"] for n in meter.names}),
    }
    gathered = gather_objects(trainer, (mine, session.local_state() if with_state else None))
    return cluster_figures([g[0] for g in gathered]), [g[1] for g in gathered]


def stage_summary(
    session: Any, *, t0: float, origin_t: float, node_rank: int, cluster: dict | None, **fields: Any
) -> dict:
    """:func:`build_summary` of a finished :class:`~lightning_green.energy.session.EnergySession`
    (``cluster``: as gathered, or None for this process alone)."""
    meter = session.meter
    sensors = sensor_rows(meter, session.restored_j())
    trace = {n: [[round(t - origin_t, 4), round(p, 3)] for t, p in meter.trace(n)] for n in meter.names}
    cluster = cluster or local_cluster(fields["rank"], node_rank, sensors, session.unattributed_j)
    return build_summary(
        duration_s=session.clock() - t0,
        sensors=sensors,
        unattributed_j=session.unattributed_j,
        cluster=cluster,
        trace=trace,
        **fields,
    )


class StageRecord:
    """What a stage's summary needs besides the meter, kept Trainer-free: the stage's name, start and
    loops (a :class:`~lightning_green.energy.loops.LoopTimeline` on the trace's axis, whose origin is
    the first stage's start), the sensors skipped, and the figures gathered from every process.

    Example::

        record = StageRecord(session.clock)
        record.begin("fit", skipped=[])
        record.timeline.begin("train")
        summary = record.summary(session, "finished", rank=0, node_rank=0, world_size=1, sections={})
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.stage, self.t0, self.started_at = "", 0.0, ""
        self.origin_t: float | None = None  # the trace's time zero: the first stage's start
        self.skipped: list[str] = []
        self.cluster: dict | None = None
        self.per_rank_state: list[dict] | None = None  # every process's checkpoint part, gathered at train end
        self.timeline = LoopTimeline(clock)

    @property
    def first(self) -> bool:
        """No stage has begun yet (what is said once per run is said now)."""
        return self.origin_t is None

    def begin(self, stage: str, skipped: list[str]) -> None:
        self.stage, self.skipped = stage, list(skipped)
        self.t0 = self.clock()
        self.origin_t = self.t0 if self.origin_t is None else self.origin_t
        self.started_at, self.cluster = now_iso(), None
        self.timeline.reset(self.origin_t)

    def gather(self, trainer: Any, session: Any, with_state: bool = False) -> None:
        """Every process's figures for the summary (a collective: every rank calls it at the same point);
        nothing before the session's first start."""
        if session.meter is None:
            return
        self.cluster, states = gather_cluster(trainer, session, with_state)
        self.per_rank_state = states if with_state else self.per_rank_state

    def sources(self, this_process: str) -> str:
        """The sources of every process's sensors as last gathered, else ``this_process``'s."""
        return (
            "+".join(self.cluster["sources"]) if self.cluster is not None and self.cluster["sources"] else this_process
        )

    def stage_loop_ended(self, trainer: Any, session: Any, with_state: bool = False) -> None:
        """The stage's main loop (training, or that of validate, test, predict) ended: it leaves the
        timeline, and every process's figures are gathered (a collective)."""
        self.timeline.end()
        self.gather(trainer, session, with_state)

    def summary(self, session: Any, status: str, *, rank: int, node_rank: int, world_size: int, sections: dict) -> dict:
        """The stage's summary (:func:`stage_summary`); the loop running now ends here."""
        self.timeline.end()
        return stage_summary(
            session,
            stage=self.stage,
            status=status,
            started_at=self.started_at,
            t0=self.t0,
            origin_t=self.origin_t,
            rank=rank,
            node_rank=node_rank,
            cluster=self.cluster if world_size > 1 else None,
            skipped=self.skipped,
            sections=sections,
            timeline=self.timeline.as_rows(),
        )


def checkpoint_state(trainer: Any, local: dict, per_rank_gathered: list | None, origin: str | None = None) -> dict:
    """A PowerSampler's checkpoint: every process's energy so far, the total, and each process's
    ``origin`` (:attr:`EnergySession.origin`: a process that loads its own checkpoint has counted it)."""
    from lightning_green.distributed import distributed, gather_objects

    if trainer is not None and trainer.world_size > 1 and not distributed(trainer) and per_rank_gathered:
        per_rank, origins = list(per_rank_gathered), [None] * len(per_rank_gathered)
        per_rank[trainer.global_rank], origins[trainer.global_rank] = local, origin
    else:
        pairs = gather_objects(trainer, (local, origin)) if trainer is not None else [(local, origin)]
        per_rank, origins = [p[0] for p in pairs], [p[1] for p in pairs]
    return {"version": 1, "world_size": len(per_rank), "per_rank_energy_j": per_rank, "origins": origins,
            "total_j": sum(sum(r.values()) for r in per_rank)}  # fmt: skip


def emit(summary: dict, directory: str, print_table: bool, picture: dict | None = None) -> None:
    """Write ``energy_summary_<stage>.json`` to ``directory`` (``summary["path"]`` set on success;
    a failure is a warning), print the table and, with ``picture`` (the keyword arguments of
    :func:`~lightning_green.report_plot.write_report_picture`: ``loggers``, ``step``, ``info``),
    draw ``energy_report_<stage>.png`` beside it (``summary["picture"]`` set when drawn)."""
    path = os.path.join(directory, f"energy_summary_{summary['stage']}.json")
    try:
        write_json(summary, path)
        summary["path"] = path
    except (OSError, TypeError, ValueError) as err:  # teardown must not fail a finished run over its summary
        log.warning("lightning_green: could not write %s: %s", path, err)
    if picture is not None:
        from lightning_green.report_plot import write_report_picture

        drawn = write_report_picture(summary, directory, summary["stage"], **picture)
        if drawn is not None:
            summary["picture"] = drawn
    if print_table:
        try:
            render(summary)
        except Exception as err:  # noqa: BLE001 - the JSON is written; a table that cannot print is a warning
            log.warning("lightning_green: could not print the summary table: %s: %s", type(err).__name__, err)
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
        status = "ok" if not s.get("partial") else ("failed" if s.get("failed") else "gaps")
        if s.get("note"):
            notes.append(f"{s['name']}: {s['note']}")
        table.add_row(
            s["name"],
            str(s.get("source")),
            _fmt(s.get("energy_this_run_j")),
            _fmt(s.get("mean_power_w")),
            _fmt(s.get("duration_s")),
            _fmt(s.get("peak_power_w")),
            _fmt(s.get("energy_j")),
            _fmt(s.get("gaps")),
            status,
        )
    console.print(table)
    sources = "+".join(summary.get("sources") or []) or "none"
    cluster = summary.get("cluster") or {}
    stage_j, duration_s, energy_j = summary.get("energy_this_run_j"), summary.get("duration_s"), summary.get("energy_j")
    lines = notes + [
        f"this stage ({summary['stage']}, this process): {_fmt(stage_j)} J in {_fmt(duration_s)} s"
        f" = {_fmt(_ratio(stage_j, duration_s))} W mean  [source: {sources}]",
        f"total energy (this process, cumulative over every stage and any resumed checkpoint):"
        f" {_fmt(energy_j)} J = {_fmt(_ratio(energy_j, J_PER_KWH))} kWh  [source: {sources}]",
    ]
    carried_j, restored_j = summary.get("carried_j"), summary.get("restored_j")
    if "carried_j" not in summary and restored_j:  # an older summary: its restored_j held earlier stages too
        lines.append(
            f"  of the total, carried in (earlier stages of this process or a checkpoint): {_fmt(restored_j)} J  [source: {sources}]"
        )
    elif carried_j or restored_j:
        lines.append(
            f"  of the total: this stage {_fmt(stage_j)} J; carried from earlier stages of this process"
            f" {_fmt(carried_j or 0.0)} J; restored from a checkpoint {_fmt(restored_j or 0.0)} J"
            f"  [source: {sources}; restored: as the run that wrote the checkpoint measured it]"
        )
    if (cluster.get("world_size") or 1) > 1:
        per_rank = ", ".join(
            f"rank {r.get('rank')} (node {r.get('node_rank')}): {_fmt(r.get('energy_j'))} J"
            for r in cluster.get("per_rank") or []
        )
        imbalance = (
            "n/a (no per-process device sensor)" if _is_nan(cluster.get("imbalance")) else _fmt(cluster["imbalance"])
        )
        lines.append(
            f"cluster total, cumulative ({cluster['world_size']} processes, {_fmt(cluster.get('num_nodes'))} nodes): {_fmt(cluster.get('total_j'))} J; {per_rank}; device-energy imbalance (max/mean): {imbalance}"
        )
    if summary.get("partial"):
        lines.append("partial figures: " + "; ".join(summary["partial"]))
    for reason in summary.get("skipped") or []:
        lines.append("skipped: " + reason)
    for line in lines:
        console.print(line, markup=False, highlight=False)
    for section, rows in (summary.get("sections") or {}).items():
        if not rows:
            continue
        sub = Table(title=section, title_justify="left")
        columns = list(dict.fromkeys(k for row in rows for k in row))
        for col in columns:
            sub.add_column(col)
        for row in rows:
            sub.add_row(*(_fmt(row.get(c)) for c in columns))
        console.print(sub)
