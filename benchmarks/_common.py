"""Shared by the benchmarks: machine facts, repeats and their summaries, a table printer, the JSON writer.

Every figure a benchmark writes is measured ``repeats`` times (>= 5 in a full run) and stored as
``summarize(values)``: ``{"min", "median", "max", "values"}``; a status (met / missed) is decided on
the median (:func:`met`). A/B figures run interleaved (:func:`interleaved`). ``write`` puts
``"repeats"``, ``"quick"`` and the script's ``"seconds"`` at the top level of the JSON next to
``"machine"``; ``benchmarks/report.py`` renders ``median (min–max)`` from it.
"""

from __future__ import annotations

import json
import math
import operator
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterable, Sequence

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
START_S = time.monotonic()
MIN_REPEATS = 5  # a full run repeats every measurement at least this often
OPS = {"<=": operator.le, ">=": operator.ge}


def summarize(values: Iterable[float]) -> dict:
    """``{"min", "median", "max", "values"}`` of repeated measurements of one figure."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("summarize() needs at least one value")
    return {"min": min(vals), "median": statistics.median(vals), "max": max(vals), "values": vals}


def met(summary: dict, op: str, goal: float) -> bool:
    """Whether the median of ``summary`` meets ``op goal`` (``op`` is ``"<="`` or ``">="``)."""
    return bool(OPS[op](summary["median"], goal))


def interleaved(configs: Sequence, repeats: int) -> list[tuple[int, object]]:
    """``(round, config)`` pairs, the order reversed every other round (A B, B A, ...) so that drift on
    a shared machine falls on every configuration alike."""
    return [(r, c) for r in range(repeats) for c in (configs if r % 2 == 0 else configs[::-1])]


def machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "device": device,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def table(rows: list[dict], columns: list[str] | None = None) -> str:
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))

    def fmt(v):
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.4g}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=False)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=False)) for row in cells]
    return "\n".join(lines)


def write(name: str, payload: dict, repeats: int | None = None, quick: bool = False) -> str:
    """Write ``results/<name>.json``: ``benchmark``, ``machine``, ``repeats``, ``quick``, ``seconds``
    (this script's wall time so far), then ``payload`` (whose keys win)."""
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{name}.json")
    head = {"benchmark": name, "machine": machine(), "quick": quick, "seconds": time.monotonic() - START_S}
    if repeats is not None:
        head["repeats"] = repeats
    payload = {**head, **payload}
    with open(path, "w") as f:
        json.dump(
            payload, f, indent=2, default=lambda o: None if isinstance(o, float) and not math.isfinite(o) else str(o)
        )
    print(f"wrote {path}")
    return path
