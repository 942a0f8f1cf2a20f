"""The end-of-stage summary: built from an :class:`~lightning_green.energy.session.EnergySession`,
printed as ``rich`` tables (:mod:`lightning_green.summary_table`) and written as JSON.

The summary is schema :data:`~lightning_green.run_summary.SCHEMA` (``docs/summary_json.md`` lists
every key). One key per meaning, the scope in its name: ``stage_energy_j``, ``duration_s`` and
``stage_mean_power_w`` are this stage's (J = W x s in a row); ``cumulative_energy_j`` is this
process's energy over every stage and any checkpoint it resumed from, and what it holds besides this
stage's is split by where it came from: ``carried_j``, measured by this process in earlier stages
(``validate`` then ``fit``, ``fit`` then ``test``), and ``restored_j``, restored from a checkpoint
another process saved (``fit(ckpt_path=...)``), so
``cumulative_energy_j = stage_energy_j + carried_j + restored_j``; each sensor's row has the same
figures. Extra tables are ``sections``, keyed by a stable id, each with a ``kind``, a ``title``,
its ``rows`` and any structured fields (the QAT scheme).
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
from collections.abc import Callable
from typing import Any

from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lightning_green import run_summary as rs
from lightning_green.distributed import cluster_figures, distributed, gather_objects
from lightning_green.energy.loops import LoopTimeline
from lightning_green.report_plot import write_report_picture
from lightning_green.summary_table import fmt, render

log = logging.getLogger("lightning_green")

#: Stages whose summary is printed and written (validate keeps its in memory).
SUMMARY_STAGES = ("fit", "test", "predict")

Provider = Callable[[], "dict[str, list[dict]]"]


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
            f"{fmt(float(sensor['gap_s']), 3)} s of gaps bridged by {sensor.get('gap_bridge') or 'the next reading'}"
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
    # default=str: a tensor in a user's section is written as its text
    text = json.dumps(_jsonable(summary), indent=2, default=str)
    with open(path, "w") as f:
        f.write(text)
    return path


class SummarySections:
    """Extra tables for the next summary: sections set once, and providers asked when it is built.

    Each section has a stable id (the key readers use), a ``kind`` and structured fields; a section
    added with a title only is typed by :func:`~lightning_green.run_summary.typed_section` (the
    package's own titles get their ids; any other is ``custom``, its id its title). A provider that
    raises costs its own section only (it becomes an ``error in ...`` section, and a warning), never
    the summary.

    Example::

        sections = SummarySections()
        sections.add_section("Quantization-aware training", rows, section_id="qat", fields={"scheme": "int8_dynamic"})
        sections.add_section("my table", [{"figure": "x", "value": 1.0}])
        assert sections.collect()["my table"]["kind"] == "custom"
    """

    def __init__(self) -> None:
        self.sections: dict[str, dict] = {}
        self.providers: list[Provider] = []

    def add_section(
        self, title: str, rows: list[dict], *, section_id: str | None = None, fields: dict | None = None
    ) -> None:
        """Set the section ``title`` (``rows``: dicts, one per row). ``section_id``: its stable id (its
        ``kind`` when it is one of the package's, else ``custom``); ``fields``: structured facts
        about it (such as ``{"scheme": "int8_dynamic"}``), so no reader parses the title."""
        if section_id is None:
            section_id, entry = rs.typed_section(title, rows)
        else:
            kind = section_id if section_id in rs.SECTION_TITLES else rs.CUSTOM
            entry = {"kind": kind, "title": title, "rows": list(rows)}
        entry.update(fields or {})
        self.sections[section_id] = entry

    def add_provider(self, provider: Provider) -> None:
        if provider not in self.providers:
            self.providers.append(provider)

    def clear_sections(self) -> None:
        self.sections = {}

    def collect(self) -> dict[str, dict]:
        """Every section, keyed by id: those set, then each provider's (``{title: rows}``)."""
        out = dict(self.sections)
        for provider in self.providers:
            try:
                out.update(rs.typed_sections(provider() or {}))
            # a broken provider must not lose the summary
            except Exception as err:  # noqa: BLE001
                name = getattr(provider, "__qualname__", repr(provider))
                log.warning("lightning_green: the summary section of %s is missing: %r", name, err)
                title = f"{rs.ERROR_TITLE_PREFIX}{name}"
                out[title] = {"kind": rs.ERROR, "title": title, "rows": [{"error": str(err)}]}
        return out


def now_iso() -> str:
    """Wall-clock time with the local zone, for ``started_at``."""
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def sensor_rows(meter, restored: dict[str, float] | None = None) -> list[dict]:
    """Per-sensor figures of a stage, each labelled with its scope: ``stage_energy_j`` (this stage),
    ``cumulative_energy_j``, and the rest of the cumulative split into ``restored_j`` (from a
    checkpoint: ``restored``, per sensor, as
    :meth:`~lightning_green.energy.session.EnergySession.restored_j` gives it) and ``carried_j``
    (measured by this process in earlier stages); ``stage_mean_power_w`` over ``duration_s``."""
    rows = []
    for name in meter.names:
        stats = meter.stats(name)
        offset_j = stats.pop("offset_j")
        cumulative_j = stats.pop("energy_j")
        stage_j = stats.pop("energy_this_run_j")
        restored_j = min(offset_j, (restored or {}).get(name, 0.0))
        row = dict(stats)
        row["stage_mean_power_w"] = row.pop("mean_power_w")
        row["stage_energy_j"] = stage_j
        row["carried_j"] = offset_j - restored_j
        row["restored_j"] = restored_j
        row["cumulative_energy_j"] = cumulative_j
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
    sections: dict,
    trace: dict[str, list],
    timeline: list[dict] | None = None,
) -> dict:
    """The summary dict of one stage of one process (see the module docstring for its energies).

    ``sensors``: :func:`sensor_rows`; ``unattributed_j``: restored energy no sensor of this process
    has (it is in ``restored_j`` and ``cumulative_energy_j``); ``sections``: keyed by id
    (:meth:`SummarySections.collect`), or ``{title: rows}``; ``cluster``: the figures of every
    process (:func:`local_cluster` for one), ``gathered_at`` added."""
    stage_j = sum(s["stage_energy_j"] for s in sensors)
    carried_j = sum(s["carried_j"] for s in sensors)
    restored_j = unattributed_j + sum(s["restored_j"] for s in sensors)
    if cluster:
        cluster = dict(cluster, gathered_at=rs.cluster_gathered_at(cluster.get("world_size") or 1))
    return {
        "schema": rs.SCHEMA,
        "stage": stage,
        "status": status,
        "started_at": started_at,
        "duration_s": duration_s,
        "rank": rank,
        "sensors": sensors,
        "sources": sorted({s["source"] for s in sensors}),
        "stage_energy_j": stage_j,
        "carried_j": carried_j,
        "restored_j": restored_j,
        "cumulative_energy_j": stage_j + carried_j + restored_j,
        "stage_mean_power_w": stage_j / duration_s if duration_s > 0 else float("nan"),
        "cluster": cluster,
        "partial": [f"{s['name']}: {partial_reason(s)}" for s in sensors if s["partial"]],
        "skipped": list(skipped),
        "sections": rs.typed_sections(sections),
        "trace": trace,
        "timeline": list(timeline or []),
    }


def local_cluster(rank: int, node_rank: int, sensors: list[dict], unattributed_j: float) -> dict:
    """The cluster figures of a single process (no collective)."""
    mine = {
        "rank": rank,
        "node_rank": node_rank,
        "energy_j": unattributed_j + sum(s["cumulative_energy_j"] for s in sensors),
        "device_energy_j": sum(s["cumulative_energy_j"] for s in sensors if not s["host_level"]),
        "stage_energy_j": sum(s["stage_energy_j"] for s in sensors),
        "sources": sorted({s["source"] for s in sensors}),
    }
    return cluster_figures([mine])


def gather_cluster(trainer: Any, session: Any, with_state: bool) -> tuple[dict, list | None]:
    """Every process's energy for the summary (a collective at stage end: all ranks call it) and,
    with ``with_state``, every process's checkpoint state."""
    meter = session.meter
    now = session.clock()
    mine = {
        "rank": trainer.global_rank,
        "node_rank": trainer.node_rank,
        "energy_j": session.energy_at_j(now),
        "device_energy_j": session.device_energy_j(now),
        "stage_energy_j": sum(meter.stats(n)["energy_this_run_j"] for n in meter.names),
        "sources": sorted({meter.info(n)["source"] for n in meter.names}),
    }
    state = session.local_state() if with_state else None
    gathered = gather_objects(trainer, (mine, state))
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
        self.stage = ""
        self.t0 = 0.0
        self.started_at = ""
        # the trace's time zero: the first stage's start
        self.origin_t: float | None = None
        self.skipped: list[str] = []
        self.cluster: dict | None = None
        # every process's checkpoint part, gathered at train end
        self.per_rank_state: list[dict] | None = None
        self.timeline = LoopTimeline(clock)

    @property
    def first(self) -> bool:
        """No stage has begun yet (what is said once per run is said now)."""
        return self.origin_t is None

    def begin(self, stage: str, skipped: list[str]) -> None:
        self.stage = stage
        self.skipped = list(skipped)
        self.t0 = self.clock()
        if self.origin_t is None:
            self.origin_t = self.t0
        self.started_at = now_iso()
        self.cluster = None
        self.timeline.reset(self.origin_t)

    def gather(self, trainer: Any, session: Any, with_state: bool = False) -> None:
        """Every process's figures for the summary (a collective: every rank calls it at the same point);
        nothing before the session's first start."""
        if session.meter is None:
            return
        self.cluster, states = gather_cluster(trainer, session, with_state)
        if with_state:
            self.per_rank_state = states

    def sources(self, this_process: str) -> str:
        """The sources of every process's sensors as last gathered, else ``this_process``'s."""
        if self.cluster is not None and self.cluster["sources"]:
            return "+".join(self.cluster["sources"])
        return this_process

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
    if trainer is not None and trainer.world_size > 1 and not distributed(trainer) and per_rank_gathered:
        per_rank = list(per_rank_gathered)
        origins = [None] * len(per_rank_gathered)
        per_rank[trainer.global_rank] = local
        origins[trainer.global_rank] = origin
    else:
        pairs = gather_objects(trainer, (local, origin)) if trainer is not None else [(local, origin)]
        per_rank = [p[0] for p in pairs]
        origins = [p[1] for p in pairs]
    return {
        "version": 1,
        "world_size": len(per_rank),
        "per_rank_energy_j": per_rank,
        "origins": origins,
        "total_j": sum(sum(r.values()) for r in per_rank),
    }


def emit(summary: dict, directory: str, print_table: bool, picture: dict | None = None) -> None:
    """Write ``energy_summary_<stage>.json`` to ``directory`` (``summary["path"]`` set on success;
    a failure is a warning), print the table and, with ``picture`` (the keyword arguments of
    :func:`~lightning_green.report_plot.write_report_picture`: ``loggers``, ``step``, ``info``),
    draw ``energy_report_<stage>.png`` beside it (``summary["picture"]`` set when drawn)."""
    path = os.path.join(directory, f"energy_summary_{summary['stage']}.json")
    try:
        write_json(summary, path)
        summary["path"] = path
    # teardown must not fail a finished run over its summary
    except (OSError, TypeError, ValueError) as err:
        log.warning("lightning_green: could not write %s: %s", path, err)
    if picture is not None:
        drawn = write_report_picture(summary, directory, summary["stage"], **picture)
        if drawn is not None:
            summary["picture"] = drawn
    if print_table:
        try:
            render(summary)
        # the JSON is written; a table that cannot print is a warning
        except Exception as err:  # noqa: BLE001
            log.warning("lightning_green: could not print the summary table: %s: %s", type(err).__name__, err)
        if "path" in summary:
            rank_zero_info(f"lightning_green: energy summary written to {path}")
