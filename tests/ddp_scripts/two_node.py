"""A two-node run on one machine: two processes, one per "node" (``num_nodes=2, devices=1``), wired by
the environment Lightning's cluster environment reads (``NODE_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``,
``WORLD_SIZE``, ``LOCAL_RANK``).

``python two_node.py OUT_DIR`` launches both workers (``python two_node.py OUT_DIR --worker``), waits,
and exits non-zero if either failed. Each worker trains with ``strategy="ddp_green"`` and a
PowerSampler holding a host-level and a per-device simulated sensor, then writes ``node<n>.json``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import torch
from _common import TwoLayer, write_json
from lightning.pytorch import Trainer, seed_everything

HOST_W, DEVICE_W = 50.0, 100.0
STEPS = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out_dir: str, timeout_s: float = 120.0) -> int:
    port = free_port()
    procs = []
    for node_rank in (0, 1):
        env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "RANK")}
        env.update(
            NODE_RANK=str(node_rank), LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2"
        )
        procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), out_dir, "--worker"], env=env))
    deadline = time.monotonic() + timeout_s
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            p.kill()
            codes.append(p.wait())
    for p in procs:  # one failed: do not leave the other waiting on the rendezvous
        if p.poll() is None:
            p.kill()
    print(f"two_node: exit codes {codes}")
    return 0 if all(c == 0 for c in codes) else 1


def worker(out_dir: str) -> None:
    from lightning_green import PowerSampler
    from lightning_green.sensors import SimulatedSensor

    seed_everything(0)
    sampler = PowerSampler(
        sensors=[
            SimulatedSensor(HOST_W, name="host", host_level=True, domain="cpu"),
            SimulatedSensor(DEVICE_W, name="dev"),
        ],
        interval_s=0.02,
        print_summary=False,
        summary_dir=out_dir,
    )
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        num_nodes=2,
        strategy="ddp_green",
        max_steps=STEPS,
        logger=False,
        callbacks=[sampler],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = TwoLayer()
    trainer.fit(model)
    strategy = trainer.strategy
    write_json(
        os.path.join(out_dir, f"node{trainer.node_rank}.json"),
        {
            "global_rank": trainer.global_rank,
            "node_rank": trainer.node_rank,
            "local_rank": trainer.local_rank,
            "world_size": trainer.world_size,
            "num_nodes": trainer.num_nodes,
            "strategy": type(strategy).__name__,
            "comm": strategy.comm_stats.as_dict(),
            "final_weight_sum": float(sum(p.detach().sum() for p in model.parameters())),
            "pg_initialized_after_fit": torch.distributed.is_initialized(),
            "sensors": [s["name"] for s in sampler.summary["sensors"]],
            "skipped": sampler.summary["skipped"],
            "cluster": sampler.summary["cluster"],
        },
    )


if __name__ == "__main__":
    if "--worker" in sys.argv:
        worker(sys.argv[1])
    else:
        sys.exit(launch(sys.argv[1]))
