"""Read a written energy summary (``energy_summary_<stage>.json``): find it, check it, pick figures.

Plain Python on the JSON that :class:`~lightning_green.PowerSampler` writes; no torch or Lightning
import, so ``python -m lightning_green compare`` starts fast. The report picture
(:mod:`lightning_green.report_plot`) and the ``compare`` command read summaries through here only.
Every reader tolerates a missing section: a summary without phases, QAT or targets gives ``[]`` or
``None`` for it.
"""

from __future__ import annotations

import json
import os
from typing import Any

SUMMARY_PREFIX = "energy_summary_"
MAX_DEPTH = 4  # RUN/ -> lightning_logs/ -> version_N/ -> energy_summary_fit.json, and one more
REQUIRED_KEYS = ("stage", "sensors", "energy_j")
QAT_TITLE = "Quantization-aware training"
PHASE_TITLE = "energy by phase"
EFFICIENCY_TITLE = "efficiency"
POWER_LIMIT_TITLE = "Power limit search"
TARGETS_TITLE = "targets"


class SummaryError(ValueError):
    """A path that is not a readable energy summary, or a folder without exactly one run."""


def is_estimate(source: str | None) -> bool:
    """True when a figure's source (``"estimate"``, ``"estimate+simulated"`` …) involves an estimate."""
    return "estimate" in (source or "").split("+")


def load_summary(path: str | os.PathLike) -> dict:
    """The summary in the JSON file ``path``.

    Raises:
        SummaryError: the file cannot be read, is not JSON, or lacks ``stage``, ``sensors`` and
            ``energy_j``.
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as err:
        raise SummaryError(f"{path}: cannot read it ({err.strerror or err})") from None
    except ValueError as err:
        raise SummaryError(f"{path}: not an energy summary (not valid JSON: {err})") from None
    missing = [k for k in REQUIRED_KEYS if not isinstance(data, dict) or k not in data]
    if missing or not isinstance(data["sensors"], list):
        raise SummaryError(
            f"{path}: not an energy summary (a JSON without {', '.join(repr(k) for k in missing or ['sensors'])})"
        )
    return data


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
        shown = ", ".join(os.path.relpath(r, path) for r in runs[:4]) + (" …" if len(runs) > 4 else "")
        raise SummaryError(f"{path}: holds {len(runs)} runs ({shown}); pass one of them")
    by_stage = {os.path.basename(f)[len(SUMMARY_PREFIX) : -len(".json")]: f for f in files}
    if stage is None:
        stage = "fit" if "fit" in by_stage else sorted(by_stage)[0]
    if stage not in by_stage:
        raise SummaryError(f"{path}: no {stage!r} summary (it has: {', '.join(sorted(by_stage))})")
    return by_stage[stage]


# ---------------------------------------------------------------------------------------- figures
def section(summary: dict, title: str) -> list[dict]:
    """The rows of the section ``title``, or of the first whose title starts with it; ``[]`` if none."""
    sections = summary.get("sections") or {}
    if title in sections:
        return list(sections[title] or [])
    for name, rows in sections.items():
        if name.startswith(title):
            return list(rows or [])
    return []


def stage_energy_key(summary: dict) -> str:
    """``energy_j`` for ``fit`` (a resumed fit counts its restored energy), ``energy_this_run_j`` for
    the other stages (their ``energy_j`` carries the energy of the stages before them). A fit's
    ``energy_j`` less its ``carried_j`` (what earlier stages of the process carried in) is what
    :func:`stage_energy_j` gives."""
    return "energy_j" if summary.get("stage") == "fit" or "energy_this_run_j" not in summary else "energy_this_run_j"


def _less_carried(figures: dict, key: str, value: Any) -> Any:
    """``value`` less ``figures["carried_j"]`` when ``key`` is the cumulative ``energy_j`` (a summary
    older than ``carried_j`` lacks it: the value as it is)."""
    carried_j = figures.get("carried_j")
    ok = key == "energy_j" and isinstance(value, (int, float)) and isinstance(carried_j, (int, float))
    return value - carried_j if ok else value


def stage_energy_j(summary: dict) -> float | None:
    """This stage's energy of this process's sensors, in joules (a fit's with the energy it restored
    from a checkpoint, never that of the stages before it in the process)."""
    key = stage_energy_key(summary)
    return _less_carried(summary, key, summary.get(key))


def sensor_energy_j(summary: dict, sensor: dict) -> float | None:
    """This stage's energy of one sensor (same rule as :func:`stage_energy_j`)."""
    key = stage_energy_key(summary)
    return _less_carried(sensor, key if key in sensor else "energy_j", sensor.get(key, sensor.get("energy_j")))


def sources(summary: dict) -> str:
    """The summary's sources joined with ``+`` (``"none"`` when it has none)."""
    return "+".join(summary.get("sources") or sorted({s.get("source", "?") for s in summary["sensors"]})) or "none"


def efficiency(summary: dict) -> dict[str, tuple[Any, str]]:
    """EfficiencyLogger's figures: ``{figure: (value, source)}`` (``train_energy_j``, ``tokens_per_j``, …)."""
    return {
        r["figure"]: (r.get("value"), r.get("source") or "")
        for r in section(summary, EFFICIENCY_TITLE)
        if "figure" in r
    }


def phases(summary: dict) -> list[dict]:
    """Phase rows with an energy figure: ``[{"phase", "energy_j", "seconds", "source"}]``."""
    return [r for r in section(summary, PHASE_TITLE) if isinstance(r.get("energy_j"), (int, float)) and "phase" in r]


def qat_pairs(summary: dict) -> list[dict]:
    """QAT figures measured on both models: ``[{"figure", "unit", "float", "converted", "source_float",
    "source_converted"}]``, from the rows named ``"<figure>, float"`` and ``"<figure>, converted"``."""
    rows = {r["figure"]: r for r in section(summary, QAT_TITLE) if "figure" in r}
    pairs = []
    for name, row in rows.items():
        if not name.endswith(", float"):
            continue
        figure = name[: -len(", float")]
        other = rows.get(f"{figure}, converted")
        if other is None:
            continue
        pairs.append({
            "figure": figure, "unit": row.get("unit") or "", "float": row.get("value"), "converted": other.get("value"),
            "source_float": row.get("source") or "", "source_converted": other.get("source") or "",
        })  # fmt: skip
    return pairs


def qat_scheme(summary: dict) -> str | None:
    """The QAT scheme named in the section title, e.g. ``"int8_weight_only"``, or None without QAT."""
    for name in summary.get("sections") or {}:
        if name.startswith(QAT_TITLE):
            return name[len(QAT_TITLE) :].strip(" ()") or "qat"
    return None


def power_limit(summary: dict) -> tuple[float, str] | None:
    """The power limit the search chose (watts, source), or None."""
    for row in section(summary, POWER_LIMIT_TITLE):
        if row.get("chosen"):
            return row.get("limit_w"), row.get("source") or ""
    return None


def targets(summary: dict) -> list[dict]:
    """Energy-to-target rows: ``[{"metric", "reached", "step", "joules", "seconds", "source"}]``."""
    rows = summary.get("targets")
    if isinstance(rows, dict):  # {"metric": {...}} as well as a list of rows
        rows = [dict(v, metric=k) for k, v in rows.items()]
    return [r for r in (rows if isinstance(rows, list) else section(summary, TARGETS_TITLE)) if "metric" in r]


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
