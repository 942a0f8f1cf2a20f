"""``python -m lightning_green compare RUN [RUN ...]``: the figures of several runs, lined up.

Reads written summaries only (:mod:`lightning_green.run_summary`): no torch, no Lightning, so the
answer comes in well under a second after Python starts. A RUN is a log folder (``version_N`` or a
parent holding one run) or an ``energy_summary_<stage>.json``; the command line is in
:mod:`lightning_green.cli`.

One table, a column per run: time, energy and power, each row labelled with its scope (this stage;
carried from earlier stages; restored from a checkpoint; cumulative; all processes at loop end, with
a footnote saying why that differs from this process's), energy per sensor with sources, EER,
tokens/J, EPI, carbon, energy-to-target, QAT float/converted and the power limit. A run with no
sensor reads "no energy measured (no sensor)", never 0 J. In each row with a better direction the
best run is marked ``★`` and every run has its ratio to the first. :func:`as_json` gives the same
rows as JSON.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lightning_green import run_summary as rs
from lightning_green import summary_table as st

BEST_MARK = "★"
GROUPS = ("run", "energy", "efficiency", "targets", "qat", "power limit", "notes")


@dataclass
class Row:
    """One figure across runs: ``values[i]`` and ``sources[i]`` belong to run ``i`` (None: absent)."""

    figure: str
    unit: str
    # "lower", "higher", or None where neither is better (mean power, limits)
    better: str | None
    group: str
    values: list[Any] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)

    def numbers(self) -> list[float | None]:
        return [v if _is_number(v) else None for v in self.values]

    def best(self) -> list[int]:
        """Indices of the best runs; ``[]`` with no direction, fewer than two figures, or all equal."""
        nums = [(i, v) for i, v in enumerate(self.numbers()) if v is not None]
        if self.better is None or len(nums) < 2 or len({v for _, v in nums}) == 1:
            return []
        target = (min if self.better == "lower" else max)(v for _, v in nums)
        return [i for i, v in nums if v == target]

    def ratios(self) -> list[float | None]:
        """Each run's figure over the first run's (None where either is missing or the first is 0)."""
        nums = self.numbers()
        first = nums[0] if nums else None
        return [v / first if v is not None and first else None for v in nums]

    def as_dict(self) -> dict:
        return {
            "figure": self.figure,
            "unit": self.unit,
            "better": self.better,
            "values": self.values,
            "sources": self.sources,
            "best": self.best(),
            "ratio_to_first": self.ratios(),
        }


class Figure(NamedTuple):
    """One figure of one summary, before the runs are lined up into rows."""

    figure: str
    unit: str
    better: str | None
    group: str
    value: Any
    source: str


@dataclass
class Run:
    # the RUN as given
    arg: str
    # its summary file
    path: str
    summary: dict


def load_runs(args: Sequence[str], stage: str | None = None) -> list[Run]:
    """Resolve and load every RUN. Raises :class:`~lightning_green.run_summary.SummaryError`."""
    runs = []
    for arg in args:
        path = rs.resolve_run(arg, stage)
        runs.append(Run(arg, path, rs.load_summary(path)))
    return runs


def figures(summary: dict) -> list[Figure]:
    """Every figure one summary (current schema) holds, in table order within each group."""
    src = rs.sources(summary)
    out = [
        Figure("stage", "", None, "run", summary.get("stage"), ""),
        Figure("status", "", None, "run", summary.get("status"), ""),
    ]
    for f in st.energy_figures(summary):
        group = "run" if f.figure == st.DURATION else "energy"
        measured = f.unit != "s" and f.value != st.NO_SENSOR
        out.append(Figure(f.figure, f.unit, f.better, group, f.value, src if measured else ""))
    for sensor in summary["sensors"]:
        f = st.sensor_figure(sensor)
        out.append(Figure(f.figure, f.unit, f.better, "energy", f.value, sensor.get("source", "")))
    out += efficiency_figures(summary)
    out += target_figures(summary)
    out += qat_figures(summary)
    limit = rs.power_limit(summary)
    if limit is not None:
        out.append(Figure("power limit", "W", None, "power limit", *limit))
    if summary.get("partial"):
        out.append(Figure("partial figures", "", None, "notes", "; ".join(summary["partial"]), ""))
    return out


#: EfficiencyLogger's figures shown by compare: (key, row label, unit, better direction).
EFFICIENCY_FIGURES = (
    ("train_energy_j", "training energy, incl. restored (validation excluded)", "J", "lower"),
    ("eer_j_per_param", "EER", "J/param", "lower"),
    ("tokens_per_j", "tokens per joule", "tokens/J", "higher"),
    ("samples_per_j", "samples per joule", "samples/J", "higher"),
    *((f"{s}_epi_j", f"EPI {s}", "J/sample", "lower") for s in ("validate", "test", "predict")),
    *((f"{s}_epi_j_per_token", f"EPI {s}", "J/token", "lower") for s in ("validate", "test", "predict")),
    ("predict_j_per_generated_token", "energy per generated token", "J/token", "lower"),
    ("predict_s_per_generated_token", "time per generated token", "s/token", "lower"),
    ("predict_generated_tokens_per_j", "generated tokens per joule", "tokens/J", "higher"),
    ("carbon_gco2e", "carbon", "gCO2e", "lower"),
)


def efficiency_figures(summary: dict) -> list[Figure]:
    eff = rs.efficiency(summary)
    out = []
    for key, figure, unit, better in EFFICIENCY_FIGURES:
        if key in eff:
            group = "energy" if unit == "J" else "efficiency"
            out.append(Figure(figure, unit, better, group, *eff[key]))
    return out


def target_figures(summary: dict) -> list[Figure]:
    out = []
    for t in rs.targets(summary):
        name = t["metric"]
        reached = t.get("reached", True)
        source = t.get("source") or ""
        for what, key, unit, src in (
            ("energy", "joules", "J", source),
            ("time", "seconds", "s", ""),
            ("step", "step", "step", ""),
        ):
            value = t.get(key) if reached else "not reached"
            out.append(Figure(f"to {name}: {what}", unit, "lower", "targets", value, src))
    return out


def qat_figures(summary: dict) -> list[Figure]:
    out = []
    scheme = rs.qat_scheme(summary)
    if scheme:
        out.append(Figure("QAT scheme", "", None, "qat", scheme, ""))
    for pair in rs.qat_pairs(summary):
        for model in ("float", "converted"):
            figure = f"QAT {pair['figure']}, {model}"
            out.append(Figure(figure, pair["unit"], "lower", "qat", pair[model], pair[f"source_{model}"]))
    return out


def build_rows(summaries: Sequence[dict]) -> list[Row]:
    """One :class:`Row` per figure that any run holds, grouped and in first-seen order."""
    rows: dict[tuple[str, str], Row] = {}
    n = len(summaries)
    for i, summary in enumerate(summaries):
        for f in figures(summary):
            row = rows.setdefault((f.figure, f.unit), Row(f.figure, f.unit, f.better, f.group, [None] * n, [""] * n))
            row.values[i] = _clean(f.value)
            row.sources[i] = f.source
    # sorted is stable: first-seen order within a group
    return sorted(rows.values(), key=lambda r: GROUPS.index(r.group))


def as_json(runs: Sequence[Run], rows: Sequence[Row]) -> dict:
    return {
        "runs": [{"run": r.arg, "summary": r.path, "stage": r.summary.get("stage")} for r in runs],
        "rows": [row.as_dict() for row in rows],
    }


def render(runs: Sequence[Run], rows: Sequence[Row], console: Any = None) -> None:
    """Print the comparison as one rich table and a few notes."""
    if console is None:
        console = Console()
        if not console.is_terminal:
            console = Console(width=max(120, 40 + 28 * len(runs)))
    table = Table(title="lightning_green: energy of runs compared", title_justify="left")
    table.add_column("figure")
    table.add_column("unit")
    table.add_column("source")
    for i, run in enumerate(runs):
        table.add_column(escape(f"#{i + 1} {_short(run.arg)}"), justify="right")
    for row in rows:
        present = sorted({src for src, v in zip(row.sources, row.values, strict=True) if v is not None and src})
        shared = len(present) <= 1
        best = row.best()
        cells = []
        for i, (value, ratio) in enumerate(zip(row.values, row.ratios(), strict=False)):
            text = escape(st.fmt(value))
            if i and ratio is not None:
                text += f" [dim]×{ratio:.2f}[/dim]"
            if not shared and row.sources[i]:
                text += f" [dim]({_style_source(row.sources[i])})[/dim]"
            if i in best:
                text = f"[bold green]{text} {BEST_MARK}[/bold green]"
            cells.append(text)
        table.add_row(
            escape(row.figure), row.unit, _style_source(present[0] if present else "") if shared else "per run", *cells
        )
    console.print(table)
    for line in notes(runs, rows):
        console.print(line, markup=False, highlight=False)


def notes(runs: Sequence[Run], rows: Sequence[Row]) -> list[str]:
    """The lines under the table: which file each run is, the marks, and the footnotes of the figures."""
    out = [f"#{i + 1}: {run.path}" for i, run in enumerate(runs)]
    out.append(
        f"{BEST_MARK} best in the row (lower is better, higher for tokens/samples per joule; no mark where"
        " neither is better or all are equal); ×: ratio to run #1"
    )
    for note in dict.fromkeys(n for run in runs for n in st.footnotes(run.summary)):
        which = [f"#{i + 1}" for i, run in enumerate(runs) if note in st.footnotes(run.summary)]
        out.append(f"note ({', '.join(which)}): {note}")
    stage = next((r for r in rows if r.figure == st.STAGE_ENERGY), None)
    measured = [src for src, v in zip(stage.sources, stage.values, strict=True) if v != st.NO_SENSOR] if stage else []
    if len(set(measured)) > 1:
        out.append(f"note: the runs' energy comes from different sources ({', '.join(measured)}): not measured alike")
    if any(rs.is_estimate(s) for s in measured):
        out.append("note: 'estimate' figures come from a CPU utilisation model, not a measurement")
    return out


# ------------------------------------------------------------------------------------- helpers
def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _clean(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _style_source(source: str) -> str:
    return f"[yellow]{escape(source)}[/yellow]" if rs.is_estimate(source) else escape(source)


def _short(arg: str, width: int = 32) -> str:
    return arg if len(arg) <= width else "…" + arg[-(width - 1) :]
