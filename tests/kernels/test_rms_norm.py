"""RMSNorm: every backend against the reference, forward and backward, and the module wrapper.

Tolerances: fp32 1e-5 relative (reductions reorder); low precision is compared with the
reference computed from the same low-precision inputs, within one or two output ulps.
Tensors are made on the test device (tests/conftest.py: cpu, or cuda under make gpu-check)."""
import pytest
import torch

from tests.conftest import DEVICE, TRITON_LOW_PRECISION
from twinkle import kernels
from twinkle.kernels import registry

# Backends that run on CPU (Triton through the interpreter) or on the test device; the others
# (npu, and liger off GPU) get adapter tests below. On a GPU the C++ CPU backend is skipped.
FAST_BACKENDS = [b for b in registry.backends_of('rms_norm') if b != 'reference'
                 and None in (registry.unavailable_reason('rms_norm', b, device) for device in ('cpu', DEVICE.type))]
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3),
             torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}


def skip_unavailable(backend):
    reason = registry.unavailable_reason('rms_norm', backend, DEVICE.type)
    if reason:
        pytest.skip(f'{backend}: {reason}')


def eager_rms_norm(x, weight, eps, offset):
    """Written out independently of the reference: the reference must match it too."""
    x64 = x.double()
    return (x64 / torch.sqrt(x64.square().mean(-1, keepdim=True) + eps) * (weight.double() + offset))


def run(backend, x, weight, grad_out, offset, eps=1e-6):
    x = x.detach().clone().requires_grad_(True)
    weight = weight.detach().clone().requires_grad_(True)
    y = kernels.rms_norm(x, weight, eps, offset=offset, backend=backend)
    y.backward(grad_out)
    return y, x.grad, weight.grad


def inputs(shape, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator).to(DEVICE, dtype)
    weight = (torch.rand(shape[-1], generator=generator) + 0.5).to(DEVICE, dtype)
    grad_out = torch.randn(shape, generator=generator).to(DEVICE, dtype)
    return x, weight, grad_out


@pytest.mark.parametrize('offset', [0.0, 1.0])
def test_reference_matches_independent_formula_and_autograd(offset):
    x, weight, grad_out = inputs((5, 7, 33), torch.float32)
    y, dx, dw = run('reference', x, weight, grad_out, offset)
    x64, w64 = x.double().requires_grad_(True), weight.double().requires_grad_(True)
    expected = eager_rms_norm(x64, w64, 1e-6, offset)
    expected.backward(grad_out.double())
    torch.testing.assert_close(y.double(), expected.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dx.double(), x64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dw.double(), w64.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('backend', FAST_BACKENDS)
@pytest.mark.parametrize('offset', [0.0, 1.0])
@pytest.mark.parametrize('shape', [(9, 41, 341), (3, 64), (1, 1, 5)])
def test_fp32_matches_reference(backend, offset, shape):
    skip_unavailable(backend)
    x, weight, grad_out = inputs(shape, torch.float32)
    expected = run('reference', x, weight, grad_out, offset)
    for got, want in zip(run(backend, x, weight, grad_out, offset), expected):
        torch.testing.assert_close(got, want, **TOLERANCE[torch.float32])


def low_precision_cases():
    for backend in FAST_BACKENDS:
        # Triton in fp16 under the interpreter (its bf16 arithmetic is broken), fp16 and bf16 compiled;
        # the others in bf16.
        yield from ((backend, dtype) for dtype in (TRITON_LOW_PRECISION if backend == 'triton' else (torch.bfloat16,)))


@pytest.mark.parametrize('backend,dtype', list(low_precision_cases()))
@pytest.mark.parametrize('offset', [0.0, 1.0])
def test_low_precision_matches_reference(backend, dtype, offset):
    skip_unavailable(backend)
    x, weight, grad_out = inputs((9, 41, 341), dtype)
    expected = run('reference', x, weight, grad_out, offset)
    for got, want in zip(run(backend, x, weight, grad_out, offset), expected):
        assert got.dtype == dtype
        torch.testing.assert_close(got, want, **TOLERANCE[dtype])


def test_reference_bf16_close_to_fp32_truth():
    x, weight, grad_out = inputs((9, 41, 341), torch.bfloat16)
    got = run('reference', x, weight, grad_out, 0.0)[0]
    truth = eager_rms_norm(x, weight, 1e-6, 0.0).to(torch.bfloat16)
    torch.testing.assert_close(got, truth, **TOLERANCE[torch.bfloat16])


@pytest.mark.parametrize('backend', ['reference'] + FAST_BACKENDS)
def test_empty_input(backend):
    skip_unavailable(backend)
    x, weight, grad_out = inputs((0, 16), torch.float32)
    y, dx, dw = run(backend, x, weight, grad_out, 0.0)
    assert y.shape == (0, 16) and dx.shape == (0, 16)
    torch.testing.assert_close(dw, torch.zeros(16, device=DEVICE))


@pytest.mark.parametrize('backend', ['reference'] + FAST_BACKENDS)
def test_non_contiguous_input(backend):
    skip_unavailable(backend)
    x, weight, grad_out = inputs((6, 40), torch.float32)
    strided = x.t().contiguous().t()[:, :40]  # column-major storage
    expected = kernels.rms_norm(x, weight, backend='reference')
    torch.testing.assert_close(kernels.rms_norm(strided, weight, backend=backend), expected,
                               **TOLERANCE[torch.float32])


@pytest.mark.parametrize('args,kwargs,argument', [
    ((torch.randn(2, 8), torch.ones(7)), {}, 'weight'),
    ((torch.randn(2, 8), torch.ones(2, 8)), {}, 'weight'),
    ((torch.randint(0, 5, (2, 8)), torch.ones(8)), {}, 'x'),
    (([1.0, 2.0], torch.ones(2)), {}, 'x'),
    ((torch.randn(2, 8), torch.ones(8, dtype=torch.int64)), {}, 'weight'),
    ((torch.randn(2, 8, device='meta'), torch.ones(8)), {}, 'weight'),
    ((torch.randn(2, 8), torch.ones(8)), {'eps': -1.0}, 'eps'),
])
def test_bad_input_names_the_argument(args, kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        kernels.rms_norm(*args, **kwargs)


def test_module_keeps_hf_attribute_names_and_state_dict():
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm
    ours, theirs = kernels.TwinkleRMSNorm(32, eps=1e-5).to(DEVICE), Qwen3RMSNorm(32, eps=1e-5).to(DEVICE)
    assert ours.variance_epsilon == theirs.variance_epsilon == 1e-5
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    x = torch.randn(4, 32, device=DEVICE)
    torch.testing.assert_close(ours(x), theirs(x), **TOLERANCE[torch.float32])


def test_offset_module_starts_as_identity_scale():
    module = kernels.TwinkleRMSNorm(16, offset=1.0).to(DEVICE)
    x = torch.randn(3, 16, device=DEVICE)
    torch.testing.assert_close(module(x), kernels.rms_norm(x, torch.ones(16, device=DEVICE)))
    assert 'offset=1.0' in repr(module)


def test_liger_adapter_maps_arguments(monkeypatch):
    """Liger's RMSNorm does not run in the Triton interpreter: check what we hand it."""
    from twinkle.kernels.rms_norm import liger
    calls = []

    class FakeLigerFunction:
        @staticmethod
        def apply(*args):
            calls.append(args)
            return args[0]

    monkeypatch.setattr(liger, 'LigerRMSNormFunction', FakeLigerFunction)
    x, weight = torch.randn(2, 8), torch.ones(8)
    liger.rms_norm(x, weight, 1e-5, 1.0)
    assert calls[0][2:] == (1e-5, 1.0, 'gemma', False)  # eps, offset, fp32 casting, not in place


def test_npu_adapter_maps_arguments(monkeypatch):
    import importlib.machinery
    import sys
    import types
    calls = []

    def npu_rms_norm(x, gamma, epsilon):
        calls.append((gamma, epsilon))
        return x * gamma, torch.ones(x.shape[:-1])

    fake = types.ModuleType('torch_npu')
    fake.__spec__ = importlib.machinery.ModuleSpec('torch_npu', None)
    fake.npu_rms_norm = npu_rms_norm
    monkeypatch.setitem(sys.modules, 'torch_npu', fake)
    from twinkle.kernels.rms_norm import npu
    weight = torch.full((8,), 0.5)
    npu.rms_norm(torch.randn(2, 8), weight, 1e-5, 1.0)
    torch.testing.assert_close(calls[0][0], weight + 1.0)
    assert calls[0][1] == 1e-5
