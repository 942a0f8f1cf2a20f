"""``python -m lightning_green compare RUN [RUN ...]`` and ``python -m lightning_green show RUN``.

Reads written summaries only (:mod:`lightning_green.run_summary`): no torch, no Lightning, so the
answer comes in well under a second after Python starts. A RUN is a log folder (``version_N`` or a
parent holding one run) or an ``energy_summary_<stage>.json``.

``compare`` prints one table, a column per run: duration, energy per sensor and in total with
sources, mean power, EER, tokens/J, EPI, carbon, energy-to-target, QAT float/converted and the power
limit. In each row with a better direction the best run is marked ``★`` and every run has its ratio
to the first. ``--json`` prints the same rows as JSON. A bad RUN exits with status 2 and one line
naming it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from lightning_green import run_summary as rs

BEST_MARK = "★"
GROUPS = ("run", "energy", "efficiency", "targets", "qat", "power limit", "notes")
EXIT_BAD_INPUT = 2


@dataclass
class Row:
    """One figure across runs: ``values[i]`` and ``sources[i]`` belong to run ``i`` (None: absent)."""

    figure: str
    unit: str
    better: str | None  # "lower", "higher", or None where neither is better (mean power, limits)
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
            "figure": self.figure, "unit": self.unit, "better": self.better, "values": self.values,
            "sources": self.sources, "best": self.best(), "ratio_to_first": self.ratios(),
        }  # fmt: skip


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
    arg: str  # the RUN as given
    path: str  # its summary file
    summary: dict


def load_runs(args: Sequence[str], stage: str | None = None) -> list[Run]:
    """Resolve and load every RUN. Raises :class:`~lightning_green.run_summary.SummaryError`."""
    runs = []
    for arg in args:
        path = rs.resolve_run(arg, stage)
        runs.append(Run(arg, path, rs.load_summary(path)))
    return runs


def figures(summary: dict) -> list[Figure]:
    """Every figure one summary holds, in table order within each group."""
    src = rs.sources(summary)
    energy_j = rs.stage_energy_j(summary)
    duration_s = summary.get("duration_s")
    out = [
        ("stage", "", None, "run", summary.get("stage"), ""),
        ("status", "", None, "run", summary.get("status"), ""),
        ("duration", "s", "lower", "run", duration_s, ""),
    ]
    for sensor in summary["sensors"]:
        out.append(
            (
                f"energy {sensor.get('name', '?')}",
                "J",
                "lower",
                "energy",
                rs.sensor_energy_j(summary, sensor),
                sensor.get("source", ""),
            )
        )
    out.append(("energy total", "J", "lower", "energy", energy_j, src))
    cluster = summary.get("cluster") or {}
    if summary.get("stage") == "fit" and (cluster.get("world_size") or 1) > 1:
        out.append(("energy all processes", "J", "lower", "energy", cluster.get("total_j"), src))
    eff = rs.efficiency(summary)
    if "train_energy_j" in eff:
        out.append(("training energy (validation excluded)", "J", "lower", "energy", *eff["train_energy_j"]))
    own_j = summary.get(
        "energy_this_run_j", energy_j
    )  # this stage's own: a resumed fit's restored joules took no time of it
    mean_w = own_j / duration_s if _is_number(own_j) and _is_number(duration_s) and duration_s > 0 else None
    out.append(("mean power", "W", None, "energy", mean_w, src))
    for key, figure, unit, better in (
        ("eer_j_per_param", "EER", "J/param", "lower"),
        ("tokens_per_j", "tokens per joule", "tokens/J", "higher"),
        ("samples_per_j", "samples per joule", "samples/J", "higher"),
        *((f"{s}_epi_j", f"EPI {s}", "J/sample", "lower") for s in ("validate", "test", "predict")),
        *((f"{s}_epi_j_per_token", f"EPI {s}", "J/token", "lower") for s in ("validate", "test", "predict")),
        ("predict_j_per_generated_token", "energy per generated token", "J/token", "lower"),
        ("predict_s_per_generated_token", "time per generated token", "s/token", "lower"),
        ("predict_generated_tokens_per_j", "generated tokens per joule", "tokens/J", "higher"),
        ("carbon_gco2e", "carbon", "gCO2e", "lower"),
    ):
        if key in eff:
            out.append((figure, unit, better, "efficiency", *eff[key]))
    for t in rs.targets(summary):
        name, reached, source = t["metric"], t.get("reached", True), t.get("source") or ""
        out.append(
            (f"to {name}: energy", "J", "lower", "targets", t.get("joules") if reached else "not reached", source)
        )
        out.append((f"to {name}: time", "s", "lower", "targets", t.get("seconds") if reached else "not reached", ""))
        out.append((f"to {name}: step", "step", "lower", "targets", t.get("step") if reached else "not reached", ""))
    scheme = rs.qat_scheme(summary)
    if scheme:
        out.append(("QAT scheme", "", None, "qat", scheme, ""))
    for pair in rs.qat_pairs(summary):
        for model in ("float", "converted"):
            out.append(
                (f"QAT {pair['figure']}, {model}", pair["unit"], "lower", "qat", pair[model], pair[f"source_{model}"])
            )
    limit = rs.power_limit(summary)
    if limit is not None:
        out.append(("power limit", "W", None, "power limit", *limit))
    if summary.get("partial"):
        out.append(("partial figures", "", None, "notes", "; ".join(summary["partial"]), ""))
    return [Figure(*f) for f in out]


def build_rows(summaries: Sequence[dict]) -> list[Row]:
    """One :class:`Row` per figure that any run holds, grouped and in first-seen order."""
    rows: dict[tuple[str, str], Row] = {}
    n = len(summaries)
    for i, summary in enumerate(summaries):
        for f in figures(summary):
            row = rows.setdefault((f.figure, f.unit), Row(f.figure, f.unit, f.better, f.group, [None] * n, [""] * n))
            row.values[i], row.sources[i] = _clean(f.value), f.source
    return sorted(rows.values(), key=lambda r: GROUPS.index(r.group))  # stable: first-seen within a group


def as_json(runs: Sequence[Run], rows: Sequence[Row]) -> dict:
    return {
        "runs": [{"run": r.arg, "summary": r.path, "stage": r.summary.get("stage")} for r in runs],
        "rows": [row.as_dict() for row in rows],
    }


def render(runs: Sequence[Run], rows: Sequence[Row], console: Any = None) -> None:
    """Print the comparison as one rich table and a few notes."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

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
        present = sorted({src for src, v in zip(row.sources, row.values, strict=False) if v is not None})
        shared, best = len(present) <= 1, row.best()
        cells = []
        for i, (value, ratio) in enumerate(zip(row.values, row.ratios(), strict=False)):
            text = escape(_fmt(value))
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
    notes = [f"#{i + 1}: {run.path}" for i, run in enumerate(runs)]
    notes.append(f"{BEST_MARK} best in the row (lower is better, higher for tokens/samples per joule; no mark where"
                 " neither is better or all are equal); ×: ratio to run #1")  # fmt: skip
    total = next((r for r in rows if r.figure == "energy total"), None)
    if total is not None and len(set(total.sources)) > 1:
        notes.append(
            f"note: the runs' energy comes from different sources ({', '.join(total.sources)}): not measured alike"
        )
    if total is not None and any(rs.is_estimate(s) for s in total.sources):
        notes.append("note: 'estimate' figures come from a CPU utilisation model, not a measurement")
    for line in notes:
        console.print(line, markup=False, highlight=False)


def show(run: Run, as_json_out: bool = False) -> None:
    """Print one run's summary again, as at the end of the stage (or its JSON)."""
    if as_json_out:
        print(json.dumps(run.summary, indent=2))
        return
    from lightning_green.summary import render as render_summary

    render_summary(run.summary)
    print(f"summary: {run.path}")


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (2 for a bad RUN, with one line on stderr)."""
    parser = argparse.ArgumentParser(
        prog="python -m lightning_green", description="Compare or show lightning_green energy summaries."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_cmp = sub.add_parser("compare", help="one table, a column per run")
    p_cmp.add_argument(
        "runs",
        nargs="+",
        metavar="RUN",
        help="a log folder (version_N or a parent of one run) or an energy_summary_*.json",
    )
    p_show = sub.add_parser("show", help="one run's summary again")
    p_show.add_argument("runs", nargs=1, metavar="RUN")
    for p in (p_cmp, p_show):
        p.add_argument(
            "--stage", default=None, help="which stage's summary of a run folder (default: fit, else the first)"
        )
        p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    try:
        runs = load_runs(args.runs, args.stage)
    except rs.SummaryError as err:
        print(f"lightning_green {args.command}: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.command == "show":
        show(runs[0], args.json)
        return 0
    rows = build_rows([r.summary for r in runs])
    if args.json:
        print(json.dumps(as_json(runs, rows), indent=2))
    else:
        render(runs, rows)
    return 0


# ------------------------------------------------------------------------------------- helpers
def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _clean(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _style_source(source: str) -> str:
    from rich.markup import escape

    return f"[yellow]{escape(source)}[/yellow]" if rs.is_estimate(source) else escape(source)


def _short(arg: str, width: int = 32) -> str:
    return arg if len(arg) <= width else "…" + arg[-(width - 1) :]
