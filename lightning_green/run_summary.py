"""Read a written energy summary (``energy_summary_<stage>.json``): find it, check it, pick figures.

Plain Python on the JSON that :class:`~lightning_green.PowerSampler` writes; no torch or Lightning
import, so ``python -m lightning_green compare`` starts fast. The report picture
(:mod:`lightning_green.report_plot`), the table (:mod:`lightning_green.summary_table`) and the
``compare`` command read summaries through here only.

A summary carries its format in ``schema`` (:data:`SCHEMA`; absent: schema 1, the format before it).
:func:`load_summary` and :func:`upgrade` give every reader schema 2: one key per meaning, the scope
in its name (``stage_energy_j``, ``carried_j``, ``restored_j``, ``cumulative_energy_j``), and
sections keyed by a stable id with a ``kind`` and structured fields (the QAT scheme is a field, not
part of a title). ``docs/summary_json.md`` describes every key. Every reader tolerates a missing
section: a summary without phases, QAT or targets gives ``[]`` or ``None`` for it.
"""

from __future__ import annotations

import json
import os
from typing import Any

#: The summary format this package writes (and the newest it reads).
SCHEMA = 2
SUMMARY_PREFIX = "energy_summary_"
# RUN/ -> lightning_logs/ -> version_N/ -> energy_summary_fit.json, and one more
MAX_DEPTH = 4
REQUIRED_KEYS = ("stage", "sensors")
#: The key holding the cumulative energy, by schema (what a file must have to be a summary).
ENERGY_KEY = {1: "energy_j", 2: "cumulative_energy_j"}

# Section ids (each also its ``kind``) of the package's own sections, and the titles they are shown under.
EFFICIENCY = "efficiency"
PHASES = "phases"
TARGETS = "targets"
POWER_LIMIT = "power_limit"
QAT = "qat"
ENERGY_BUDGET = "energy_budget"
PRUNING = "pruning"
GENERATION = "generation"
GENERATION_PHASES = "generation_phases"
#: The kind of a section added by a user (its id is its title), and of one whose provider failed.
CUSTOM = "custom"
ERROR = "error"
SECTION_TITLES = {
    EFFICIENCY: "efficiency",
    PHASES: "energy by phase",
    TARGETS: "targets",
    POWER_LIMIT: "Power limit search",
    QAT: "Quantization-aware training",
    ENERGY_BUDGET: "energy budget",
    PRUNING: "Structured pruning",
    GENERATION: "generation",
    GENERATION_PHASES: "generation phases",
}
POWER_LIMIT_TITLE = SECTION_TITLES[POWER_LIMIT]
#: Sections of schema 1 were keyed by title only; the QAT title also held the scheme in parentheses.
QAT_TITLE = SECTION_TITLES[QAT]
ERROR_TITLE_PREFIX = "error in "


class SummaryError(ValueError):
    """A path that is not a readable energy summary, or a folder without exactly one run."""


def is_estimate(source: str | None) -> bool:
    """True when a figure's source (``"estimate"``, ``"estimate+simulated"`` …) involves an estimate."""
    return "estimate" in (source or "").split("+")


def schema_of(summary: dict) -> int:
    """The summary's format: its ``schema``, 1 when absent (files written before the key existed)."""
    return summary.get("schema", 1)


def load_summary(path: str | os.PathLike) -> dict:
    """The summary in the JSON file ``path``, in the current schema (an older file is upgraded).

    Raises:
        SummaryError: the file cannot be read, is not JSON, lacks ``stage``, ``sensors`` or the
            cumulative energy of its schema, or has a schema newer than :data:`SCHEMA`.
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as err:
        raise SummaryError(f"{path}: cannot read it ({err.strerror or err})") from None
    except ValueError as err:
        raise SummaryError(f"{path}: not an energy summary (not valid JSON: {err})") from None
    if not isinstance(data, dict):
        raise SummaryError(f"{path}: not an energy summary (a JSON {type(data).__name__}, not an object)")
    schema = schema_of(data)
    if schema not in ENERGY_KEY:
        raise SummaryError(
            f"{path}: written in summary schema {schema!r}; this lightning_green reads schemas 1 to {SCHEMA}"
        )
    missing = [k for k in REQUIRED_KEYS if k not in data] or [k for k in (ENERGY_KEY[schema],) if k not in data]
    if missing:
        raise SummaryError(f"{path}: not an energy summary (a JSON without {', '.join(repr(k) for k in missing)})")
    if not isinstance(data["sensors"], list):
        raise SummaryError(f"{path}: not an energy summary ('sensors' is not a list)")
    return upgrade(data)


# ---------------------------------------------------------------------------------------- schema 1
def upgrade(summary: dict) -> dict:
    """``summary`` in the current schema: a schema 2 summary as it is, a schema 1 one converted (its
    synonym keys dropped, its sections given ids; ``upgraded_from_schema`` says it was converted)."""
    if schema_of(summary) == SCHEMA:
        return summary
    out = {k: v for k, v in summary.items() if k not in ("energy_j", "energy_this_run_j")}
    out["schema"] = SCHEMA
    out["upgraded_from_schema"] = schema_of(summary)
    out.update(_energies_v1(summary))
    if "stage_mean_power_w" not in summary:
        out["stage_mean_power_w"] = _per_second(out["stage_energy_j"], summary.get("duration_s"))
    out["sensors"] = [_sensor_v1(s) for s in summary["sensors"]]
    out["sections"] = typed_sections(summary.get("sections") or {})
    cluster = summary.get("cluster")
    if isinstance(cluster, dict):
        out["cluster"] = dict(cluster, gathered_at=cluster_gathered_at(cluster.get("world_size") or 1))
    return out


def cluster_gathered_at(world_size: int) -> str:
    """When the cluster figures of a summary were taken: with several processes, gathered from all of
    them at the end of the stage's loop (``"loop_end"``); alone, this process's at teardown."""
    return "loop_end" if world_size > 1 else "teardown"


def _energies_v1(figures: dict) -> dict:
    """The four energies of a schema 1 summary or sensor row under their schema 2 names. A file older
    than ``carried_j`` held earlier stages and checkpoints together in ``restored_j``: the split is
    unknown, so both are None there."""
    cumulative_j = figures.get("cumulative_energy_j", figures.get("energy_j"))
    stage_j = figures.get("stage_energy_j", figures.get("energy_this_run_j"))
    has_split = "carried_j" in figures
    return {
        "stage_energy_j": stage_j,
        "carried_j": figures.get("carried_j") if has_split else None,
        "restored_j": figures.get("restored_j") if has_split else None,
        "cumulative_energy_j": cumulative_j,
    }


def _per_second(energy_j: Any, duration_s: Any) -> float | None:
    """Mean power: ``energy_j / duration_s``, None when either is missing or the duration is not > 0."""
    numbers = isinstance(energy_j, (int, float)) and isinstance(duration_s, (int, float))
    return energy_j / duration_s if numbers and duration_s > 0 else None


def _sensor_v1(sensor: dict) -> dict:
    out = {k: v for k, v in sensor.items() if k not in ("energy_j", "energy_this_run_j", "mean_power_w")}
    out.update(_energies_v1(sensor))
    out["stage_mean_power_w"] = sensor.get("mean_power_w")
    return out


def typed_section(title: str, rows: list[dict]) -> tuple[str, dict]:
    """``(id, section)`` for a section known only by its title (schema 1, or added without an id):
    the package's own titles get their ids, a schema-1 QAT title its scheme as a field; any other is
    ``custom``. Sections added with an id (the package's own, since schema 2) never come here."""
    rows = list(rows or [])
    for section_id, known in SECTION_TITLES.items():
        if title == known:
            return section_id, {"kind": section_id, "title": title, "rows": rows}
    if title.startswith(QAT_TITLE + " ("):
        scheme = title[len(QAT_TITLE) :].strip(" ()") or None
        return QAT, {"kind": QAT, "title": title, "rows": rows, "scheme": scheme}
    kind = ERROR if title.startswith(ERROR_TITLE_PREFIX) else CUSTOM
    return title, {"kind": kind, "title": title, "rows": rows}


def typed_sections(sections: dict) -> dict[str, dict]:
    """Sections keyed by id: entries already typed (a dict with ``rows``) kept, ``{title: rows}`` typed."""
    out = {}
    for key, value in sections.items():
        if isinstance(value, dict) and "rows" in value:
            out[key] = value
        else:
            section_id, entry = typed_section(key, value)
            out[section_id] = entry
    return out


# ---------------------------------------------------------------------------------------- finding runs
def find_summaries(directory: str, max_depth: int = MAX_DEPTH) -> list[str]:
    """Every ``energy_summary_*.json`` under ``directory``, at most ``max_depth`` levels down, sorted.
    Hidden folders are skipped."""
    found: list[str] = []
    base_depth = directory.rstrip(os.sep).count(os.sep)
    for root, dirs, files in os.walk(directory):
        depth = root.rstrip(os.sep).count(os.sep) - base_depth
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if depth + 1 < max_depth else []
        found += [os.path.join(root, f) for f in files if f.startswith(SUMMARY_PREFIX) and f.endswith(".json")]
    return sorted(found)


def resolve_run(path: str, stage: str | None = None) -> str:
    """The summary file of one RUN: ``path`` itself when it is a file, else the one run folder under
    it (``lightning_logs/version_N`` or a parent holding a single run). Within a run, ``stage``
    (default: ``fit`` when present, else the first stage by name).

    Raises:
        SummaryError: ``path`` does not exist, holds no summary, holds several runs, or lacks ``stage``.
    """
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise SummaryError(f"{path}: no such file or directory")
    files = find_summaries(path)
    if not files:
        raise SummaryError(f"{path}: no {SUMMARY_PREFIX}*.json in this directory (searched {MAX_DEPTH} levels down)")
    runs = sorted({os.path.dirname(f) for f in files})
    if len(runs) > 1:
        shown = ", ".join(os.path.relpath(r, path) for r in runs[:4])
        more = " …" if len(runs) > 4 else ""
        raise SummaryError(f"{path}: holds {len(runs)} runs ({shown}{more}); pass one of them")
    by_stage = {os.path.basename(f)[len(SUMMARY_PREFIX) : -len(".json")]: f for f in files}
    if stage is None:
        stage = "fit" if "fit" in by_stage else sorted(by_stage)[0]
    if stage not in by_stage:
        raise SummaryError(f"{path}: no {stage!r} summary (it has: {', '.join(sorted(by_stage))})")
    return by_stage[stage]


# ---------------------------------------------------------------------------------------- figures
def measured(summary: dict) -> bool:
    """True when a sensor measured the stage (a summary with no sensor has energies of 0 J that
    nothing measured)."""
    return bool(summary.get("sensors"))


def section_entry(summary: dict, section_id: str) -> dict | None:
    """The section ``section_id`` (``{"kind", "title", "rows", ...fields}``), or None."""
    entry = (summary.get("sections") or {}).get(section_id)
    return entry if isinstance(entry, dict) else None


def section(summary: dict, section_id: str) -> list[dict]:
    """The rows of the section ``section_id``; ``[]`` without it."""
    entry = section_entry(summary, section_id)
    return list(entry.get("rows") or []) if entry is not None else []


def sources(summary: dict) -> str:
    """The summary's sources joined with ``+`` (``"none"`` when it has none)."""
    return "+".join(summary.get("sources") or sorted({s.get("source", "?") for s in summary["sensors"]})) or "none"


def efficiency(summary: dict) -> dict[str, tuple[Any, str]]:
    """EfficiencyLogger's figures: ``{figure: (value, source)}`` (``train_energy_j``, ``tokens_per_j``, …)."""
    return {r["figure"]: (r.get("value"), r.get("source") or "") for r in section(summary, EFFICIENCY) if "figure" in r}


def phases(summary: dict) -> list[dict]:
    """Phase rows with an energy figure: ``[{"phase", "energy_j", "seconds", "source"}]``."""
    return [r for r in section(summary, PHASES) if isinstance(r.get("energy_j"), (int, float)) and "phase" in r]


def qat_pairs(summary: dict) -> list[dict]:
    """QAT figures measured on both models: ``[{"figure", "unit", "float", "converted", "source_float",
    "source_converted"}]``, from the rows named ``"<figure>, float"`` and ``"<figure>, converted"``."""
    rows = {r["figure"]: r for r in section(summary, QAT) if "figure" in r}
    pairs = []
    for name, row in rows.items():
        if not name.endswith(", float"):
            continue
        figure = name[: -len(", float")]
        other = rows.get(f"{figure}, converted")
        if other is None:
            continue
        pairs.append(
            {
                "figure": figure,
                "unit": row.get("unit") or "",
                "float": row.get("value"),
                "converted": other.get("value"),
                "source_float": row.get("source") or "",
                "source_converted": other.get("source") or "",
            }
        )
    return pairs


def qat_scheme(summary: dict) -> str | None:
    """The QAT scheme (the section's ``scheme`` field), e.g. ``"int8_weight_only"``; None without QAT
    (``"qat"`` for a QAT section that names none)."""
    entry = section_entry(summary, QAT)
    if entry is None:
        return None
    return entry.get("scheme") or "qat"


def power_limit(summary: dict) -> tuple[float, str] | None:
    """The power limit the search chose (watts, source), or None."""
    for row in section(summary, POWER_LIMIT):
        if row.get("chosen"):
            return row.get("limit_w"), row.get("source") or ""
    return None


def targets(summary: dict) -> list[dict]:
    """Energy-to-target rows: ``[{"metric", "reached", "step", "joules", "seconds", "source"}]``."""
    rows = summary.get("targets")
    if isinstance(rows, dict):
        # {"metric": {...}} as well as a list of rows
        rows = [dict(v, metric=k) for k, v in rows.items()]
    if not isinstance(rows, list):
        rows = section(summary, TARGETS)
    return [r for r in rows if "metric" in r]


def timeline(summary: dict) -> list[dict]:
    """The loops of the stage on the trace's time axis: ``[{"loop", "start_s", "end_s"}]`` (seconds
    since the sampler started, as the trace), from the summary's ``timeline``; ``[]`` without one."""
    rows = summary.get("timeline") or []
    return [r for r in rows if isinstance(r, dict) and {"loop", "start_s", "end_s"} <= r.keys()]


def trace(summary: dict) -> dict[str, list[tuple[float, float]]]:
    """The downsampled power trace per sensor: ``{sensor: [(seconds, watts)]}``, empty lists dropped."""
    out = {}
    for name, points in (summary.get("trace") or {}).items():
        pts = [(float(t), float(p)) for t, p in points if t is not None and p is not None]
        if pts:
            out[name] = pts
    return out
