"""Which backend each op picks on each device family (fake devices; nothing runs on them)."""
import pytest
import torch

from tests.backends.test_detection import fake_gpu, fake_npu
from twinkle import backends, kernels
from twinkle.kernels import registry


@pytest.fixture(autouse=True)
def clean(fresh_registry, monkeypatch):
    monkeypatch.delenv('TWINKLE_DEVICE', raising=False)
    monkeypatch.delenv('TRITON_INTERPRET', raising=False)
    backends.reset()
    yield
    backends.reset()


def test_a100_prefers_triton(monkeypatch):
    fake_gpu(monkeypatch, 'NVIDIA A100', (8, 0))
    assert kernels.select('rms_norm').backend == 'triton'


def test_gpu_without_triton_falls_back_with_a_reason(monkeypatch, twinkle_logs):
    fake_gpu(monkeypatch, 'NVIDIA A100', (8, 0))
    real = registry.has_package
    monkeypatch.setattr(registry, 'has_package', lambda name: name != 'triton' and real(name))
    choice = kernels.select('rms_norm')
    assert choice.backend == 'liger'
    assert 'triton unavailable: needs triton: pip install "twinkle[triton]"' in choice.reason
    assert any(r.levelname == 'WARNING' and 'rms_norm' in r.getMessage() for r in twinkle_logs.records)


def test_npu_prefers_its_fused_ops(monkeypatch):
    fake_npu(monkeypatch)
    assert backends.current().type == 'npu'
    assert kernels.select('rms_norm').backend == 'npu'


def test_ppu_uses_portable_paths(monkeypatch):
    fake_gpu(monkeypatch, 'PPU-ZW810E', (8, 0))
    assert kernels.select('rms_norm', 'cuda') == ('reference', 'first in ppu priority')


def test_cpu_tensor_on_a_gpu_host_uses_a_cpu_backend(monkeypatch):
    fake_gpu(monkeypatch, 'NVIDIA A100', (8, 0))
    assert kernels.select('rms_norm', torch.device('cpu')).backend in ('cpu', 'reference')
