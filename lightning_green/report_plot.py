"""The energy report picture of one stage, drawn from its summary dict (Trainer-free).

One figure, drawn once at the end of a stage:

* power over time per sensor, from the summary's downsampled trace, each sensor's source in the
  legend; the stage's loops (train, validation) shaded when the summary holds a ``timeline``;
* energy of this stage by sensor and, with ``phases=True``, by phase, as stacked bars ("no energy
  measured (no sensor)" where no sensor measured the stage);
* with QAT, float against converted (EPI, size, step time when present), relative to float with the
  absolute values written on the bars.

Anything from an ``estimate`` source is drawn dashed or hatched and labelled "estimate". matplotlib
is imported here, when a picture is asked for, through the ``[plots]`` extra; without it every
function returns None and :data:`PLOTS_HINT` says how to get the picture. Only the Agg canvas is
used (no pyplot, so no global state is touched).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from typing import Any

from lightning_green import run_summary as rs
from lightning_green.summary_table import NO_SENSOR

log = logging.getLogger("lightning_green")

PLOTS_HINT = 'lightning_green: pip install "lightning_green[plots]" to get the energy report picture (matplotlib)'
IMAGE_TAG = "energy/report"
SIZE_IN = (11.0, 6.2)
DPI = 90
PHASE_COLORS = {"data": "#8da0cb", "compute": "#fc8d62", "optimizer": "#66c2a5", "comm": "#e78ac3", "other": "#b3b3b3"}
LOOP_COLORS = {"validation": "#dfe8f5", "sanity": "#eeeeee", "test": "#f5e9df", "predict": "#e3f2df"}
ESTIMATE_HATCH = "///"
MARGINS = {"left": 0.085, "right": 0.985, "top": 0.91, "bottom": 0.085, "hspace": 0.42, "wspace": 0.2}


def report_path(directory: str, stage: str) -> str:
    """Where the picture of ``stage`` goes: ``<directory>/energy_report_<stage>.png``."""
    return os.path.join(directory, f"energy_report_{stage}.png")


def report_figure(summary: dict) -> Any:
    """The report of ``summary`` (any schema) as a ``matplotlib.figure.Figure`` on an Agg canvas, or
    None without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    summary = rs.upgrade(summary)
    # fixed margins: a layout engine would double the drawing time
    fig = Figure(figsize=SIZE_IN, dpi=DPI)
    FigureCanvasAgg(fig)
    pairs = rs.qat_pairs(summary)
    grid = fig.add_gridspec(2, 2 if pairs else 1, height_ratios=(3, 2), **MARGINS)
    _power_panel(fig.add_subplot(grid[0, :]), summary)
    _energy_panel(fig.add_subplot(grid[1, 0]), summary)
    if pairs:
        _qat_panel(fig.add_subplot(grid[1, 1]), pairs, rs.qat_scheme(summary))
    fig.suptitle(f"lightning_green energy report: {_headline(summary)}", fontsize=11)
    return fig


def report_image(summary: dict) -> Any:
    """The report as an ``H x W x 3`` uint8 array (for ``SummaryWriter.add_image(..., dataformats="HWC")``),
    or None without matplotlib."""
    fig = report_figure(summary)
    return None if fig is None else _rgb(fig)


def draw_report(summary: dict, path: str | os.PathLike) -> str | None:
    """Draw the report of ``summary`` into the PNG file ``path`` (folders created); the path, or None
    without matplotlib."""
    fig = report_figure(summary)
    if fig is None:
        return None
    return _save_png(_rgb(fig), os.fspath(path))


def write_report_picture(
    summary: dict,
    directory: str,
    stage: str,
    loggers: Iterable[Any] = (),
    step: int = 0,
    info: Callable[[str], None] = log.info,
) -> str | None:
    """End-of-stage glue: draw once, write ``energy_report_<stage>.png`` into ``directory`` and send the
    same image to every TensorBoard logger among ``loggers`` as ``energy/report`` at ``step``.

    Never raises: without matplotlib, ``info`` gets :data:`PLOTS_HINT` once and None is returned; a
    failure to draw or write is a warning and None.
    """
    try:
        fig = report_figure(summary)
        if fig is None:
            info(PLOTS_HINT)
            return None
        image = _rgb(fig)
        path = _save_png(image, report_path(directory, stage))
        for writer in _tensorboard_writers(loggers):
            writer.add_image(IMAGE_TAG, image, global_step=step, dataformats="HWC")
        return path
    # a picture must never stop training
    except Exception as err:  # noqa: BLE001
        log.warning("lightning_green: could not draw the energy report of %s: %r", stage, err)
        return None


# ------------------------------------------------------------------------------------- panels
def _power_panel(ax: Any, summary: dict) -> None:
    ax.set_title("power over time", loc="left", fontsize=10)
    ax.set_xlabel("seconds since the sampler started")
    ax.set_ylabel("W")
    sensors = {s["name"]: s for s in summary["sensors"]}
    traces = rs.trace(summary)
    loops = rs.timeline(summary)
    # training is the plain background; other loops are shaded
    for i, row in enumerate(loops):
        ax.axvline(row["start_s"], color="#9aa7b8", lw=0.6, zorder=1)
        if row["loop"] != "train":
            label = row["loop"] if row["loop"] not in {r["loop"] for r in loops[:i]} else None
            ax.axvspan(
                row["start_s"], row["end_s"], color=LOOP_COLORS.get(row["loop"], "#eeeeee"), lw=0, label=label, zorder=0
            )
    if not traces:
        ax.text(
            0.5, 0.5, "no power trace in this summary", transform=ax.transAxes, ha="center", va="center", color="gray"
        )
        ax.set_yticks([])
        return
    for name, points in traces.items():
        source = sensors.get(name, {}).get("source", "?")
        estimate = rs.is_estimate(source)
        label = f"{name} ({source}{', not a measurement' if estimate else ''})"
        t, p = zip(*points, strict=False)
        ax.plot(t, p, drawstyle="steps-post", lw=1.4, ls="--" if estimate else "-", label=label, zorder=3)
    top = max(p for points in traces.values() for _, p in points)
    ax.set_ylim(0, (top or 1.0) * 1.3)
    ax.margins(x=0.01)
    ax.legend(loc="upper left", ncol=4, fontsize=8, framealpha=0.9)


def _headline(summary: dict) -> str:
    """The stage, its status, and its own energy and time (or that nothing measured it)."""
    stage = f"{summary.get('stage', '?')} ({summary.get('status', '?')})"
    duration = f"{_num(summary.get('duration_s'))} s"
    if not rs.measured(summary):
        return f"{stage}, {duration}: {NO_SENSOR}"
    energy = f"{_num(summary.get('stage_energy_j'))} J this stage"
    return f"{stage}, {energy} in {duration}  [source: {rs.sources(summary)}]"


def _energy_panel(ax: Any, summary: dict) -> None:
    title = "energy of this stage by sensor" + (" and by phase" if rs.phases(summary) else "")
    ax.set_title(title, loc="left", fontsize=10)
    if not rs.measured(summary):
        ax.text(0.5, 0.5, NO_SENSOR, transform=ax.transAxes, ha="center", va="center", color="gray")
        ax.set_xticks([])
        ax.set_yticks([])
        return
    sensor_parts = [(s["name"], s.get("stage_energy_j") or 0.0, s.get("source", "")) for s in summary["sensors"]]
    bars = [("sensors", sensor_parts)]
    phase_rows = rs.phases(summary)
    if phase_rows:
        bars.append(("phases", [(r["phase"], float(r["energy_j"]), r.get("source", "")) for r in phase_rows]))
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]
    for y, (_, parts) in enumerate(bars):
        left = 0.0
        total = sum(j for _, j, _ in parts) or 1.0
        for k, (name, joules, source) in enumerate(parts):
            if joules <= 0:
                continue
            estimate = rs.is_estimate(source)
            color = PHASE_COLORS.get(name, palette[k % len(palette)]) if y else palette[k % len(palette)]
            ax.barh(
                y, joules, left=left, color=color, edgecolor="black", lw=0.5, hatch=ESTIMATE_HATCH if estimate else None
            )
            if joules / total > 0.12:
                note = ("\nestimate" if source == "estimate" else "\nincl. estimate") if estimate else ""
                ax.text(
                    left + joules / 2,
                    y,
                    f"{name}\n{_num(joules)} J{note}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    bbox={"facecolor": "white", "alpha": 0.8, "lw": 0, "pad": 1},
                )
            left += joules
    ax.set_yticks(
        range(len(bars)),
        [{"sensors": "by sensor", "phases": "by phase\n(train steps)"}[b[0]] for b in bars],
        fontsize=8,
    )
    ax.invert_yaxis()
    ax.set_xlabel("J (hatched: from an estimate)")


def _qat_panel(ax: Any, pairs: list[dict], scheme: str | None) -> None:
    ax.set_title(f"QAT {scheme or ''}: converted relative to float", loc="left", fontsize=10)
    names = []
    for i, pair in enumerate(pairs):
        f = pair["float"]
        c = pair["converted"]
        ratio = c / f if isinstance(f, (int, float)) and isinstance(c, (int, float)) and f else float("nan")
        for dx, model, value, rel, source in (
            (-0.2, "float", f, 1.0, pair["source_float"]),
            (0.2, "converted", c, ratio, pair["source_converted"]),
        ):
            estimate = rs.is_estimate(source)
            color = "#9ecae1" if model == "float" else "#31a354"
            ax.bar(
                i + dx,
                rel,
                width=0.38,
                color=color,
                edgecolor="black",
                lw=0.5,
                hatch=ESTIMATE_HATCH if estimate else None,
                label=model if i == 0 else None,
            )
            ax.text(
                i + dx,
                (rel if rel == rel else 0) + 0.02,
                _num(value) + ("\nestimate" if estimate else ""),
                ha="center",
                va="bottom",
                fontsize=7,
                rotation=0,
            )
        names.append(f"{pair['figure']}\n{pair['unit']}")
    ax.set_xticks(range(len(pairs)), names, fontsize=8)
    ax.axhline(1.0, color="gray", lw=0.6)
    ax.set_ylabel("converted / float")
    ax.set_ylim(0, max(1.6, ax.get_ylim()[1] * 1.3))
    ax.legend(loc="upper left", ncol=2, fontsize=8)


# ------------------------------------------------------------------------------------- helpers
def _num(value: Any) -> str:
    if not isinstance(value, (int, float)) or value != value:
        return "n/a"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _rgb(fig: Any) -> Any:
    import numpy as np

    fig.canvas.draw()
    return np.ascontiguousarray(np.asarray(fig.canvas.buffer_rgba())[..., :3])


def _save_png(image: Any, path: str) -> str:
    from matplotlib.image import imsave

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    imsave(path, image, format="png")
    return path


def _tensorboard_writers(loggers: Iterable[Any]) -> list[Any]:
    """The SummaryWriters of the TensorBoard loggers (Lightning is loaded whenever loggers are given)."""
    loggers = list(loggers)
    if not loggers:
        return []
    from lightning.pytorch.loggers import TensorBoardLogger

    return [lg.experiment for lg in loggers if isinstance(lg, TensorBoardLogger)]
