"""Device detection for every family, with fake torch.cuda / torch_npu where the hardware is absent."""
import importlib.machinery
import sys
import types

import pytest
import torch

from twinkle import backends


@pytest.fixture(autouse=True)
def fresh_detection(monkeypatch):
    monkeypatch.delenv('TWINKLE_DEVICE', raising=False)
    backends.reset()
    yield
    backends.reset()


def fake_module(monkeypatch, name, **attrs):
    """A module that importlib can find (it has a spec) and import (it is in sys.modules)."""
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    for key, value in attrs.items():
        setattr(module, key, value)
    monkeypatch.setitem(sys.modules, name, module)
    return module


def fake_gpu(monkeypatch, name, capability, count=8):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: count)
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda index=0: name)
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda index=0: capability)


def test_cpu_only_host_reports_cpu():
    device = backends.current()
    assert device.type == 'cpu'
    assert device.dist_backend == 'gloo'
    assert device.compute_capability is None
    assert device.default_dtype() == torch.float32
    assert device.local_device() == torch.device('cpu')
    assert not device.has_triton and not device.has_flash_attn


def test_a100_like_gpu(monkeypatch):
    fake_gpu(monkeypatch, 'NVIDIA A100-SXM4-80GB', (8, 0))
    fake_module(monkeypatch, 'flash_attn')
    device = backends.detect()
    assert device.type == 'cuda'
    assert device.compute_capability == (8, 0)
    assert device.supports_bf16 and device.supports_fp16
    assert device.default_dtype() == torch.bfloat16
    assert device.has_flash_attn
    assert device.dist_backend == 'nccl'


@pytest.mark.parametrize('name,capability', [('Tesla T4', (7, 5)), ('Tesla V100-SXM2-32GB', (7, 0))])
def test_old_gpus_have_no_bf16_and_no_flash_attn(monkeypatch, name, capability):
    fake_gpu(monkeypatch, name, capability)
    fake_module(monkeypatch, 'flash_attn')  # installed, but unusable below sm80
    device = backends.detect()
    assert device.type == 'cuda'
    assert not device.supports_bf16
    assert device.default_dtype() == torch.float16
    assert not device.has_flash_attn


def test_a100_without_flash_attn_installed(monkeypatch):
    fake_gpu(monkeypatch, 'NVIDIA A100', (8, 0))
    monkeypatch.setattr(backends.cuda, 'has_package', lambda name: False)
    assert not backends.detect().has_flash_attn


def test_ppu_is_told_apart_from_cuda_by_name(monkeypatch):
    fake_gpu(monkeypatch, 'PPU-ZW810E', (8, 0))
    device = backends.detect()
    assert device.type == 'ppu'
    assert device.torch_device_type == 'cuda'
    assert device.supports_bf16 and device.default_dtype() == torch.bfloat16
    assert not device.has_triton and not device.has_flash_attn
    assert device.dist_backend == 'nccl'


def fake_npu(monkeypatch, bf16=True):
    npu = types.SimpleNamespace(is_available=lambda: True, device_count=lambda: 8,
                                get_device_name=lambda index=0: 'Ascend910B2',
                                is_bf16_supported=lambda: bf16)
    return fake_module(monkeypatch, 'torch_npu', npu=npu)


def test_npu_detected_before_cuda(monkeypatch):
    fake_npu(monkeypatch)
    fake_gpu(monkeypatch, 'NVIDIA A100', (8, 0))
    device = backends.detect()
    assert device.type == 'npu'
    assert device.dist_backend == 'hccl'
    assert device.device_name == 'Ascend910B2'
    assert device.default_dtype() == torch.bfloat16
    assert device.compute_capability is None


def test_npu_without_bf16_defaults_to_fp16(monkeypatch):
    fake_npu(monkeypatch, bf16=False)
    assert backends.detect().default_dtype() == torch.float16


def test_broken_torch_npu_does_not_stop_detection(monkeypatch):
    def broken():
        raise RuntimeError('CANN not found')
    fake_module(monkeypatch, 'torch_npu', npu=types.SimpleNamespace(is_available=broken))
    assert backends.detect().type == 'cpu'


def test_missing_torch_npu_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, 'torch_npu', None)  # import raises ImportError
    with pytest.raises(ImportError, match=r'twinkle\[npu\]'):
        backends.npu.torch_npu()


def test_twinkle_device_overrides_detection(monkeypatch):
    fake_gpu(monkeypatch, 'NVIDIA A100', (8, 0))
    monkeypatch.setenv('TWINKLE_DEVICE', 'cpu')
    assert backends.current().type == 'cpu'


def test_twinkle_device_rejects_unknown_family(monkeypatch):
    monkeypatch.setenv('TWINKLE_DEVICE', 'tpu')
    with pytest.raises(ValueError, match='cuda'):
        backends.detect()


def test_get_maps_cuda_tensors_to_the_ppu(monkeypatch):
    fake_gpu(monkeypatch, 'PPU-ZW810E', (8, 0))
    assert backends.get('cuda').type == 'ppu'
    assert backends.get('cpu').type == 'cpu'
    with pytest.raises(ValueError, match='unknown device type'):
        backends.get('quantum')


def test_describe_lists_every_capability():
    facts = backends.current().describe()
    for key in ('type', 'supports_bf16', 'supports_fp16', 'has_flash_attn', 'has_triton',
                'dist_backend', 'compute_capability', 'default_dtype'):
        assert key in facts
