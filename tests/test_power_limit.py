"""Power limits: the controls, the Trainer-free search, the cache, restoring on exit, and the
PowerLimitSearch callback (alone and installed by the strategy's ``power_limit``)."""

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from unittest.mock import Mock

import pytest
from conftest import DIST_ENV
from fake_pynvml import FakeGpu
from helpers import FakeClock
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_green import PowerLimitSearch, PowerSampler
from lightning_green.power_limit import (
    LimitProfile,
    LimitSearch,
    NvmlPowerControl,
    PowerControl,
    PowerControlUnavailable,
    PowerLimitCache,
    SigtermRestore,
    SimulatedPowerControl,
    choose_limit,
    limit_grid,
)
from lightning_green.power_limit import restore as restore_module
from lightning_green.strategies import EnergyAwareDDPStrategy

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
SCRIPTS = os.path.join(os.path.dirname(__file__), "ddp_scripts")


def child_env():
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def read_limit(path):
    with open(path) as f:
        return json.load(f)["limit_w"]


# ============================================================================ the simulated device
def test_simulated_model_formulas():
    c = SimulatedPowerControl(min_w=150, max_w=400, demand_w=400, static_w=100, step_s=0.1, beta=0.8)
    assert c.clock_fraction(400) == 1.0 and c.clock_fraction(500) == 1.0
    assert c.clock_fraction(200) == pytest.approx((100 / 300) ** (1 / 3))
    assert c.power_w(250) == 250 and c.power_w() == 400  # the initial limit is max_w
    f = (150 / 300) ** (1 / 3)
    assert c.step_time_s(250) == pytest.approx(0.1 * (0.2 + 0.8 / f))
    assert c.energy_per_step_j(250) == pytest.approx(250 * 0.1 * (0.2 + 0.8 / f))
    # lower limit: less energy per step, more time per step
    energies = [c.energy_per_step_j(w) for w in (400, 300, 200)]
    times = [c.step_time_s(w) for w in (400, 300, 200)]
    assert energies == sorted(energies, reverse=True) and times == sorted(times)


def test_simulated_state_file_is_the_device(tmp_path):
    path = tmp_path / "dev.json"
    a = SimulatedPowerControl(state_path=path)
    assert a.get_limit_w() == 400 and not path.exists()
    a.set_limit_w(250)
    assert read_limit(path) == 250 and a.original_limit_w == 400
    b = SimulatedPowerControl(state_path=path)  # another process would see the same
    assert b.get_limit_w() == 250
    a.set_limit_w(200)
    assert a.original_limit_w == 400  # the first original is kept
    assert a.restore() is True and read_limit(path) == 400
    assert a.restore() is False and not a.changed


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"min_w": 100, "static_w": 100}, "static_w < min_w"),
        ({"min_w": 500}, "min_w <= max_w"),
        ({"beta": 1.5}, r"`beta` must be in \[0, 1\]"),
        ({"demand_w": 50}, "`demand_w` must exceed `static_w`"),
    ],
)
def test_simulated_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SimulatedPowerControl(**kwargs)


def test_limit_outside_bounds_is_refused():
    c = SimulatedPowerControl(min_w=150, max_w=400)
    with pytest.raises(ValueError, match=r"450 W is outside the device's bounds \[150, 400\] W"):
        c.set_limit_w(450)
    assert c.get_limit_w() == 400 and not c.changed


def test_limit_restored_when_the_process_exits(tmp_path):
    path = tmp_path / "dev.json"
    code = (
        "import sys; from lightning_green.power_limit import SimulatedPowerControl as S;"
        f"c = S(state_path={str(path)!r}); c.set_limit_w(175); print(c.get_limit_w()); sys.exit(3)"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3 and proc.stdout.strip() == "175.0", proc.stderr
    assert read_limit(path) == 400


# ============================================================================ NVML control (fake pynvml)
def test_nvml_control_watts_and_restore(fake_nvml):
    gpu = FakeGpu(uuid="GPU-a", limit_mw=700_000, min_limit_mw=200_000, max_limit_mw=700_000)
    fake_nvml(gpus=[gpu])
    c = NvmlPowerControl(index=0)
    assert c.bounds_w() == (200.0, 700.0) and c.get_limit_w() == 700.0
    c.check_permission()
    c.set_limit_w(412.5)
    assert gpu.limit_mw == 412_500 and c.device_name == "NVIDIA H200"
    assert c.restore() and gpu.limit_mw == 700_000
    c.close()


def test_nvml_control_without_permission(fake_nvml):
    gpu = FakeGpu(uuid="GPU-a", can_set_limit=False)
    fake_nvml(gpus=[gpu])
    c = NvmlPowerControl(index=0)
    with pytest.raises(PowerControlUnavailable, match="NO_PERMISSION"):
        c.check_permission()
    assert gpu.limit_mw == 700_000


def test_nvml_control_needs_a_cuda_device():
    with pytest.raises(PowerControlUnavailable, match="need a CUDA device"):
        NvmlPowerControl().attach(__import__("torch").device("cpu"))


# ============================================================================ SIGTERM handler (in process)
def test_sigterm_handler_restores_then_chains(monkeypatch):
    order = []
    previous = lambda signum, frame: order.append(("previous", signum))  # noqa: E731
    monkeypatch.setattr(signal, "getsignal", lambda s: previous)
    installed = {}
    monkeypatch.setattr(signal, "signal", lambda s, h: installed.__setitem__(s, h))
    guard = SigtermRestore(lambda: order.append("restore"))
    assert guard.install() and installed[signal.SIGTERM] == guard._handler
    installed[signal.SIGTERM](signal.SIGTERM, None)
    assert order == ["restore", ("previous", signal.SIGTERM)]


def test_sigterm_handler_reraises_with_default_handler(monkeypatch):
    order = []
    monkeypatch.setattr(signal, "getsignal", lambda s: signal.SIG_DFL)
    monkeypatch.setattr(signal, "signal", lambda s, h: order.append(("signal", h)))
    monkeypatch.setattr(restore_module.os, "kill", lambda pid, s: order.append(("kill", pid, s)))
    guard = SigtermRestore(lambda: order.append("restore"))
    guard.install()
    guard._handle(signal.SIGTERM, None)
    assert order[1:] == ["restore", ("signal", signal.SIG_DFL), ("kill", os.getpid(), signal.SIGTERM)]


# ============================================================================ the search (plain calls)
def test_limit_grid():
    assert limit_grid(150, 400, 50) == [400, 350, 300, 250, 200, 150]
    assert limit_grid(100, 330, 100) == [330, 230, 130]  # from the max down; min not added off-grid
    with pytest.raises(ValueError, match="`limit_step_w` must be > 0"):
        limit_grid(100, 300, 0)


def test_choose_limit_by_cost_and_by_slowdown():
    profiles = [
        LimitProfile(300, energy_per_step_j=30.0, time_per_step_s=0.100, steps=5),
        LimitProfile(250, energy_per_step_j=26.0, time_per_step_s=0.104, steps=5),
        LimitProfile(200, energy_per_step_j=22.0, time_per_step_s=0.120, steps=5),
    ]
    # eta = 0.5, P_max = 300: costs 0.5*30 + 0.5*300*0.1 = 30, 13 + 15.6 = 28.6, 11 + 18 = 29
    limit, rows = choose_limit(profiles, eta=0.5)
    assert limit == 250 and [r["cost"] for r in rows] == pytest.approx([30.0, 28.6, 29.0])
    assert [r["chosen"] for r in rows] == [False, True, False]
    assert choose_limit(profiles, eta=1.0)[0] == 200  # energy only
    assert choose_limit(profiles, eta=0.0)[0] == 300  # time only
    assert choose_limit(profiles, max_slowdown=1.05)[0] == 250  # 200 W is 20% slower
    assert choose_limit(profiles, max_slowdown=1.2)[0] == 200
    assert choose_limit(profiles, max_slowdown=1.0)[0] == 300


def run_search(control, search, step_s):
    """Drive a search with the simulated model's exact per-step energy and time."""
    limit, steps = control.max_w, 0
    while not search.done:
        if search.due(steps):
            if search.profiling_w is not None:
                n = search.profile_steps
                search.record(control.energy_per_step_j(limit, step_s) * n, control.step_time_s(limit, step_s) * n, n)
            nxt = search.start_next(steps)
            limit = nxt if nxt is not None else search.chosen_w
        steps += 1
    return steps


@pytest.mark.parametrize("eta", [0.0, 0.3, 0.5, 0.8, 1.0])
def test_search_finds_the_cost_optimum_within_one_grid_step(eta):
    control = SimulatedPowerControl(min_w=150, max_w=400)
    search = LimitSearch(limit_grid(150, 400, 25), warmup_steps=3, profile_steps=4, eta=eta, p_max_w=400)
    steps = run_search(control, search, step_s=0.1)
    assert steps == 3 + 11 * 4 + 1  # warm-up, one window per candidate, then the choice
    fine = [150 + 0.5 * i for i in range(501)]
    cost = lambda w: eta * control.energy_per_step_j(w, 0.1) + (1 - eta) * 400 * control.step_time_s(w, 0.1)  # noqa: E731
    best = min(fine, key=cost)
    assert abs(search.chosen_w - best) <= 25
    assert [r["limit_w"] for r in search.table] == limit_grid(150, 400, 25)
    if eta == 0.5:
        assert search.chosen_w == 300  # this model's interior optimum
    if eta == 1.0:
        assert search.chosen_w == 150
    if eta == 0.0:
        assert search.chosen_w == 400


def test_search_by_max_slowdown():
    control = SimulatedPowerControl(min_w=150, max_w=400)
    search = LimitSearch(limit_grid(150, 400, 25), warmup_steps=0, profile_steps=2, max_slowdown=1.10)
    run_search(control, search, step_s=0.1)
    t_max = control.step_time_s(400, 0.1)
    allowed = [w for w in limit_grid(150, 400, 25) if control.step_time_s(w, 0.1) <= 1.10 * t_max]
    assert search.chosen_w == min(allowed) == 325  # energy falls with the limit: the lowest allowed
    assert control.step_time_s(300, 0.1) > 1.10 * t_max


def test_search_schedule_and_misuse():
    search = LimitSearch([300, 200], warmup_steps=2, profile_steps=3)
    assert not search.due(1) and search.due(2)
    assert search.start_next(2) == 300 and search.profiling_w == 300
    with pytest.raises(RuntimeError, match="was not recorded"):
        search.start_next(2)
    assert not search.due(4) and search.due(5)
    search.record(energy_j=30.0, time_s=0.3, steps=3)
    assert search.start_next(5) == 200
    search.record(energy_j=21.0, time_s=0.36, steps=3)
    assert search.start_next(8) is None and search.done and not search.due(100)
    assert [(p.limit_w, p.energy_per_step_j, p.time_per_step_s) for p in search.profiles] == [
        (300, 10.0, pytest.approx(0.1)),
        (200, 7.0, pytest.approx(0.12)),
    ]
    with pytest.raises(RuntimeError, match="no window is open"):
        search.record(1.0, 1.0, 1)


def test_cache_round_trip_and_corrupt_file(tmp_path):
    path = tmp_path / "sub" / "limits.json"
    cache = PowerLimitCache(str(path))
    key = PowerLimitCache.key("NVIDIA H100", 8)
    assert key == "NVIDIA H100|world_size=8" and cache.load(key) is None
    profiles = [LimitProfile(300, 10.0, 0.1, 5), LimitProfile(250, 9.0, 0.11, 5)]
    cache.store(key, profiles, eta=0.5)
    assert cache.load(key) == profiles and cache.load(PowerLimitCache.key("NVIDIA H100", 4)) is None
    cache.store(PowerLimitCache.key("NVIDIA H100", 4), profiles[:1])
    assert cache.load(key) == profiles  # other entries are kept
    path.write_text("{not json")
    assert cache.load(key) is None


# ============================================================================ the strategy in a Trainer
class LimitProbe(Callback):
    """Records the device limit at every training batch end."""

    def __init__(self, control):
        self.control, self.limits = control, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.limits.append(self.control.get_limit_w())


class FailingModel(BoringModel):
    def __init__(self, exc=None, at=3):
        super().__init__()
        self.exc, self.at = exc, at

    def training_step(self, batch, batch_idx):
        if self.exc is not None and self.global_step >= self.at:
            raise self.exc
        return super().training_step(batch, batch_idx)


def fit(strategy, model=None, max_steps=6, callbacks=(), logger=False, root=None):
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        strategy=strategy,
        max_steps=max_steps,
        logger=logger,
        callbacks=list(callbacks),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )
    trainer.fit(model or BoringModel())
    return trainer


def mock_logger():
    logger = Mock()
    logger.log_dir = logger.save_dir = None
    return logger


def test_fixed_limit_applied_logged_and_restored(tmp_path):
    control = SimulatedPowerControl(state_path=tmp_path / "dev.json")
    probe, logger = LimitProbe(control), mock_logger()
    strategy = EnergyAwareDDPStrategy(power_limit=PowerLimitSearch(225, power_control=control))
    fit(strategy, callbacks=[probe], logger=logger, root=tmp_path)
    assert probe.limits == [225.0] * 6
    assert read_limit(tmp_path / "dev.json") == 400 and control.get_limit_w() == 400
    logged = [c.args[0]["power/limit_w"] for c in logger.log_metrics.call_args_list if "power/limit_w" in c.args[0]]
    assert logged == [225.0]


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_limit_restored_on_exception_and_keyboard_interrupt(tmp_path, exc):
    control = SimulatedPowerControl(state_path=tmp_path / "dev.json")
    probe = LimitProbe(control)
    sigint = signal.getsignal(signal.SIGINT)
    try:
        expected = SystemExit if isinstance(exc, KeyboardInterrupt) else RuntimeError  # Lightning exits on Ctrl+C
        with pytest.raises(expected):
            fit(
                EnergyAwareDDPStrategy(power_limit=PowerLimitSearch(175, power_control=control)),
                FailingModel(exc),
                callbacks=[probe],
                root=tmp_path,
            )
    finally:
        signal.signal(signal.SIGINT, sigint)  # Lightning ignores SIGINT after a KeyboardInterrupt
    assert probe.limits == [175.0] * 3
    assert read_limit(tmp_path / "dev.json") == 400


def test_limit_restored_on_sigterm(tmp_path):
    state, ready = tmp_path / "dev.json", tmp_path / "ready"
    proc = subprocess.Popen(
        [sys.executable, os.path.join(SCRIPTS, "sigterm_child.py"), str(state), str(ready)],
        env=child_env(),
        cwd=SCRIPTS,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 90
        while not ready.exists():
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the child never got ready"
            time.sleep(0.05)
        assert read_limit(state) == 200
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        # Real time, unavoidably (a signal to another process). The step in progress sleeps 2 s, so a
        # restore within 1.5 s can only come from the handler; 1.5 s leaves the child that long to be
        # scheduled, run the handler and write the file on a machine with both cores busy.
        while read_limit(state) != 400:
            assert time.monotonic() - t0 < 1.5, "the limit was not restored by the SIGTERM handler"
            time.sleep(0.005)
        proc.wait(timeout=60)  # Lightning's own handler then stops training
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_fixed_limit_outside_bounds_fails_in_setup(tmp_path):
    control = SimulatedPowerControl(min_w=150, max_w=300)
    with pytest.raises(
        ValueError, match=r"`power_limit=350` is outside the device's bounds: allowed values are 150 to 300 W"
    ):
        fit(EnergyAwareDDPStrategy(power_limit=PowerLimitSearch(350, power_control=control)), root=tmp_path)
    assert control.get_limit_w() == 300 and not control.changed


def test_search_without_power_sampler_fails_in_setup(tmp_path):
    with pytest.raises(MisconfigurationException, match=r"add `lightning_green.PowerSampler"):
        search = PowerLimitSearch("search", power_control=SimulatedPowerControl())
        fit(EnergyAwareDDPStrategy(power_limit=search), root=tmp_path)


def test_no_permission_warns_once_and_trains(tmp_path, fake_nvml):
    gpu = FakeGpu(uuid="GPU-a", can_set_limit=False)
    fake_nvml(gpus=[gpu])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        search = PowerLimitSearch(300, power_control=NvmlPowerControl(index=0))
        trainer = fit(EnergyAwareDDPStrategy(power_limit=search), root=tmp_path)
    messages = [str(w.message) for w in caught if "monitoring only" in str(w.message)]
    assert len(messages) == 1 and "NO_PERMISSION" in messages[0]
    assert trainer.global_step == 6 and gpu.limit_mw == 700_000


class StepClock(FakeClock):
    """Simulated time for the power-limit search: each training batch lasts exactly the model's step time
    ``T(L)`` under the limit in force, and the sensors are read at every batch end but the last (the
    sampler's final reading is there). Windows and energies are then exact, whatever the machine's load."""

    def __init__(self, control, step_s):
        super().__init__()
        self.control = control
        self.step_s = step_s

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.t += self.control.step_time_s(step_s=self.step_s)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


def test_search_in_a_trainer_then_from_the_cache(tmp_path):
    cache = tmp_path / "limits.json"
    control = SimulatedPowerControl(min_w=150, max_w=400)  # step_s=0: no sleeping, the StepClock moves time
    clock = StepClock(control, step_s=0.04)
    sampler = PowerSampler(
        sensors=[control.sensor(clock=clock)],
        interval_s=3600.0,
        print_summary=False,
        summary_dir=str(tmp_path),
        clock=clock,
    )
    clock.reads = sampler.session
    probe, logger = LimitProbe(control), mock_logger()
    search_cb = PowerLimitSearch(
        "search",
        power_control=control,
        warmup_steps=1,
        profile_steps=3,
        settle_steps=1,
        limit_step_w=50,
        cache=str(cache),
        clock=clock,
    )
    strategy = EnergyAwareDDPStrategy(power_limit=search_cb)
    fit(strategy, max_steps=28, callbacks=[sampler, clock, probe], logger=logger, root=tmp_path)
    assert strategy.power_limit_search is search_cb
    search = search_cb.search
    grid = [400, 350, 300, 250, 200, 150]
    assert [p.limit_w for p in search.profiles] == grid and all(p.steps == 3 for p in search.profiles)
    # each window holds 3 whole steps under one limit (the settle step takes the change): the model exactly
    for p in search.profiles:
        assert p.energy_per_step_j == pytest.approx(control.energy_per_step_j(p.limit_w, 0.04)), p
        assert p.time_per_step_s == pytest.approx(control.step_time_s(p.limit_w, 0.04)), p
    assert search.chosen_w == 300  # the model's optimum at eta=0.5 (see test_search_finds_the_cost_optimum...)
    logged = [c.args[0]["power/limit_w"] for c in logger.log_metrics.call_args_list if "power/limit_w" in c.args[0]]
    assert logged == grid + [300.0]
    assert probe.limits[1 + 6 * 4 :] == [300.0] * (28 - 1 - 6 * 4)  # steps after the search
    assert control.get_limit_w() == 400  # restored
    assert sampler.summary["sections"]["power_limit"]["rows"] == [dict(r, source="profiled") for r in search.table]
    assert PowerLimitCache(str(cache)).load("simulated|world_size=1") == search.profiles

    # a second run reads the cache: no profiling, the same choice from the first step
    control2 = SimulatedPowerControl(min_w=150, max_w=400)
    sampler2 = PowerSampler(
        sensors=[control2.sensor()], interval_s=0.01, print_summary=False, summary_dir=str(tmp_path)
    )
    probe2 = LimitProbe(control2)
    strategy2 = EnergyAwareDDPStrategy(
        power_limit=PowerLimitSearch("search", power_control=control2, limit_step_w=50, cache=str(cache))
    )
    fit(strategy2, max_steps=3, callbacks=[sampler2, probe2], root=tmp_path)
    assert strategy2.power_limit_search.from_cache and probe2.limits == [300.0] * 3
    assert sampler2.summary["sections"]["power_limit"]["rows"][0]["source"] == "cache"


def test_search_cut_short_restores_and_reports_what_it_profiled(tmp_path):
    control = SimulatedPowerControl(min_w=150, max_w=400)
    sampler = PowerSampler(sensors=[control.sensor()], interval_s=0.01, print_summary=False, summary_dir=str(tmp_path))
    search_cb = PowerLimitSearch(
        "search",
        power_control=control,
        warmup_steps=1,
        profile_steps=2,
        settle_steps=0,
        limit_step_w=50,
        cache=False,
    )
    # windows: 400 W (1-3), 350 W (3-5), 300 W open
    fit(EnergyAwareDDPStrategy(power_limit=search_cb), max_steps=6, callbacks=[sampler], root=tmp_path)
    rows = sampler.summary["sections"]["power_limit"]["rows"]
    assert [r["limit_w"] for r in rows] == [400, 350] and all("incomplete" in r["source"] for r in rows)
    assert not search_cb.search.done and control.get_limit_w() == 400


def test_simulated_sensor_follows_the_limit_and_pickles():
    import pickle

    control = SimulatedPowerControl(demand_w=350)
    sensor = control.sensor()
    assert sensor.read().value == 350  # limit 400 > demand
    control.set_limit_w(200)
    assert sensor.read().value == 200
    copy = pickle.loads(pickle.dumps(sensor))  # a spawned rank gets a copy of sensor and control together
    assert copy.read().value == 200


# ============================================================================ the callback, any strategy
def test_callback_on_a_single_device_settles_after_each_change(tmp_path):
    control = SimulatedPowerControl(min_w=300, max_w=400)
    sampler = PowerSampler(sensors=[control.sensor()], interval_s=0.01, print_summary=False, summary_dir=str(tmp_path))
    search_cb = PowerLimitSearch(
        "search", power_control=control, warmup_steps=1, profile_steps=2, settle_steps=2, limit_step_w=50, cache=False
    )
    probe, logger = LimitProbe(control), mock_logger()
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=16,
        logger=logger,
        callbacks=[sampler, search_cb, probe],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(BoringModel())
    search = search_cb.search
    assert type(trainer.strategy).__name__ == "SingleDeviceStrategy"
    assert [p.limit_w for p in search.profiles] == [400, 350, 300] and all(p.steps == 2 for p in search.profiles)
    # windows: 400 W from step 1 (measured 3-5), 350 W from 5 (7-9), 300 W from 9 (11-13), then the choice
    assert probe.limits[:13] == [400.0] * 5 + [350.0] * 4 + [300.0] * 4
    assert probe.limits[13:] == [search.chosen_w] * 3 and control.get_limit_w() == 400  # restored
    assert sampler.summary["sections"]["power_limit"]["rows"] == [dict(r, source="profiled") for r in search.table]


def test_callback_with_plain_ddp_two_ranks_agrees_and_restores(tmp_path):
    # Two processes, strategy="ddp" (not ddp_green): the callback needs only the strategy's collectives.
    # Rank 1's simulated workload is less clock-bound; time is simulated per rank (exact windows).
    proc = subprocess.run(
        [sys.executable, os.path.join(SCRIPTS, "limit_search.py"), str(tmp_path)],
        env=child_env(),
        cwd=SCRIPTS,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    controls = [SimulatedPowerControl(min_w=150, max_w=400, beta=r["beta"]) for r in ranks]
    grid = limit_grid(150, 400, 50)
    # a window's energy is the sum over ranks, its time the slowest rank's; P_max = 400 W x 2 ranks
    model = [
        LimitProfile(
            w, sum(c.energy_per_step_j(w, 0.04) for c in controls), max(c.step_time_s(w, 0.04) for c in controls), 2
        )
        for w in grid
    ]
    expected_w, _ = choose_limit(model, eta=0.5, p_max_w=800)
    alone_w = [
        choose_limit([LimitProfile(w, c.energy_per_step_j(w, 0.04), c.step_time_s(w, 0.04), 2) for w in grid], eta=0.5)[
            0
        ]
        for c in controls
    ]
    assert expected_w == 250 and alone_w == [300, 200]  # each rank alone would choose another limit
    schedule = (
        [400.0] * 4 + [w for w in grid[1:] for _ in range(3)] + [expected_w] * 2
    )  # warm-up 1, then settle 1 + profile 2 each
    for r in ranks:
        assert (r["strategy"], r["world_size"]) == ("DDPStrategy", 2)
        assert r["chosen_w"] == expected_w and r["limits"] == schedule
        assert [(p["limit_w"], p["steps"]) for p in r["profiles"]] == [(w, 2) for w in grid]
        for p, m in zip(r["profiles"], model, strict=False):
            assert (p["energy_per_step_j"], p["time_per_step_s"]) == (
                pytest.approx(m.energy_per_step_j),
                pytest.approx(m.time_per_step_s),
            )
        assert (
            r["limit_after_fit_w"] == 400 and read_limit(tmp_path / f"dev{r['rank']}.json") == 400
        )  # restored on both devices


def test_callback_and_strategy_shorthand_cannot_both_set_limits(tmp_path):
    with pytest.raises(MisconfigurationException, match="pass `power_limit` to one of them only"):
        fit(
            EnergyAwareDDPStrategy(power_limit=PowerLimitSearch(300, power_control=SimulatedPowerControl())),
            callbacks=[PowerLimitSearch(250, power_control=SimulatedPowerControl())],
            root=tmp_path,
        )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"power_limit": None}, "`power_limit` must be a number of watts > 0 or 'search', got None"),
        ({"power_limit": "max"}, "`power_limit` must be a number of watts > 0 or 'search', got 'max'"),
        ({"power_limit": True}, "`power_limit` must be a number of watts > 0 or 'search', got True"),
        ({"power_control": "amd"}, r"`power_control` must be None, 'nvml' or a PowerControl instance, got 'amd'"),
        ({"eta": 1.5}, r"`eta` must be a number in \[0, 1\], got 1.5"),
        ({"eta": -0.1}, r"`eta` must be a number in \[0, 1\]"),
        ({"max_slowdown": 0.9}, r"`max_slowdown` must be None or a number >= 1"),
        ({"warmup_steps": -1}, r"`warmup_steps` must be an integer >= 0"),
        ({"profile_steps": 0}, r"`profile_steps` must be an integer >= 1"),
        ({"settle_steps": -1}, "`settle_steps` must be an integer >= 0"),
        ({"limit_step_w": 0}, r"`limit_step_w` must be a number of watts > 0"),
        ({"cache": 3}, "`cache` must be True, False, None or a path"),
    ],
)
def test_callback_bad_arguments(kwargs, match):
    arguments = {"power_control": SimulatedPowerControl(), **kwargs}
    with pytest.raises((ValueError, TypeError), match=match):
        PowerLimitSearch(**arguments)


# ============================================================================ the strategy's power_limit forms
def test_strategy_shorthand_builds_the_callback_with_its_defaults():
    assert EnergyAwareDDPStrategy().power_limit_search is None
    strategy = EnergyAwareDDPStrategy(power_limit="search")
    search_cb = strategy.power_limit_search
    assert isinstance(search_cb, PowerLimitSearch) and search_cb.is_search
    defaults = PowerLimitSearch("search")
    assert (search_cb.eta, search_cb.warmup_steps, search_cb.cache_path) == (
        defaults.eta,
        defaults.warmup_steps,
        defaults.cache_path,
    )
    assert EnergyAwareDDPStrategy(power_limit=250).power_limit_search.power_limit == 250


def test_strategy_deprecated_search_arguments_still_work():
    control = SimulatedPowerControl()
    with pytest.warns(DeprecationWarning, match=r"EnergyAwareDDPStrategy\(eta, power_control, power_limit_cache\)"):
        strategy = EnergyAwareDDPStrategy(power_limit=250, power_control=control, eta=0.25, power_limit_cache=False)
    search_cb = strategy.power_limit_search
    assert (search_cb.power_limit, search_cb.control, search_cb.eta, search_cb.cache_path) == (250, control, 0.25, None)
    assert strategy.power_control is control
    with pytest.warns(DeprecationWarning, match="renamed `power_limit_search`"):
        assert strategy.power_limiter is search_cb
    # checked even without a limit, as before
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match=r"`eta` must be a number in \[0, 1\]"):
        EnergyAwareDDPStrategy(eta=1.5)
    with pytest.raises(ValueError, match=r"pass \['eta'\] to it, not to the strategy"):
        EnergyAwareDDPStrategy(power_limit=PowerLimitSearch(250, power_control=control), eta=0.25)


@pytest.mark.parametrize(
    ("old_module", "name"),
    [
        ("lightning_green.strategies.power_control", "SimulatedPowerControl"),
        ("lightning_green.strategies.power_limit", "LimitSearch"),
        ("lightning_green.strategies.sigterm", "SigtermRestore"),
    ],
)
def test_old_module_paths_warn_and_give_the_same_objects(monkeypatch, old_module, name):
    import importlib

    import lightning_green.power_limit

    monkeypatch.delitem(sys.modules, old_module, raising=False)
    with pytest.warns(DeprecationWarning, match="moved to `lightning_green.power_limit"):
        module = importlib.import_module(old_module)
    assert getattr(module, name) is getattr(lightning_green.power_limit, name)


def test_old_package_names_warn_and_give_the_same_objects():
    import lightning_green.strategies

    with pytest.warns(DeprecationWarning, match=r"moved to `lightning_green.power_limit.PowerControl`"):
        assert lightning_green.strategies.PowerControl is PowerControl
    with pytest.raises(AttributeError, match="has no attribute 'NoSuchName'"):
        lightning_green.strategies.NoSuchName  # noqa: B018
