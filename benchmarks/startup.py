"""Start-up cost: ``import lightning_green`` and constructing PowerSampler and EfficiencyLogger, after
Lightning is imported (what a user's script pays on top of ``import lightning``).

    python benchmarks/startup.py           # 9 fresh interpreters
    python benchmarks/startup.py --quick   # 2

Each repeat is a fresh interpreter: it imports ``lightning.pytorch`` (not timed), then times the import
and the two constructions, and lists which heavy modules that loaded (torchao, our quantization
package, torch_pruning, matplotlib.pyplot, pynvml). Goal (issue 20): <= 40 ms, with torchao and
``lightning_green.quantization`` not loaded and ``ddp_green`` still registered.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from _common import MIN_REPEATS, met, summarize, write

PROBE = """
import json, sys, time
import lightning.pytorch
before = set(sys.modules)
t0 = time.perf_counter()
import lightning_green
from lightning_green import EfficiencyLogger, PowerSampler
PowerSampler()
EfficiencyLogger()
ms = (time.perf_counter() - t0) * 1000.0
from lightning.pytorch.strategies import StrategyRegistry
heavy = ("torchao", "lightning_green.quantization", "torch_pruning", "matplotlib.pyplot", "pynvml")
loaded = sorted(m for m in heavy if m in set(sys.modules) - before)
print(json.dumps({"ms": ms, "loaded": loaded, "registered": "ddp_green" in StrategyRegistry}))
"""

GOAL_MS = 40.0


def probe() -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    repeats = 2 if args.quick else max(MIN_REPEATS, 9)
    probe()  # warm the file cache: the first interpreter after an install reads every file from disk
    runs = [probe() for _ in range(repeats)]
    ms = summarize(r["ms"] for r in runs)
    loaded = sorted({m for r in runs for m in r["loaded"]})
    registered = all(r["registered"] for r in runs)
    ok = met(ms, "<=", GOAL_MS) and not loaded and registered
    print(f"import + construct after lightning: {ms['median']:.1f} ms ({ms['min']:.1f}-{ms['max']:.1f})")
    print(f"heavy modules loaded: {loaded or 'none'}; ddp_green registered: {registered}")
    write(
        "startup",
        {
            "figures": {"import_and_construct_ms": ms, "heavy_loaded": loaded, "ddp_green_registered": registered},
            "goals": {"import_and_construct_ms": {"goal": GOAL_MS, "met": ok}},
        },
        repeats=repeats,
        quick=args.quick,
    )


if __name__ == "__main__":
    main()
