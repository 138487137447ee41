"""SwiGLU: every backend against the reference (forward and backward), its dispatch, its input
checks, and the MLP module against Hugging Face's Qwen3MLP.

Tolerances: fp32 1e-5 (same math, different evaluation order); fp16 under the Triton interpreter
1e-3 (both sides compute in fp32 and round once, so at most ~1 ulp apart); bf16 reference vs
HF eager 2e-2 (eager rounds after silu and after the product, ~2 bf16 ulps); compiled Triton in
bf16 2e-2 as well. Tensors are made on the test device (tests/conftest.py).
"""
import importlib.machinery
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import DEVICE, FAKE_NPU, TRITON_LOW_PRECISION, require_cpu
from twinkle import kernels
from twinkle.backends.cuda import CudaBackend
from twinkle.kernels import registry

TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 2e-2}


def make_inputs(shape, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    gate = torch.randn(shape, generator=gen) * 3  # wide enough to reach both tails of the sigmoid
    up = torch.randn(shape, generator=gen)
    dout = torch.randn(shape, generator=gen)
    return gate.to(DEVICE, dtype), up.to(DEVICE, dtype), dout.to(DEVICE, dtype)


def run(fn, gate, up, dout):
    """Output and (d gate, d up) of ``fn`` on fresh leaves, so runs never share state."""
    gate = gate.detach().clone().requires_grad_()
    up = up.detach().clone().requires_grad_()
    out = fn(gate, up)
    out.backward(dout)
    return out.detach(), gate.grad, up.grad


def eager(gate, up):
    """What HF's MLP computes: act_fn(gate) * up in the input dtype."""
    return F.silu(gate) * up


def backend_fn(name):
    return lambda gate, up: kernels.swiglu(gate, up, backend=name)


def assert_all_close(actual, expected, dtype):
    tol = TOLERANCE[dtype]
    for a, e in zip(actual, expected):
        assert a.dtype == e.dtype and a.shape == e.shape
        torch.testing.assert_close(a, e, atol=tol, rtol=tol)


# -- reference -------------------------------------------------------------------------------

def test_reference_matches_eager_fp32():
    inputs = make_inputs((3, 7, 97))
    assert_all_close(run(backend_fn('reference'), *inputs), run(eager, *inputs), torch.float32)


def test_reference_bf16_matches_eager_bf16_and_is_closer_to_fp32():
    gate, up, dout = make_inputs((3, 7, 97), torch.bfloat16)
    ours = run(backend_fn('reference'), gate, up, dout)
    assert_all_close(ours, run(eager, gate, up, dout), torch.bfloat16)
    exact = run(eager, gate.float(), up.float(), dout.float())
    stock = run(eager, gate, up, dout)
    # rounding once (ours) must not be worse than rounding after every op (stock)
    assert (ours[0].float() - exact[0]).abs().sum() <= (stock[0].float() - exact[0]).abs().sum()


# -- triton (interpreter on CPU, compiled on a GPU) ------------------------------------------

@pytest.mark.parametrize('dtype', [torch.float32, *TRITON_LOW_PRECISION])
@pytest.mark.parametrize('shape', [(3, 7, 97), (5,), (2, 1025)])
def test_triton_matches_reference(shape, dtype):
    inputs = make_inputs(shape, dtype)
    assert_all_close(run(backend_fn('triton'), *inputs), run(backend_fn('reference'), *inputs), dtype)


def test_triton_non_contiguous_inputs():
    gate, up, dout = make_inputs((4, 2 * 33))
    gate, up = gate[:, ::2], up.t().contiguous().t()[:, :33]
    assert not gate.is_contiguous() and not up.is_contiguous()
    assert_all_close(run(backend_fn('triton'), gate, up, dout[:, :33]),
                     run(backend_fn('reference'), gate, up, dout[:, :33]), torch.float32)


@pytest.mark.parametrize('backend', ['reference', 'triton'])
@pytest.mark.parametrize('shape', [(0, 5), (2, 0)])
def test_empty_inputs(backend, shape):
    out, dgate, dup = run(backend_fn(backend), *make_inputs(shape))
    assert out.shape == dgate.shape == dup.shape == shape


# -- liger: its kernels do not run in the interpreter (a float scalar argument), so its
# in-place contract is emulated to test what the adapter hands it and returns ---------------

def fake_liger_forward(a, b):
    return a, b, F.silu(a) * b


def fake_liger_backward(a, b, dc):
    """Like Liger: the gradients overwrite the saved a and b."""
    sig = torch.sigmoid(a)
    da, db = dc * b * sig * (1 + a * (1 - sig)), dc * a * sig
    a.copy_(da)
    b.copy_(db)
    return a, b


@pytest.fixture
def emulated_liger(monkeypatch):
    liger_backend = pytest.importorskip('twinkle.kernels.swiglu.liger', reason='pip install "twinkle[liger]"')
    monkeypatch.setattr(liger_backend, 'swiglu_forward', fake_liger_forward)
    monkeypatch.setattr(liger_backend, 'swiglu_backward', fake_liger_backward)
    return liger_backend


def test_liger_adapter_matches_reference_and_leaves_inputs_intact(emulated_liger):
    gate, up, dout = make_inputs((3, 7, 97))
    gate.requires_grad_()
    up.requires_grad_()
    out = emulated_liger.swiglu(gate, up)  # the adapter itself: the registry refuses liger off GPU
    first = torch.autograd.grad(out, (gate, up), dout, retain_graph=True)
    second = torch.autograd.grad(out, (gate, up), dout)  # would read gradients as activations
    expected = run(backend_fn('reference'), gate, up, dout)
    assert_all_close((out, *first), expected, torch.float32)
    assert_all_close(second, expected[1:], torch.float32)
    torch.testing.assert_close(gate.detach(), make_inputs((3, 7, 97))[0], atol=0, rtol=0)


def test_liger_is_refused_off_gpu_even_under_the_interpreter(fresh_registry):
    """Its kernel dies inside Triton's interpreter, so the registry must not offer it (as for RMSNorm)."""
    gate, up = (t.cpu() for t in make_inputs((2, 8))[:2])
    with pytest.raises(Exception, match='liger.*runs on cuda/npu, not cpu'):
        kernels.swiglu(gate, up, backend='liger')


# -- npu: a fake torch_npu with the documented npu_swiglu contract ----------------------------

@pytest.fixture
def fake_torch_npu(monkeypatch, fresh_registry):
    require_cpu(FAKE_NPU)
    module = types.ModuleType('torch_npu')
    module.__spec__ = importlib.machinery.ModuleSpec('torch_npu', None)  # seen by find_spec
    module.calls = []

    def npu_swiglu(x, dim=-1):
        """Documented: split x in half along dim; silu(first half) * second half."""
        module.calls.append((tuple(x.shape), dim))
        first, second = x.chunk(2, dim=dim)
        return F.silu(first) * second

    module.npu_swiglu = npu_swiglu
    monkeypatch.setitem(sys.modules, 'torch_npu', module)
    return module


def test_npu_is_chosen_on_npu_and_passes_gate_first(fake_torch_npu):
    assert kernels.select('swiglu', 'npu').backend == 'npu'
    npu_swiglu = registry.resolve('swiglu', 'npu', 'npu')
    inputs = make_inputs((3, 7, 97))
    assert_all_close(run(npu_swiglu, *inputs), run(backend_fn('reference'), *inputs), torch.float32)
    assert fake_torch_npu.calls == [((3, 7, 2 * 97), -1)]


def test_npu_empty_input_skips_the_kernel(fake_torch_npu):
    out, dgate, _ = run(registry.resolve('swiglu', 'npu', 'npu'), *make_inputs((0, 4)))
    assert out.shape == dgate.shape == (0, 4) and fake_torch_npu.calls == []


# -- selection ---------------------------------------------------------------------------------

def test_selection_per_device(fresh_registry, monkeypatch):
    assert kernels.select('swiglu', 'cpu').backend in ('cpu', 'reference')  # native when it builds
    assert kernels.select('swiglu', 'cuda').backend == 'triton'  # the interpreter counts as a GPU
    monkeypatch.delenv('TRITON_INTERPRET', raising=False)  # set on CPU, not on a GPU
    monkeypatch.setattr(CudaBackend, 'has_triton', property(lambda self: False))  # e.g. a pre-sm70 GPU
    registry._chosen().clear()
    choice = kernels.select('swiglu', 'cuda')  # both Triton-based backends drop out
    assert choice.backend == 'reference'
    assert 'triton unavailable' in choice.reason and 'liger unavailable' in choice.reason


# -- input checks ------------------------------------------------------------------------------

@pytest.mark.parametrize('gate, up, name', [
    ([1.0], torch.ones(1), 'gate'),
    (torch.ones(3, dtype=torch.int32), torch.ones(3), 'gate'),
    (torch.tensor(1.0), torch.tensor(1.0), 'gate'),
    (torch.ones(3), 'up', 'up'),
    (torch.ones(3), torch.ones(3, dtype=torch.int64), 'up'),
    (torch.ones(3, 4), torch.ones(4, 3), 'up'),
    (torch.ones(3), torch.ones(3, dtype=torch.float64), 'up'),
    (torch.ones(3), torch.ones(3, device='meta'), 'up'),
])
def test_bad_inputs_name_the_argument(gate, up, name):
    with pytest.raises(ValueError, match=rf'^{name}\b'):
        kernels.swiglu(gate, up)


# -- the MLP module ----------------------------------------------------------------------------

def tiny_qwen3_mlp(hidden_act='silu', seed=0):
    from transformers import Qwen3Config
    from transformers.models.qwen3.modeling_qwen3 import Qwen3MLP
    torch.manual_seed(seed)
    return Qwen3MLP(Qwen3Config(hidden_size=32, intermediate_size=80, hidden_act=hidden_act)).to(DEVICE)


@pytest.mark.parametrize('backend', ['reference', 'triton'])
def test_class_swapped_qwen3_mlp_matches_stock(backend, fresh_registry):
    from transformers.models.qwen3.modeling_qwen3 import Qwen3MLP
    kernels.configure(swiglu=backend)
    stock, swapped = tiny_qwen3_mlp(), tiny_qwen3_mlp()
    kernels.kernelize(swapped, {Qwen3MLP: kernels.TwinkleSwiGLUMLP})
    assert isinstance(swapped, kernels.TwinkleSwiGLUMLP) and isinstance(swapped, Qwen3MLP)
    x = torch.randn(2, 3, 32, device=DEVICE)
    results = []
    for mlp in (stock, swapped):
        leaf = x.clone().requires_grad_()
        out = mlp(leaf)
        out.backward(torch.ones_like(out))
        results.append([out.detach(), leaf.grad] + [p.grad for p in mlp.parameters()])
    for ours, theirs in zip(results[1], results[0]):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_mlp_refuses_a_non_silu_activation(fresh_registry):
    from transformers.models.qwen3.modeling_qwen3 import Qwen3MLP
    mlp = tiny_qwen3_mlp(hidden_act='gelu')
    kernels.kernelize(mlp, {Qwen3MLP: kernels.TwinkleSwiGLUMLP})
    with pytest.raises(ValueError, match='act_fn'):
        mlp(torch.randn(1, 32, device=DEVICE))


def test_fresh_mlp_has_hf_state_dict_names():
    stock = tiny_qwen3_mlp(hidden_act='swish')  # HF maps swish to nn.SiLU
    ours = kernels.TwinkleSwiGLUMLP(32, 80).to(DEVICE)
    assert ours.state_dict().keys() == stock.state_dict().keys()
    ours.load_state_dict(stock.state_dict())
    x = torch.randn(4, 32, device=DEVICE)
    torch.testing.assert_close(ours(x), stock(x), atol=1e-5, rtol=1e-5)
