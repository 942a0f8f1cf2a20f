import os
import sys
import threading

import pytest

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture
def fake_nvml(monkeypatch):
    """Install a fake ``pynvml`` and return a factory: ``fake_nvml(gpus=[...], library_found=True)``."""
    from fake_pynvml import FakeNvml

    def install(**kwargs):
        fake = FakeNvml(**kwargs)
        monkeypatch.setitem(sys.modules, "pynvml", fake.module())
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        return fake

    return install


DIST_ENV = (
    "MASTER_ADDR",
    "MASTER_PORT",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "NODE_RANK",
    "GROUP_RANK",
    "RANK",
    "LOCAL_WORLD_SIZE",
)


@pytest.fixture(autouse=True)
def fresh_dist_env():
    """Lightning leaves MASTER_PORT & co. in os.environ; a later run would reuse a port the OS may have
    handed out since. Each test starts without them and leaves none behind."""
    saved = {k: os.environ.pop(k) for k in DIST_ENV if k in os.environ}
    yield
    for k in DIST_ENV:
        os.environ.pop(k, None)
    os.environ.update(saved)


def sampler_threads():
    return [t for t in threading.enumerate() if t.name.startswith("lightning_green")]
