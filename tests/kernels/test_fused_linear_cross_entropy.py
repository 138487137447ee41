"""fused_linear_cross_entropy: every backend against the reference (loss and the gradients of
hidden, weight and bias), input checks, dispatch, and the cpu path's memory bound.

Tolerances: fp32 atol=rtol=1e-5 (measured differences are ~1e-7). Low precision: the backends
multiply in the input dtype, so their logits are rounded once to it while the reference
upcasts first; bf16 (cpu, compiled Triton) atol=rtol=3e-2, fp16 (Triton) atol=rtol=5e-3.
Tensors are made on the test device (tests/conftest.py); on a GPU the cpu backend's tests skip.
"""
import importlib.machinery
import subprocess
import sys
import textwrap
import types

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import DEVICE, TRITON_LOW_PRECISION, cpu_only
from twinkle import backends
from twinkle.kernels import fused_linear_cross_entropy, registry

OP = 'fused_linear_cross_entropy'
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def make_case(shape=(13,), hidden_size=33, vocab=97, dtype=torch.float32, bias=True, ignored=0.3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, hidden_size, generator=generator)
    weight = torch.randn(vocab, hidden_size, generator=generator) * 0.3
    bias_ = torch.randn(vocab, generator=generator) if bias else None
    labels = torch.randint(0, vocab, shape, generator=generator)
    labels[torch.rand(shape, generator=generator) < ignored] = -100
    return (hidden.to(DEVICE, dtype), weight.to(DEVICE, dtype), None if bias_ is None else bias_.to(DEVICE, dtype),
            labels.to(DEVICE))


def loss_and_grads(backend, case, **options):
    """Loss and grads through a non-trivial upstream gradient (per token for 'none'); skips a backend
    that does not run on the test device (the cpu one on a GPU)."""
    reason = registry.unavailable_reason(OP, backend, DEVICE.type)
    if reason:
        pytest.skip(f'{backend}: {reason}')
    hidden, weight, bias, labels = (None if t is None else t.clone().requires_grad_(t.is_floating_point())
                                    for t in case)
    loss = fused_linear_cross_entropy(hidden, weight, labels, bias=bias, backend=backend, **options)
    upstream = (torch.linspace(0.5, 2.0, loss.numel(), device=loss.device).view(loss.shape) if loss.dim()
                else torch.tensor(1.7, device=loss.device))
    (loss * upstream).sum().backward()
    return [loss.detach(), hidden.grad, weight.grad, None if bias is None else bias.grad]


def assert_matches_reference(backend, case, **options):
    expected = loss_and_grads('reference', case, **options)
    actual = loss_and_grads(backend, case, **options)
    tolerance = TOLERANCE[case[0].dtype]
    assert actual[0].dtype == torch.float32
    for name, got, want in zip(('loss', 'hidden.grad', 'weight.grad', 'bias.grad'), actual, expected):
        if want is None:
            assert got is None, name
            continue
        assert got.dtype == want.dtype and got.shape == want.shape, name
        torch.testing.assert_close(got.float(), want.float(), atol=tolerance, rtol=tolerance, msg=name)


CASES = {
    'mean': dict(),
    'sum': dict(reduction='sum'),
    'none': dict(reduction='none'),
    'smoothing': dict(label_smoothing=0.1),
    'softcap': dict(logit_softcap=5.0),
    'softcap-smoothing-none': dict(logit_softcap=2.0, label_smoothing=0.2, reduction='none'),
}


def test_reference_is_torch_cross_entropy():
    hidden, weight, bias, labels = make_case()
    logits = hidden @ weight.t() + bias
    expected = F.cross_entropy(logits, labels, label_smoothing=0.1)
    actual = fused_linear_cross_entropy(hidden, weight, labels, bias=bias, label_smoothing=0.1, backend='reference')
    torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize('chunk_size', [None, 4])  # the default covers N in one chunk; 4 does not divide 13
@pytest.mark.parametrize('case', list(CASES))
def test_cpu_matches_reference(case, chunk_size):
    assert_matches_reference('cpu', make_case(), chunk_size=chunk_size, **CASES[case])


@pytest.mark.parametrize('case', ['mean', 'none', 'softcap-smoothing-none'])
def test_cpu_bf16_matches_reference(case):
    assert_matches_reference('cpu', make_case(dtype=torch.bfloat16), chunk_size=5, **CASES[case])


@pytest.mark.parametrize('backend', ['cpu', 'triton', 'liger'])
def test_without_bias(backend):
    assert_matches_reference(backend, make_case(shape=(6,), bias=False), reduction='sum')


def test_cpu_without_bias_and_frozen_weight():
    hidden, weight, _, labels = make_case(bias=False)
    hidden.requires_grad_()
    loss = fused_linear_cross_entropy(hidden, weight, labels, chunk_size=4)
    loss.backward()
    expected = hidden.detach().clone().requires_grad_()
    fused_linear_cross_entropy(expected, weight, labels, backend='reference').backward()
    torch.testing.assert_close(hidden.grad, expected.grad, atol=1e-5, rtol=1e-5)


def test_cpu_batched_shape_and_no_grad():
    case = make_case(shape=(2, 5))
    assert_matches_reference('cpu', case, reduction='none', chunk_size=3)
    hidden, weight, bias, labels = case
    with torch.no_grad():
        loss = fused_linear_cross_entropy(hidden, weight.requires_grad_(), labels, bias=bias, reduction='none')
    assert loss.shape == (2, 5) and not loss.requires_grad
    assert bool((loss[labels == -100] == 0).all())


def test_cpu_qwen_vocabulary():
    """V=151936 against fp64 (the fp32 reference's own smoothing gradient is off by ~2e-5 here)."""
    case = make_case(shape=(5,), hidden_size=16, vocab=151936, ignored=0.0)
    actual = loss_and_grads('cpu', case, label_smoothing=0.1)
    hidden, weight, bias = (t.double().requires_grad_() for t in case[:3])
    loss = F.cross_entropy(hidden @ weight.t() + bias, case[3], label_smoothing=0.1)
    (loss * 1.7).backward()
    for got, want in zip(actual, (loss.detach(), hidden.grad, weight.grad, bias.grad)):
        torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-5)


@cpu_only('the cpu backend keeps its gradients for one backward; other backends do not refuse')
def test_cpu_backward_twice_is_refused():
    hidden, weight, bias, labels = make_case()
    loss = fused_linear_cross_entropy(hidden.requires_grad_(), weight, labels, bias=bias)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match='cannot run twice'):
        loss.backward()


@pytest.mark.parametrize('case', ['mean', 'none', 'smoothing', 'softcap-smoothing-none'])
def test_triton_matches_reference(case):
    assert_matches_reference('triton', make_case(shape=(7,)), chunk_size=3, **CASES[case])


def test_triton_fp16_and_online_softmax_over_blocks(monkeypatch):
    from twinkle.kernels.fused_linear_cross_entropy import triton as triton_backend
    monkeypatch.setattr(triton_backend, 'MAX_BLOCK', 32)  # V=97 -> four blocks per row
    for dtype in TRITON_LOW_PRECISION:  # fp16 alone under the interpreter
        assert_matches_reference('triton', make_case(shape=(7,), dtype=dtype), chunk_size=4,
                                 logit_softcap=3.0, label_smoothing=0.1)
    assert_matches_reference('triton', make_case(shape=(6,)), reduction='sum')


# No softcap: liger's kernel calls softcap.to(), which the interpreter cannot do on a Python float.
@pytest.mark.parametrize('case', ['mean', 'sum', 'none', 'smoothing'])
def test_liger_matches_reference(case):
    assert_matches_reference('liger', make_case(shape=(7,)), **CASES[case])


def test_liger_refuses_what_it_cannot_do(monkeypatch):
    from twinkle.kernels.fused_linear_cross_entropy import liger
    hidden, weight, bias, labels = make_case()
    with pytest.raises(ValueError, match='chunk_size'):
        fused_linear_cross_entropy(hidden, weight, labels, chunk_size=4, backend='liger')
    monkeypatch.setattr(liger, '_defers_unreduced_gradients', lambda forward: False)  # an older liger
    with pytest.raises(ValueError, match='reduction'):
        fused_linear_cross_entropy(hidden.requires_grad_(), weight, labels, reduction='none', backend='liger')


@pytest.mark.parametrize('backend', ['reference', 'cpu', 'triton', 'liger'])
@pytest.mark.parametrize('reduction', ['mean', 'sum', 'none'])
def test_all_ignored_and_empty_give_zero(backend, reduction):
    for shape, ignored in (((4,), 1.0), ((0,), 0.0)):
        hidden, weight, bias, labels = make_case(shape=shape, ignored=ignored)
        loss, d_hidden, d_weight, d_bias = loss_and_grads(backend, (hidden, weight, bias, labels),
                                                          reduction=reduction)
        assert loss.shape == (labels.shape if reduction == 'none' else ())
        assert bool((loss == 0).all()), (shape, loss)
        for grad in (d_hidden, d_weight, d_bias):
            assert grad is not None and bool((grad == 0).all())


def _case_kwargs(**changes):
    hidden, weight, bias, labels = (t.cpu() for t in make_case())  # the checks are the same on every device
    kwargs = dict(hidden=hidden, weight=weight, labels=labels, bias=bias)
    kwargs.update(changes)
    return kwargs


BAD_INPUTS = {
    'hidden': [dict(hidden=torch.ones(13, 33, dtype=torch.long)), dict(hidden=[[1.0]])],
    'weight': [dict(weight=torch.randn(97)), dict(weight=torch.randn(97, 32)),
               dict(weight=torch.randn(97, 33, dtype=torch.float64))],
    'labels': [dict(labels=torch.zeros(13)), dict(labels=torch.zeros(13, dtype=torch.bool)),
               dict(labels=torch.zeros(12, dtype=torch.long)), dict(labels=torch.full((13,), 97)),
               dict(labels=torch.full((13,), -1))],
    'bias': [dict(bias=torch.randn(96)), dict(bias=torch.randn(1, 97)), dict(bias=torch.ones(97, dtype=torch.long))],
    'ignore_index': [dict(ignore_index=1.5), dict(ignore_index=None)],
    'reduction': [dict(reduction='avg')],
    'label_smoothing': [dict(label_smoothing=-0.1), dict(label_smoothing=1.5), dict(label_smoothing=float('nan')),
                        dict(label_smoothing='0.1')],
    'logit_softcap': [dict(logit_softcap=0.0), dict(logit_softcap=-3.0), dict(logit_softcap=float('inf')),
                      dict(logit_softcap='30')],
    'chunk_size': [dict(chunk_size=0), dict(chunk_size=2.5), dict(chunk_size=True)],
}


@pytest.mark.parametrize('argument,changes', [(name, change) for name, changes in BAD_INPUTS.items()
                                              for change in changes])
def test_bad_input_names_the_argument_before_any_backend(argument, changes, monkeypatch):
    def no_backend(*args, **kwargs):
        raise AssertionError('a backend was resolved before the inputs were checked')
    monkeypatch.setattr(registry, 'resolve', no_backend)
    monkeypatch.setenv('TWINKLE_CHECK_VALUES', '1')  # labels in range is a value check (a host sync)
    kwargs = _case_kwargs(**changes)
    with pytest.raises(ValueError, match=argument):
        fused_linear_cross_entropy(kwargs.pop('hidden'), kwargs.pop('weight'), kwargs.pop('labels'), **kwargs)


def test_ignore_index_inside_the_vocabulary_is_ignored():
    hidden, weight, bias, labels = make_case(ignored=0.0)
    labels[:4] = 0
    assert_matches_reference('cpu', (hidden, weight, bias, labels), ignore_index=0, chunk_size=4)


def test_priorities(fresh_registry):
    op = registry._op(OP)
    assert op.order('cuda') == ['triton', 'liger', 'reference']
    assert op.order('npu') == ['npu', 'reference']
    assert op.order('cpu') == ['cpu', 'reference']
    assert registry.select(OP, 'cpu').backend == 'cpu'


@pytest.fixture
def fake_torch_npu(monkeypatch, fresh_registry):
    """A stand-in torch_npu: enough for detection and for the npu backend to import."""
    fake = types.ModuleType('torch_npu')
    fake.__spec__ = importlib.machinery.ModuleSpec('torch_npu', None)
    fake.npu = types.SimpleNamespace(is_available=lambda: True, device_count=lambda: 1)
    monkeypatch.setitem(sys.modules, 'torch_npu', fake)
    monkeypatch.delitem(sys.modules, 'twinkle.kernels.fused_linear_cross_entropy.npu', raising=False)
    fresh_registry._op(OP).functions.pop('npu', None)
    yield fake
    fresh_registry._op(OP).functions.pop('npu', None)
    backends.reset()


def test_npu_dispatch_and_argument_mapping(fake_torch_npu, monkeypatch):
    assert registry.select(OP, 'npu').backend == 'npu'
    monkeypatch.setenv('TWINKLE_DEVICE', 'npu')
    backends.reset()
    assert registry.select(OP).backend == 'npu'
    npu_op = registry.resolve(OP, None, 'npu')
    assert npu_op.__module__ == 'twinkle.kernels.fused_linear_cross_entropy.chunked'
    # the NPU path is the shared host loop: run it on CPU tensors with the positional args the public function passes
    hidden, weight, bias, labels = (t.cpu() for t in make_case())
    expected = fused_linear_cross_entropy(hidden, weight, labels, bias=bias, ignore_index=-100, reduction='sum',
                                          label_smoothing=0.1, logit_softcap=4.0, backend='reference')
    actual = npu_op(hidden, weight, labels, bias, -100, 'sum', 0.1, 4.0, 5)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


MEMORY_SCRIPT = textwrap.dedent('''
    import torch
    from twinkle.kernels import fused_linear_cross_entropy
    def status(key):
        return next(int(line.split()[1]) * 1024 for line in open('/proc/self/status') if line.startswith(key))
    def peak_above_outputs(backend, n, hidden_size, vocab):
        hidden = torch.randn(n, hidden_size, requires_grad=True)
        weight = torch.randn(vocab, hidden_size, requires_grad=True)
        labels = torch.randint(0, vocab, (n,))
        open('/proc/self/clear_refs', 'w').write('5')  # VmHWM := VmRSS
        base = status('VmRSS')
        fused_linear_cross_entropy(hidden, weight, labels, backend=backend).backward()
        return status('VmHWM') - base - (hidden.numel() + weight.numel()) * 4
    for backend in ('cpu', 'reference'):  # warm-up: BLAS kernels and code pages are not the op's memory
        peak_above_outputs(backend, 64, 64, 1000)
    # cpu first: memory the reference frees may stay mapped and would hide the cpu path's allocations
    print(*(peak_above_outputs(backend, 1024, 64, 32768) for backend in ('cpu', 'reference')))
    from twinkle.kernels.fused_linear_cross_entropy import cpu
    print(cpu.max_rows())
''')


@cpu_only("the cpu backend's resident memory (VmHWM) in a CPU process")
def test_cpu_peak_memory_far_below_reference():
    """N=1024, V=32768: the reference holds several 128 MiB N x V tensors, the cpu path one chunk
    of ``max_rows()`` x V fp32 logits (256 rows per thread). Peaks are above the floor of the
    outputs dH and dW, in a fresh process; 8 MiB of slack for the row-sized temporaries."""
    result = subprocess.run([sys.executable, '-c', MEMORY_SCRIPT], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    chunked, reference, rows = map(int, result.stdout.split())
    assert reference > 256 << 20, reference
    buffer = min(rows, 1024) * 32768 * 4
    assert chunked < buffer + (8 << 20), (chunked, buffer)
    assert chunked < 0.5 * reference, (chunked, reference)
