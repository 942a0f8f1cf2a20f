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


def sampler_threads():
    return [t for t in threading.enumerate() if t.name.startswith("lightning_green")]
