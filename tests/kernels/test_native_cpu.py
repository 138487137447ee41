"""The native CPU kernels (csrc/, backend 'cpu' of rms_norm, swiglu and rope): forward and backward
against each op's reference, their torch-op registration (torch.compile fullgraph; opcheck of each op
is in test_registered_ops.py), and the loader (failed build -> fallback with one log line, missing
compiler, stale build lock).

Tolerances: fp32/fp64 1e-5 (same math, different summation order; fp64 because the reference
computes in fp32); bf16 and fp16 one ulp of the dtype (both sides compute in fp32 and round once).
The first run builds the extension (about a minute); later runs load it from the cache.
"""
import fcntl
import threading

import pytest
import torch

from tests.conftest import cpu_only
from twinkle import kernels
from twinkle.kernels import native, registry
from twinkle.kernels.rms_norm import reference as rms_norm_reference
from twinkle.kernels.rope import reference as rope_reference
from twinkle.kernels.swiglu import reference as swiglu_reference

TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.float64: (1e-5, 1e-5),
             torch.bfloat16: (1e-2, 2 ** -7), torch.float16: (1e-3, 2 ** -10)}  # (atol, rtol)
DTYPES = list(TOLERANCE)
pytestmark = cpu_only('the C++ CPU kernels (csrc/) and their build; the GPU suite runs the other backends')


@pytest.fixture(scope='module', autouse=True)
def native_ops():
    error = native.cpu_check()
    assert error is None, f'the native CPU kernels must build on this machine: {error}'
    return torch.ops.twinkle_cpu


def run(fn, inputs, grad_outputs):
    """Outputs of ``fn`` on fresh leaf copies of ``inputs`` and the gradients of those leaves."""
    leaves = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    outputs = fn(*leaves)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    grads = torch.autograd.grad(outputs, [x for x in leaves if x.requires_grad], grad_outputs, allow_unused=True)
    return [o.detach() for o in outputs], list(grads)


def assert_matches(actual, expected, dtype):
    atol, rtol = TOLERANCE[dtype]
    for a, e in zip(actual, expected):
        assert (a is None) == (e is None)
        if a is not None:
            assert a.dtype == e.dtype and a.shape == e.shape
            torch.testing.assert_close(a, e, atol=atol, rtol=rtol)


def compare(op, reference, inputs, dtype, grad_inputs=None):
    """Backend 'cpu' of ``op`` against ``reference``: outputs and gradients of every tensor input."""
    with torch.no_grad():
        outputs = reference(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    gen = torch.Generator().manual_seed(1)
    grad_outputs = [torch.randn(o.shape, generator=gen).to(o.dtype) for o in outputs]
    native_outputs, native_grads = run(op, inputs, grad_outputs)
    reference_outputs, reference_grads = run(reference, inputs, grad_outputs)
    assert_matches(native_outputs, reference_outputs, dtype)
    assert_matches(native_grads[:grad_inputs], reference_grads[:grad_inputs], dtype)


def randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# -- RMSNorm -------------------------------------------------------------------------------------

def rms_norm_cpu(x, weight, eps=1e-6, offset=0.0):
    return kernels.rms_norm(x, weight, eps, offset=offset, backend='cpu')


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('shape, offset', [((9, 41, 341), 0.0), ((5, 64), 1.0), ((1, 1), 0.0)])
def test_rms_norm_matches_reference(shape, offset, dtype):
    x, weight = randn(*shape, dtype=dtype), randn(shape[-1], dtype=dtype, seed=1)
    compare(lambda x, w: rms_norm_cpu(x, w, 1e-5, offset),
            lambda x, w: rms_norm_reference.rms_norm(x, w, 1e-5, offset), (x, weight), dtype)


def test_rms_norm_non_contiguous_and_fp32_weight_with_bf16_input():
    x = randn(341, 369, dtype=torch.bfloat16).t()  # rows strided, hidden size 341 (not a vector multiple)
    weight = randn(682, seed=1)[::2]  # fp32, strided
    assert not x.is_contiguous() and not weight.is_contiguous()
    compare(rms_norm_cpu, lambda x, w: rms_norm_reference.rms_norm(x, w, 1e-6, 0.0), (x, weight), torch.bfloat16)


@pytest.mark.parametrize('shape', [(0, 16), (4, 0)])
def test_rms_norm_empty(shape):
    x, weight = torch.zeros(shape, requires_grad=True), torch.ones(shape[-1], requires_grad=True)
    y = rms_norm_cpu(x, weight)
    y.sum().backward()
    assert y.shape == shape and x.grad.shape == shape
    assert torch.equal(weight.grad, torch.zeros(shape[-1]))


# -- SwiGLU --------------------------------------------------------------------------------------

def swiglu_cpu(gate, up):
    return kernels.swiglu(gate, up, backend='cpu')


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('shape', [(9, 41, 341), (3,)])
def test_swiglu_matches_reference(shape, dtype):
    gate, up = randn(*shape, dtype=dtype) * 4, randn(*shape, dtype=dtype, seed=1)  # * 4: both sigmoid tails
    compare(swiglu_cpu, swiglu_reference.swiglu, (gate, up), dtype)


def test_swiglu_non_contiguous_and_gradient_of_a_sum():
    """y.sum() hands backward one value expanded to y's shape: the kernel reads it as a scalar."""
    gate, up = randn(41, 33).t(), randn(33, 41, seed=1)
    native, reference = [run(lambda g, u: fn(g, u).sum(), (gate, up), torch.tensor(2.0))
                         for fn in (swiglu_cpu, swiglu_reference.swiglu)]
    assert_matches(native[1], reference[1], torch.float32)


def test_swiglu_empty():
    gate, up = torch.zeros(0, 8, requires_grad=True), torch.zeros(0, 8, requires_grad=True)
    swiglu_cpu(gate, up).sum().backward()
    assert gate.grad.shape == up.grad.shape == (0, 8)


# -- RoPE ----------------------------------------------------------------------------------------

def rope_cpu(q, k, cos, sin, unsqueeze_dim=1):
    return kernels.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim, backend='cpu')


def rope_inputs(batch, heads, kv_heads, seq, head_dim, rotary_dim, dtype, unsqueeze_dim, cos_batch=None):
    """q, k in the layout of ``unsqueeze_dim``, made as HF does: (B, T, H, D) then transposed for 1.
    The two halves of cos/sin get different angles (HF repeats them) so that a backward mixing
    up the halves cannot pass."""
    q, k = randn(batch, seq, heads, head_dim, dtype=dtype), randn(batch, seq, kv_heads, head_dim, dtype=dtype, seed=1)
    if unsqueeze_dim == 1:
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    angles = randn(cos_batch or batch, seq, rotary_dim, seed=2) * 3
    return q, k, angles.cos().to(dtype), angles.sin().to(dtype)


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('unsqueeze_dim', [1, 2])
@pytest.mark.parametrize('head_dim, rotary_dim', [(64, 64), (40, 24)])  # full; partial with half < a vector
def test_rope_matches_reference(head_dim, rotary_dim, unsqueeze_dim, dtype):
    inputs = rope_inputs(2, 4, 2, 7, head_dim, rotary_dim, dtype, unsqueeze_dim)
    compare(lambda *t: rope_cpu(*t, unsqueeze_dim), lambda *t: rope_reference.rope(*t, unsqueeze_dim), inputs,
            dtype, grad_inputs=2)


def test_rope_rows_split_across_threads_with_broadcast_cos():
    """Enough rows for two tasks, so the second starts mid-tensor (RowWalker.seek); cos batch 1."""
    inputs = rope_inputs(2, 4, 1, 600, 16, 16, torch.float32, 1, cos_batch=1)
    compare(rope_cpu, lambda *t: rope_reference.rope(*t, 1), inputs, torch.float32, grad_inputs=2)


def test_rope_gives_no_cos_sin_grads():
    q, k, cos, sin = rope_inputs(1, 2, 1, 3, 8, 8, torch.float32, 1)
    cos.requires_grad_()
    q_out, _ = rope_cpu(q, k, cos, sin)
    assert torch.autograd.grad(q_out.sum(), cos, allow_unused=True) == (None,)


def test_rope_empty():
    q, k, cos, sin = rope_inputs(2, 4, 2, 0, 16, 16, torch.float32, 1)
    q.requires_grad_()
    q_out, k_out = rope_cpu(q, k, cos, sin)
    q_out.sum().backward()
    assert q_out.shape == q.shape and k_out.shape == k.shape and q.grad.shape == q.shape


# -- torch ops: registration and torch.compile --------------------------------------------------

def test_ops_fail_loudly_on_shapes_that_would_read_out_of_bounds(native_ops):
    with pytest.raises(RuntimeError, match='weight'):
        native_ops.rms_norm_forward(torch.ones(2, 8), torch.ones(7), 1e-6, 0.0)
    with pytest.raises(RuntimeError, match='shape'):
        native_ops.swiglu_forward(torch.ones(2, 8), torch.ones(2, 7))
    with pytest.raises(RuntimeError, match='rotary'):
        native_ops.rope_rotate(torch.ones(2, 8), torch.ones(2, 10), torch.ones(2, 10), False)


@pytest.mark.parametrize('op, inputs', [
    (rms_norm_cpu, lambda: (randn(3, 5, 37), randn(37, seed=1))),
    (swiglu_cpu, lambda: (randn(4, 37), randn(4, 37, seed=1))),
    (rope_cpu, lambda: rope_inputs(2, 3, 1, 5, 20, 12, torch.float32, 1)),
], ids=['rms_norm', 'swiglu', 'rope'])
def test_torch_compile_fullgraph(op, inputs):
    """One graph (no breaks) through AOTAutograd, same outputs and gradients as eager."""
    inputs = inputs()
    outputs = op(*inputs)  # eagerly first: the registry makes its choice outside any graph
    grad_outputs = [randn(*o.shape, seed=3) for o in (outputs if isinstance(outputs, tuple) else (outputs,))]
    compiled = torch.compile(op, fullgraph=True, backend='aot_eager')
    eager, traced = run(op, inputs, grad_outputs), run(compiled, inputs, grad_outputs)
    assert_matches(traced[0] + traced[1], eager[0] + eager[1], torch.float32)


# -- loader ----------------------------------------------------------------------------------------

@pytest.fixture
def unloaded(monkeypatch, tmp_path):
    """The loader as in a fresh process, building into an empty cache."""
    monkeypatch.setattr(native, '_state', {})
    monkeypatch.setenv('TWINKLE_CACHE', str(tmp_path))
    return tmp_path


def test_failed_build_falls_back_to_reference_with_one_log_line(unloaded, monkeypatch, fresh_registry,
                                                                 twinkle_logs):
    from torch.utils import cpp_extension

    def failing_load(**kwargs):  # what cpp_extension raises: ninja's output, compiler errors inside
        raise RuntimeError("Error building extension 'twinkle_cpu_kernels': [1/4] c++ -c rope.cpp -o rope.o\n"
                           "FAILED: rope.o\nrope.cpp:3:1: error: simulated compiler error\n")

    monkeypatch.setattr(cpp_extension, 'load', failing_load)
    choice = kernels.select('rms_norm', 'cpu')
    assert choice.backend == 'reference'
    assert 'cpu unavailable: native CPU kernels failed to build' in choice.reason
    assert '(rope.cpp:3:1: error: simulated compiler error)' in choice.reason  # the error, not the command
    warnings = [r for r in twinkle_logs.records if r.levelname == 'WARNING' and 'rms_norm' in r.getMessage()]
    assert len(warnings) == 1 and 'failed to build' in warnings[0].getMessage()
    assert 'simulated compiler error' in (native.build_directory() / native.ERROR_LOG).read_text()
    x, weight = randn(2, 8), randn(8, seed=1)
    torch.testing.assert_close(kernels.rms_norm(x, weight), rms_norm_reference.rms_norm(x, weight, 1e-6, 0.0))
    with pytest.raises(registry.KernelUnavailableError, match='failed to build'):
        kernels.rms_norm(x, weight, backend='cpu')


def test_missing_compiler_is_the_reason(unloaded, monkeypatch):
    monkeypatch.setenv('CXX', '/nonexistent/c++')
    assert "no C++ compiler '/nonexistent/c++'" in native.cpu_check()


def test_build_directory_changes_with_the_sources(unloaded, monkeypatch, tmp_path_factory):
    before = native.build_directory()
    assert before.parent == unloaded / 'extensions' and before.name.startswith(torch.__version__)
    sources = tmp_path_factory.mktemp('csrc')
    for path in native.SOURCE_DIR.iterdir():
        (sources / path.name).write_bytes(path.read_bytes())
    (sources / 'rope.cpp').write_text((sources / 'rope.cpp').read_text() + '\n// edited\n')
    monkeypatch.setattr(native, 'SOURCE_DIR', sources)
    assert native.build_directory() != before


def test_a_stale_build_lock_does_not_hang_the_next_build():
    """A builder killed mid-build leaves cpp_extension's 'lock' baton behind; the flock held
    around the build proves it stale, so the next load removes it instead of waiting forever."""
    directory = native.build_directory()
    baton = directory / 'lock'
    with open(directory / 'build.flock') as handle:  # plant it while no live process builds here
        fcntl.flock(handle, fcntl.LOCK_EX)
        baton.touch()
    result = {}
    loader = threading.Thread(target=lambda: result.update(error=native._build_and_load()), daemon=True)
    loader.start()
    loader.join(timeout=120)
    assert not loader.is_alive(), 'the load waited on a stale lock'
    assert result['error'] is None and not baton.exists()
