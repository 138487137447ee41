"""RoPE (apply_rotary_pos_emb): the reference against Hugging Face's eager code, every backend
against the reference (forward and backward), layouts, partial rotary, dispatch and input checks.

Tolerances: fp32 1e-5; fp16 under the Triton interpreter 1e-3 (fp32 math rounded once on both
sides); bf16 reference vs HF eager 3e-2 (eager rounds after each of its four ops), compiled Triton
and Liger in bf16 3e-2 as well. Tensors are made on the test device (tests/conftest.py).
"""
import importlib.machinery
import sys
import types

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as hf_apply_rotary_pos_emb

from tests.conftest import DEVICE, FAKE_NPU, TRITON_LOW_PRECISION, require_cpu
from twinkle import kernels
from twinkle.backends import has_package
from twinkle.kernels import registry

TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 3e-2}
BATCH, SEQ, HEADS, KV_HEADS = 2, 5, 3, 1
needs_liger = pytest.mark.skipif(not has_package('liger_kernel'), reason='pip install "twinkle[liger]"')


def make_inputs(head_dim=16, rotary_dim=None, unsqueeze_dim=1, dtype=torch.float32, cos_batch=1,
                cos_seq=SEQ, duplicated=False, seed=0):
    """q/k laid out as HF's attention makes them (a transposed view of the projection when
    unsqueeze_dim=1), cos/sin random unless ``duplicated`` (HF's cat(freqs, freqs) form)."""
    gen = torch.Generator().manual_seed(seed)
    rotary_dim = head_dim if rotary_dim is None else rotary_dim

    def states(heads):
        x = torch.randn(BATCH, SEQ, heads, head_dim, generator=gen).to(DEVICE, dtype)
        return x.transpose(1, 2) if unsqueeze_dim == 1 else x

    q, k, dq, dk = states(HEADS), states(KV_HEADS), states(HEADS), states(KV_HEADS)
    if duplicated:
        angles = torch.rand(cos_batch, cos_seq, rotary_dim // 2, generator=gen) * 6.3
        angles = torch.cat((angles, angles), dim=-1)
        cos, sin = angles.cos(), angles.sin()
    else:
        cos = torch.rand(cos_batch, cos_seq, rotary_dim, generator=gen) * 2 - 1
        sin = torch.rand(cos_batch, cos_seq, rotary_dim, generator=gen) * 2 - 1
    return (q, k, cos.to(DEVICE, dtype), sin.to(DEVICE, dtype)), (dq, dk)


def run(fn, inputs, grads, unsqueeze_dim=1, differentiate=(0, 1)):
    """Outputs and the grads of the inputs at ``differentiate``, on fresh leaves."""
    leaves = [x.detach().clone().requires_grad_(i in differentiate) for i, x in enumerate(inputs)]
    outputs = fn(*leaves, unsqueeze_dim=unsqueeze_dim)
    wanted = [leaves[i] for i in differentiate]
    return [o.detach() for o in outputs] + list(torch.autograd.grad(outputs, wanted, grads))


def backend_fn(name):
    return lambda q, k, cos, sin, unsqueeze_dim: kernels.apply_rotary_pos_emb(
        q, k, cos, sin, unsqueeze_dim=unsqueeze_dim, backend=name)


def hf_partial(q, k, cos, sin, unsqueeze_dim):
    """Phi/StableLM's partial rotary: HF's function on the first dims, the rest concatenated."""
    rotary_dim = cos.shape[-1]
    q_embed, k_embed = hf_apply_rotary_pos_emb(q[..., :rotary_dim], k[..., :rotary_dim], cos, sin, unsqueeze_dim)
    return torch.cat((q_embed, q[..., rotary_dim:]), -1), torch.cat((k_embed, k[..., rotary_dim:]), -1)


def assert_all_close(actual, expected, dtype):
    tol = TOLERANCE[dtype]
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert a.dtype == e.dtype and a.shape == e.shape
        torch.testing.assert_close(a, e, atol=tol, rtol=tol)


# -- reference against Hugging Face ------------------------------------------------------------

@pytest.mark.parametrize('unsqueeze_dim', [1, 2])
def test_reference_matches_hf_including_cos_sin_grads(unsqueeze_dim):
    inputs, grads = make_inputs(unsqueeze_dim=unsqueeze_dim, cos_batch=BATCH)
    every = (0, 1, 2, 3)
    assert_all_close(run(backend_fn('reference'), inputs, grads, unsqueeze_dim, every),
                     run(hf_apply_rotary_pos_emb, inputs, grads, unsqueeze_dim, every), torch.float32)


@pytest.mark.parametrize('unsqueeze_dim', [1, 2])
def test_reference_partial_rotary_matches_phi_style(unsqueeze_dim):
    inputs, grads = make_inputs(head_dim=24, rotary_dim=16, unsqueeze_dim=unsqueeze_dim)
    every = (0, 1, 2, 3)
    assert_all_close(run(backend_fn('reference'), inputs, grads, unsqueeze_dim, every),
                     run(hf_partial, inputs, grads, unsqueeze_dim, every), torch.float32)


def test_reference_bf16_matches_hf_eager_bf16():
    inputs, grads = make_inputs(dtype=torch.bfloat16, duplicated=True)
    assert_all_close(run(backend_fn('reference'), inputs, grads),
                     run(hf_apply_rotary_pos_emb, inputs, grads), torch.bfloat16)


# -- triton (interpreter) and liger against the reference ------------------------------------

CASES = {  # name -> make_inputs arguments
    'full': dict(head_dim=16),
    'partial': dict(head_dim=24, rotary_dim=16),
    'odd_pass': dict(head_dim=22, rotary_dim=4, cos_batch=BATCH),
    'cos_seq_1': dict(head_dim=8, cos_seq=1, cos_batch=BATCH),
}


@pytest.mark.parametrize('dtype', [torch.float32, *TRITON_LOW_PRECISION])
@pytest.mark.parametrize('unsqueeze_dim', [1, 2])
@pytest.mark.parametrize('case', list(CASES))
def test_triton_matches_reference(case, unsqueeze_dim, dtype):
    inputs, grads = make_inputs(unsqueeze_dim=unsqueeze_dim, dtype=dtype, **CASES[case])
    assert_all_close(run(backend_fn('triton'), inputs, grads, unsqueeze_dim),
                     run(backend_fn('reference'), inputs, grads, unsqueeze_dim), dtype)


def test_triton_contiguous_heads_first_and_zero_stride_grads():
    (q, k, cos, sin), _ = make_inputs()
    q, k = q.contiguous(), k.contiguous()  # (B, H, T, D) storage, not HF's view
    one, zero = torch.ones((), device=DEVICE), torch.zeros((), device=DEVICE)
    grads = (one.expand(q.shape), zero.expand(k.shape))  # what .sum() sends back
    assert_all_close(run(backend_fn('triton'), (q, k, cos, sin), grads),
                     run(backend_fn('reference'), (q, k, cos, sin), grads), torch.float32)


def test_triton_gives_no_cos_sin_grads():
    """Documented: only the reference differentiates cos/sin (HF builds them under no_grad)."""
    (q, k, cos, sin), _ = make_inputs()
    q.requires_grad_()
    cos.requires_grad_()
    q_embed, _ = kernels.apply_rotary_pos_emb(q, k, cos, sin, backend='triton')
    q_embed.sum().backward()
    assert q.grad is not None and cos.grad is None


@needs_liger
@pytest.mark.parametrize('dtype', [torch.float32, *TRITON_LOW_PRECISION])
@pytest.mark.parametrize('unsqueeze_dim', [1, 2])
@pytest.mark.parametrize('case', ['full', 'partial', 'cos_seq_1'])
def test_liger_matches_reference(case, unsqueeze_dim, dtype):
    inputs, grads = make_inputs(unsqueeze_dim=unsqueeze_dim, dtype=dtype, duplicated=True, **CASES[case])
    assert_all_close(run(backend_fn('liger'), inputs, grads, unsqueeze_dim),
                     run(backend_fn('reference'), inputs, grads, unsqueeze_dim), dtype)


@needs_liger
def test_liger_leaves_inputs_and_gradients_intact():
    """Liger rotates in place; in HF's layout that would be the caller's q and the caller's grads."""
    (q, k, cos, sin), (dq, dk) = make_inputs(duplicated=True)
    saved = [x.clone() for x in (q, k, dq, dk)]
    q.requires_grad_()
    k.requires_grad_()
    outputs = kernels.apply_rotary_pos_emb(q, k, cos, sin, backend='liger')
    torch.autograd.grad(outputs, (q, k), (dq, dk))
    for before, after in zip(saved, (q, k, dq, dk)):
        torch.testing.assert_close(after.detach(), before, atol=0, rtol=0)


EMPTY = {  # name -> (q shape, k shape, cos shape) with unsqueeze_dim=1
    'batch': ((0, 2, 3, 8), (0, 1, 3, 8), (1, 3, 8)),
    'seq': ((2, 2, 0, 8), (2, 1, 0, 8), (1, 0, 8)),
    'kv_heads': ((2, 2, 3, 8), (2, 0, 3, 8), (2, 3, 8)),
    'rotary_dim': ((2, 2, 3, 6), (2, 1, 3, 6), (1, 3, 0)),
}


@pytest.mark.parametrize('backend', ['reference', 'triton', pytest.param('liger', marks=needs_liger)])
@pytest.mark.parametrize('case', list(EMPTY))
def test_empty_inputs(backend, case):
    q_shape, k_shape, cos_shape = EMPTY[case]
    inputs = tuple(torch.randn(shape, device=DEVICE) for shape in (q_shape, k_shape, cos_shape, cos_shape))
    grads = (torch.randn(q_shape, device=DEVICE), torch.randn(k_shape, device=DEVICE))
    results = run(backend_fn(backend), inputs, grads)
    assert [r.shape for r in results] == [q_shape, k_shape, q_shape, k_shape]
    assert_all_close(results, run(backend_fn('reference'), inputs, grads), torch.float32)
    if case == 'rotary_dim':  # nothing rotates: identity forward and backward
        torch.testing.assert_close(results[0], inputs[0], atol=0, rtol=0)
        torch.testing.assert_close(results[2], grads[0], atol=0, rtol=0)


# -- npu: a fake torch_npu with the documented npu_rotary_mul contract --------------------------

@pytest.fixture
def fake_torch_npu(monkeypatch, fresh_registry):
    require_cpu(FAKE_NPU)
    module = types.ModuleType('torch_npu')
    module.__spec__ = importlib.machinery.ModuleSpec('torch_npu', None)  # seen by find_spec
    module.calls = []

    def npu_rotary_mul(x, r1, r2, rotary_mode='half'):
        """Documented 'half' mode: x * r1 + cat(-x2, x1) * r2, over the whole last dim."""
        module.calls.append((tuple(x.shape), tuple(r1.shape), r1.dtype))
        x1, x2 = x.chunk(2, dim=-1)
        return x * r1 + torch.cat((-x2, x1), dim=-1) * r2

    module.npu_rotary_mul = npu_rotary_mul
    monkeypatch.setitem(sys.modules, 'torch_npu', module)
    return module


@pytest.mark.parametrize('unsqueeze_dim', [1, 2])
def test_npu_is_chosen_on_npu_and_maps_partial_rotary(fake_torch_npu, unsqueeze_dim):
    assert kernels.select('rope', 'npu').backend == 'npu'
    npu_rope = registry.resolve('rope', 'npu', 'npu')
    inputs, grads = make_inputs(head_dim=24, rotary_dim=16, unsqueeze_dim=unsqueeze_dim)
    every = (0, 1, 2, 3)
    npu_fn = lambda *args, unsqueeze_dim: npu_rope(*args, unsqueeze_dim)  # noqa: E731
    assert_all_close(run(npu_fn, inputs, grads, unsqueeze_dim, every),
                     run(backend_fn('reference'), inputs, grads, unsqueeze_dim, every), torch.float32)
    cos_shape = (1, 1, SEQ, 16) if unsqueeze_dim == 1 else (1, SEQ, 1, 16)  # HF's B1SD / BS1D
    q_shape = tuple(inputs[0].shape[:3]) + (16,)
    assert fake_torch_npu.calls[0] == (q_shape, cos_shape, torch.float32)
    assert len(fake_torch_npu.calls) == 2  # q and k


def test_npu_casts_cos_to_the_input_dtype_and_skips_empty(fake_torch_npu):
    npu_rope = registry.resolve('rope', 'npu', 'npu')
    (q, k, cos, sin), _ = make_inputs(dtype=torch.float16)
    npu_rope(q, k, cos.float(), sin.float(), 1)
    assert {dtype for _, _, dtype in fake_torch_npu.calls} == {torch.float16}
    fake_torch_npu.calls.clear()
    npu_rope(q[:0], k[:0], cos, sin, 1)
    assert fake_torch_npu.calls == []


def test_selection_per_device(fresh_registry):
    assert kernels.select('rope', 'cpu').backend in ('cpu', 'reference')  # native when it builds
    assert kernels.select('rope', 'cuda').backend == 'triton'  # the interpreter counts as a GPU


# -- input checks ------------------------------------------------------------------------------

def bad_case(name, **changes):
    """Valid (q, k, cos, sin, unsqueeze_dim) with ``changes`` applied, and the name to expect."""
    args = dict(q=torch.ones(2, 3, 5, 8), k=torch.ones(2, 1, 5, 8), cos=torch.ones(1, 5, 8),
                sin=torch.ones(1, 5, 8), unsqueeze_dim=1)
    args.update(changes)
    return pytest.param(args, name, id=f'{name}-{"-".join(changes)}')


@pytest.mark.parametrize('args, name', [
    bad_case('q', q=[1.0]),
    bad_case('q', q=torch.ones(3, 5, 8)),
    bad_case('q', q=torch.ones(2, 3, 5, 8, dtype=torch.int32)),
    bad_case('k', k=torch.ones(2, 5, 8)),
    bad_case('k', k=torch.ones(3, 1, 5, 8)),
    bad_case('k', k=torch.ones(2, 1, 4, 8)),
    bad_case('k', k=torch.ones(2, 1, 5, 6)),
    bad_case('k', k=torch.ones(2, 1, 5, 8, device='meta')),
    bad_case('cos', cos=torch.ones(1, 1, 5, 8)),
    bad_case('cos', cos=torch.ones(1, 5, 7), sin=torch.ones(1, 5, 7)),
    bad_case('cos', cos=torch.ones(1, 5, 10), sin=torch.ones(1, 5, 10)),
    bad_case('cos', cos=torch.ones(3, 5, 8), sin=torch.ones(3, 5, 8)),
    bad_case('cos', cos=torch.ones(1, 4, 8), sin=torch.ones(1, 4, 8)),
    bad_case('cos', cos=torch.ones(1, 5, 8, dtype=torch.int64)),
    bad_case('sin', sin=torch.ones(1, 5, 6)),
    bad_case('sin', sin=torch.ones(1, 5, 8, device='meta')),
    bad_case('unsqueeze_dim', unsqueeze_dim=0),
    bad_case('unsqueeze_dim', unsqueeze_dim=3),
    bad_case('k', unsqueeze_dim=2),  # q read as (B, T, H, D): k's "sequence" (1) differs from q's (3)
])
def test_bad_inputs_name_the_argument(args, name):
    unsqueeze_dim = args.pop('unsqueeze_dim')
    with pytest.raises(ValueError, match=rf'^{name}\b'):
        kernels.apply_rotary_pos_emb(**args, unsqueeze_dim=unsqueeze_dim)
