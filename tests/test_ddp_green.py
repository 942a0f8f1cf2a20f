"""EnergyAwareDDPStrategy: names, configuration, communication counting, teardown, multi-node launch.

Multi-process runs are few and short: one spawn run inside pytest, and scripts under ddp_scripts/ run in
subprocesses (``strategy="ddp_green"`` re-runs the script per rank).
"""

import json
import os
import subprocess
import sys
from unittest.mock import Mock

import pytest
import torch
from conftest import DIST_ENV
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.strategies import StrategyRegistry

import lightning_green
from lightning_green import PowerLimitSearch
from lightning_green.power_limit import SimulatedPowerControl
from lightning_green.strategies import CommStats, EnergyAwareDDPStrategy
from lightning_green.strategies.comm import CommCompression, powersgd_payload_numel

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
SCRIPTS = os.path.join(os.path.dirname(__file__), "ddp_scripts")
TWO_LAYER_BYTES = (64 * 64 + 64 + 4 * 64 + 4) * 4  # fp32 gradients of ddp_scripts/_common.TwoLayer


@pytest.fixture(autouse=True)
def _registered():
    EnergyAwareDDPStrategy.register_strategies(StrategyRegistry)


def run_script(name, *args, timeout=180):
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, os.path.join(SCRIPTS, name), *map(str, args)],
        env=env,
        cwd=SCRIPTS,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


# ----------------------------------------------------------------------------- names and configuration
def test_registry_names_resolve_and_second_registration_is_harmless():
    EnergyAwareDDPStrategy.register_strategies(StrategyRegistry)  # a second call must not raise
    popen, spawn = StrategyRegistry.get("ddp_green"), StrategyRegistry.get("ddp_green_spawn")
    assert type(popen) is EnergyAwareDDPStrategy and popen._start_method == "popen"
    assert type(spawn) is EnergyAwareDDPStrategy and spawn._start_method == "spawn"
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp_green", logger=False)
    assert isinstance(trainer.strategy, EnergyAwareDDPStrategy)
    assert trainer.strategy.comm_compression is CommCompression.NONE


def test_importing_the_package_registers_the_names():
    for name in ("ddp_green", "ddp_green_spawn"):
        StrategyRegistry.pop(name, None)
    import importlib

    importlib.reload(lightning_green)
    assert {"ddp_green", "ddp_green_spawn"} <= set(StrategyRegistry)


def test_instance_with_arguments_keeps_ddp_arguments():
    strategy = EnergyAwareDDPStrategy(
        comm_compression="PowerSGD", powersgd_rank=4, find_unused_parameters=True, start_method="spawn"
    )
    trainer = Trainer(accelerator="cpu", devices=2, strategy=strategy, logger=False)
    assert trainer.strategy is strategy
    assert strategy.comm_compression is CommCompression.POWERSGD and strategy.powersgd_rank == 4
    assert strategy._ddp_kwargs == {"find_unused_parameters": True}
    assert strategy._start_method == "spawn" and strategy.num_processes == 2


CLASS_PATHS = [
    "lightning_green.strategies.EnergyAwareDDPStrategy",
    "lightning_green.EnergyAwareDDPStrategy",
]


@pytest.mark.parametrize("class_path", CLASS_PATHS)
def test_lightning_cli_yaml(tmp_path, monkeypatch, class_path):
    from lightning.pytorch.cli import LightningCLI

    monkeypatch.setattr(sys, "argv", ["train.py"])
    config = tmp_path / "config.yaml"
    config.write_text(
        f"""
trainer:
  accelerator: cpu
  devices: 1
  logger: false
  strategy:
    class_path: {class_path}
    init_args:
      comm_compression: fp16
      powersgd_rank: 3
      process_group_backend: gloo
      power_limit:
        class_path: lightning_green.PowerLimitSearch
        init_args:
          power_limit: 250
          eta: 0.25
          max_slowdown: 1.1
          cache: {tmp_path / "cache.json"}
          power_control:
            class_path: lightning_green.power_limit.SimulatedPowerControl
            init_args:
              max_w: 300
"""
    )
    cli = LightningCLI(BoringModel, run=False, args=["--config", str(config)], save_config_callback=None)
    strategy = cli.trainer.strategy
    assert type(strategy) is EnergyAwareDDPStrategy
    assert strategy.comm_compression is CommCompression.FP16 and strategy.powersgd_rank == 3
    assert strategy.process_group_backend == "gloo"
    search = strategy.power_limit_search
    assert isinstance(search, PowerLimitSearch) and search.power_limit == 250
    assert (search.eta, search.max_slowdown, search.cache_path) == (0.25, 1.1, str(tmp_path / "cache.json"))
    assert isinstance(search.control, SimulatedPowerControl) and search.control.max_w == 300


def test_lightning_cli_yaml_shorthand(tmp_path, monkeypatch):
    from lightning.pytorch.cli import LightningCLI

    monkeypatch.setattr(sys, "argv", ["train.py"])
    config = tmp_path / "config.yaml"
    config.write_text(
        """
trainer:
  accelerator: cpu
  devices: 1
  logger: false
  strategy:
    class_path: lightning_green.strategies.EnergyAwareDDPStrategy
    init_args:
      power_limit: search
"""
    )
    cli = LightningCLI(BoringModel, run=False, args=["--config", str(config)], save_config_callback=None)
    search = cli.trainer.strategy.power_limit_search
    assert isinstance(search, PowerLimitSearch) and search.is_search


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"comm_compression": "int8"},
            r"`comm_compression` must be one of None, 'none', 'fp16', 'bf16', 'powersgd', got 'int8'",
        ),
        ({"powersgd_rank": 0}, r"`powersgd_rank` must be an integer >= 1"),
        ({"powersgd_start_step": 1}, r"`powersgd_start_step` must be an integer >= 2"),
        (
            {"power_limit": "max"},
            r"`power_limit` must be None, a number of watts > 0, 'search' or a PowerLimitSearch, got 'max'",
        ),
        ({"power_limit": -5}, r"`power_limit` must be None, a number of watts > 0"),
        (
            {"comm_compression": "fp16", "ddp_comm_hook": lambda s, b: None},
            r"`comm_compression='fp16'` and `ddp_comm_hook`",
        ),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EnergyAwareDDPStrategy(**kwargs)


# ----------------------------------------------------------------------------- accounting without processes
def test_powersgd_payload_matches_torch_rule():
    # 64x64: compressed (64+64)*2 = 256; bias 64: a 64x1 matrix never gains; 4x64: (4+64)*2*2 >= 256, sent whole
    assert (
        powersgd_payload_numel([torch.Size([64, 64]), torch.Size([64]), torch.Size([4, 64]), torch.Size([4])], rank=2)
        == 256 + 64 + 256 + 4
    )
    # a conv kernel is viewed as shape[0] x rest: 32 x 288, rank 4 -> (32 + 288) * 4
    assert powersgd_payload_numel([torch.Size([32, 32, 3, 3])], rank=4) == (32 + 288) * 4
    # rank is capped by the matrix: 3x1000 at rank 8 -> r = 3 -> 3009 * 3 = 9027 < 3000? no: sent whole
    assert powersgd_payload_numel([torch.Size([3, 1000])], rank=8) == 3000


def test_comm_stats_counts_steps_and_exposed_time():
    now = [0.0]
    stats = CommStats(clock=lambda: now[0])
    f1, f2 = torch.futures.Future(), torch.futures.Future()
    out1 = stats.track(f1, 100, 200, is_last=False)
    now[0] = 1.0
    out2 = stats.track(f2, 50, 200, is_last=True)  # backward done at t = 1
    assert (stats.steps, stats.bytes_sent_last_step, stats.bytes_uncompressed_last_step) == (1, 150, 400)
    now[0] = 1.25
    f2.set_result(torch.ones(1))
    assert stats.exposed_comm_s_last_step == 0.0  # the first bucket is still in flight
    now[0] = 1.5
    f1.set_result(torch.zeros(1))
    assert stats.exposed_comm_s_last_step == pytest.approx(0.5)  # last future done at 1.5
    assert torch.equal(out1.wait(), torch.zeros(1)) and torch.equal(out2.wait(), torch.ones(1))
    assert stats.pop_exposed_comm_s() == pytest.approx(0.5) and stats.pop_exposed_comm_s() == 0.0
    assert stats.compression_ratio == pytest.approx(400 / 150)
    f3 = torch.futures.Future()
    now[0] = 2.0
    stats.track(f3, 400, 400, is_last=True)
    f3.set_result(torch.ones(1))
    assert (stats.steps, stats.bytes_sent, stats.bytes_uncompressed) == (2, 550, 800)
    assert stats.exposed_comm_s_total == pytest.approx(0.5)  # the last call and its completion were both at t = 2


# ----------------------------------------------------------------------------- multi-process runs
def test_bytes_per_step_by_compression_two_ranks(tmp_path):
    run_script("comm_bytes.py", tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for res in ranks:
        none, fp16, bf16, psgd = (res[k] for k in ("none", "fp16", "bf16", "powersgd"))
        assert none["world_size"] == 2
        assert none["stats"]["bytes_sent_last_step"] == TWO_LAYER_BYTES
        assert none["stats"]["bytes_sent"] == 6 * TWO_LAYER_BYTES and none["stats"]["steps"] == 6
        assert fp16["stats"]["bytes_sent"] * 2 == none["stats"]["bytes_sent"]
        assert bf16["stats"]["bytes_sent"] == fp16["stats"]["bytes_sent"]
        # powersgd_start_step=2: two plain steps, then P, Q and the uncompressed tensors (580 floats)
        assert psgd["stats"]["bytes_sent"] == 2 * TWO_LAYER_BYTES + 4 * 580 * 4
        assert psgd["stats"]["bytes_uncompressed"] == none["stats"]["bytes_sent"]
        # logged at log_every_n_steps=2, step = optimizer steps done
        assert none["comm_logs"] == [
            [{"comm/bytes_per_step": TWO_LAYER_BYTES, "comm/compression_ratio": 1.0}, s] for s in (2, 4, 6)
        ]
        assert [m["comm/compression_ratio"] for m, _ in fp16["comm_logs"]] == [2.0, 2.0, 2.0]
        assert [m["comm/bytes_per_step"] for m, _ in psgd["comm_logs"]] == [TWO_LAYER_BYTES, 2320, 2320]
        assert all(0 < r["stats"]["exposed_comm_s_total"] < 5 for r in res.values())
        # teardown destroyed the process group, and the next fit made a new one
        assert not any(r["pg_initialized_after_fit"] for r in res.values())
        assert all(len(r["losses"]) == 6 for r in res.values())
        # compression changes the gradients a little, not the training: same first loss, close last loss
        assert fp16["losses"][0] == none["losses"][0]
        assert abs(fp16["losses"][-1] - none["losses"][-1]) < 0.05 * none["losses"][-1]
    assert ranks[0]["powersgd"]["losses"] != ranks[1]["powersgd"]["losses"]  # different shards per rank


class _RecordAfterTeardown(Callback):
    """Writes this rank's counters and the process group's state once the strategy has torn down."""

    def __init__(self, folder):
        self.folder = folder

    def teardown(self, trainer, pl_module, stage):
        data = {
            "stats": trainer.strategy.comm_stats.as_dict(),
            "pg": torch.distributed.is_initialized(),
            "world": trainer.world_size,
        }
        with open(os.path.join(self.folder, f"rank{trainer.global_rank}.json"), "w") as f:
            json.dump(data, f)


def test_spawn_by_name_counts_bytes_and_destroys_process_group(tmp_path):
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_green_spawn",
        max_steps=3,
        logger=False,
        callbacks=[_RecordAfterTeardown(str(tmp_path))],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(BoringModel())
    for rank in (0, 1):
        data = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert data["world"] == 2 and data["pg"] is False
        assert data["stats"]["steps"] == 3 and data["stats"]["bytes_sent"] == 3 * (32 * 2 + 2) * 4


def test_teardown_destroys_process_group_single_process(tmp_path):
    strategy = EnergyAwareDDPStrategy()
    seen = {}

    class Probe(Callback):
        def on_train_end(self, trainer, pl_module):
            seen["during"] = torch.distributed.is_initialized()

    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        strategy=strategy,
        max_steps=2,
        logger=False,
        callbacks=[Probe()],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(BoringModel())
    assert seen["during"] is True and not torch.distributed.is_initialized()
    assert strategy.comm_stats.steps == 2  # the counting hook ran on CPU


def test_two_nodes_on_one_machine(tmp_path):
    run_script("two_node.py", tmp_path)
    nodes = [json.loads((tmp_path / f"node{n}.json").read_text()) for n in (0, 1)]
    assert [(n["global_rank"], n["node_rank"], n["local_rank"]) for n in nodes] == [(0, 0, 0), (1, 1, 0)]
    assert all(
        n["world_size"] == 2 and n["num_nodes"] == 2 and n["strategy"] == "EnergyAwareDDPStrategy" for n in nodes
    )
    assert nodes[0]["final_weight_sum"] == nodes[1]["final_weight_sum"]  # gradients were averaged across nodes
    assert all(n["comm"]["bytes_sent"] == 8 * TWO_LAYER_BYTES and not n["pg_initialized_after_fit"] for n in nodes)
    # The host-level sensor is read once per node: by local rank 0 of each (here every process).
    assert all(n["sensors"] == ["host", "dev"] and n["skipped"] == [] for n in nodes)
    cluster = nodes[0]["cluster"]
    assert cluster["num_nodes"] == 2 and cluster["world_size"] == 2
    for r in cluster["per_rank"]:  # host 50 W + device 100 W: a third of each rank's energy is the host's
        assert r["device_energy_j"] == pytest.approx(r["energy_j"] * 100 / 150, rel=0.02)
    assert cluster["total_j"] == pytest.approx(sum(r["energy_j"] for r in cluster["per_rank"]))


def test_mock_logger_is_not_called_per_step_for_comm(tmp_path):
    logger = Mock()
    logger.log_dir = logger.save_dir = None
    strategy = EnergyAwareDDPStrategy(comm_compression="fp16")
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        strategy=strategy,
        max_steps=10,
        log_every_n_steps=5,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(BoringModel())
    calls = [c for c in logger.log_metrics.call_args_list if "comm/bytes_per_step" in c.args[0]]
    assert [(c.args[0]["comm/bytes_per_step"], c.kwargs["step"]) for c in calls] == [(66 * 2, 5), (66 * 2, 10)]
