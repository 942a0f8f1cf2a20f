"""The command line: ``python -m lightning_green compare RUN [RUN ...]`` and
``python -m lightning_green show RUN``.

Reads written summaries only (:mod:`lightning_green.run_summary`, :mod:`lightning_green.compare`,
:mod:`lightning_green.summary_table`): no torch, no Lightning, no numpy. A RUN is a log folder
(``version_N`` or a parent holding one run) or an ``energy_summary_<stage>.json``. A bad RUN exits
with status 2 and one line naming it on stderr.

Example::

    python -m lightning_green compare runs/baseline runs/int8 --json
    python -m lightning_green show runs/int8/lightning_logs/version_0 --stage test
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from lightning_green import compare as cmp
from lightning_green import run_summary as rs
from lightning_green.summary_table import render

PROG = "python -m lightning_green"
EXIT_BAD_INPUT = 2


def parser() -> argparse.ArgumentParser:
    out = argparse.ArgumentParser(prog=PROG, description="Compare or show lightning_green energy summaries.")
    sub = out.add_subparsers(dest="command", required=True)
    compare = sub.add_parser("compare", help="one table, a column per run")
    compare.add_argument(
        "runs",
        nargs="+",
        metavar="RUN",
        help="a log folder (version_N or a parent of one run) or an energy_summary_*.json",
    )
    show = sub.add_parser("show", help="one run's summary again")
    show.add_argument("runs", nargs=1, metavar="RUN")
    for command in (compare, show):
        command.add_argument(
            "--stage", default=None, help="which stage's summary of a run folder (default: fit, else the first)"
        )
        command.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return out


def show(run: cmp.Run, as_json: bool = False) -> None:
    """Print one run's summary again, as at the end of the stage, or its JSON (in the current schema)."""
    if as_json:
        print(json.dumps(run.summary, indent=2))
        return
    render(run.summary)
    print(f"summary: {run.path}")


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (2 for a bad RUN, with one line on stderr)."""
    args = parser().parse_args(argv)
    try:
        runs = cmp.load_runs(args.runs, args.stage)
    except rs.SummaryError as err:
        print(f"lightning_green {args.command}: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.command == "show":
        show(runs[0], args.json)
        return 0
    rows = cmp.build_rows([r.summary for r in runs])
    if args.json:
        print(json.dumps(cmp.as_json(runs, rows), indent=2))
    else:
        cmp.render(runs, rows)
    return 0
