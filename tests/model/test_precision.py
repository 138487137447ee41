"""Load-time choices from the device layer: dtype, loss scaling, attention."""
import pytest
import torch

from tests.backends.test_detection import fake_gpu, fake_module
from tests.model.conftest import token_batch
from twinkle import backends
from twinkle.model import TransformersModel
from twinkle.model.precision import choose_attention, choose_precision


@pytest.fixture
def fresh_device(monkeypatch):
    monkeypatch.delenv('TWINKLE_DEVICE', raising=False)
    backends.reset()
    yield
    backends.reset()


def test_t4_like_gpu_gets_fp16_with_a_scaler_and_sdpa(monkeypatch, fresh_device):
    fake_gpu(monkeypatch, 'Tesla T4', (7, 5))
    fake_module(monkeypatch, 'flash_attn')
    device = backends.current()
    precision = choose_precision(device)
    assert (precision.name, precision.param_dtype, precision.autocast_dtype) == ('fp16', torch.float32, torch.float16)
    assert precision.use_grad_scaler
    assert choose_attention(device, precision)[0] == 'sdpa'
    with pytest.raises(ValueError, match='no bf16'):
        choose_precision(device, 'bf16')
    with pytest.raises(ValueError, match='flash-attn'):
        choose_attention(device, precision, 'flash_attention_2')


def test_a100_like_gpu_gets_bf16_and_flash_attention(monkeypatch, fresh_device):
    fake_gpu(monkeypatch, 'NVIDIA A100-SXM4-80GB', (8, 0))
    fake_module(monkeypatch, 'flash_attn')
    device = backends.current()
    precision = choose_precision(device)
    assert (precision.name, precision.param_dtype, precision.use_grad_scaler) == ('bf16', torch.bfloat16, False)
    assert choose_attention(device, precision)[0] == 'flash_attention_2'
    fp32 = choose_precision(device, 'fp32')
    assert choose_attention(device, fp32)[0] == 'sdpa'  # flash-attn needs half precision


def test_cpu_defaults_to_fp32():
    precision = choose_precision(backends.current())
    assert precision.name == 'fp32' and precision.autocast_dtype is None


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match='bf16'):
        choose_precision(backends.current(), 'fp8')


@pytest.mark.parametrize('mixed_precision,weight_dtype', [('fp16', torch.float32), ('bf16', torch.bfloat16)])
def test_low_precision_training_runs_on_cpu(tiny_config, mixed_precision, weight_dtype):
    torch.manual_seed(0)
    model = TransformersModel(config=tiny_config, mixed_precision=mixed_precision)
    assert next(model.model.parameters()).dtype == weight_dtype
    assert (model._state(None).scaler is not None) == (mixed_precision == 'fp16')
    model.set_optimizer('AdamW', lr=1e-2)
    losses = []
    for _ in range(4):
        losses.append(model.forward_backward(inputs=token_batch())['loss'])
        model.clip_grad_and_step()
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
