"""Run every benchmark, one after another, each in its own process; print where the JSON went.

    python benchmarks/run_all.py [--quick]

Each script prints its table and writes benchmarks/results/<name>.json. gpu_check exits at once
where there is no NVIDIA GPU. About 12 minutes on a 2-core CPU (--quick: about 4).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BENCHMARKS = [
    ("integration", [], ["--seconds", "2"]),
    ("overhead", [], ["--rounds", "4", "--steps", "100"]),
    ("phases", [], ["--steps", "12", "--rounds", "3"]),
    ("power_limit", [], []),
    ("ddp_comm", [], []),
    ("qat", [], ["--quick"]),
    ("gpu_check", [], []),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and steps")
    parser.add_argument("--only", nargs="*", help="names to run")
    args = parser.parse_args()
    failed = []
    for name, full, quick in BENCHMARKS:
        if args.only and name not in args.only:
            continue
        t = time.monotonic()
        print(f"\n######## {name} ########", flush=True)
        code = subprocess.call([sys.executable, os.path.join(HERE, f"{name}.py"), *(quick if args.quick else full)], cwd=HERE)
        print(f"######## {name}: exit {code}, {time.monotonic() - t:.0f} s", flush=True)
        if code:
            failed.append(name)
    print("\nresults in", os.path.join(HERE, "results"))
    if failed:
        print("failed:", ", ".join(failed))
        sys.exit(1)


if __name__ == "__main__":
    main()
