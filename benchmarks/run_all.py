"""Run every benchmark, one after another, each in its own process; print where the JSON went.

    python benchmarks/run_all.py [--quick]

Each script prints its table and writes benchmarks/results/<name>.json, every figure measured at
least 5 times (--quick: fewer, and the JSON says "quick": true, which `report.py --check` refuses).
gpu_check exits at once where there is no NVIDIA GPU. Then `python benchmarks/report.py --write`
puts the figures into the README. Each JSON records its script's "seconds".
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BENCHMARKS = [  # name, arguments of a full run, arguments of a --quick run
    ("integration", [], ["--seconds", "1.5", "--repeats", "2", "--quick"]),
    ("overhead", [], ["--rounds", "2", "--steps", "60", "--quick"]),
    ("startup", [], ["--quick"]),
    ("fabric_overhead", [], ["--quick"]),
    ("energy_budget", [], ["--quick"]),
    ("phases", [], ["--steps", "8", "--repeats", "1", "--rounds", "1", "--quick"]),
    ("power_limit", [], ["--repeats", "2", "--quick"]),
    ("ddp_comm", [], ["--steps", "30", "--repeats", "1", "--quick"]),
    ("qat", [], ["--quick"]),
    ("pruning", [], ["--quick"]),
    ("generation", [], ["--quick"]),
    ("gpu_check", [], ["--repeats", "2"]),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="fewer repeats and steps, for development; not for the README"
    )
    parser.add_argument("--only", nargs="*", help="names to run")
    args = parser.parse_args()
    failed, start = [], time.monotonic()
    for name, full, quick in BENCHMARKS:
        if args.only and name not in args.only:
            continue
        t = time.monotonic()
        print(f"\n######## {name} ########", flush=True)
        code = subprocess.call(
            [sys.executable, os.path.join(HERE, f"{name}.py"), *(quick if args.quick else full)], cwd=HERE
        )
        print(f"######## {name}: exit {code}, {time.monotonic() - t:.0f} s", flush=True)
        if code:
            failed.append(name)
    print(f"\nresults in {os.path.join(HERE, 'results')}; {time.monotonic() - start:.0f} s in all")
    if failed:
        print("failed:", ", ".join(failed))
        sys.exit(1)


if __name__ == "__main__":
    main()
