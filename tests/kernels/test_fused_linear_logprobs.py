"""fused_linear_logprobs: every backend against the reference (log-probs, entropy, and the
gradients of hidden and weight through either, with random upstream gradients), the reference
against plain ``log_softmax`` gathered, input checks, dispatch, the registered ops (opcheck,
fullgraph compile) and the chunked backend's peak memory at Qwen's vocabulary.

Tolerances: fp32 rtol=1e-5 and atol=1e-5 x the largest magnitude of the expected tensor
(measured differences ~1e-7 relative). Low precision: the backends multiply in the input dtype, so
their logits are rounded once to it while the fp32 reference upcasts the same inputs first; bf16
(chunked, compiled Triton) rtol=atol=3e-2 x scale, fp16 (Triton) 5e-3 x scale. Tensors are made on
the test device (tests/conftest.py); Triton runs under the interpreter on CPU.
"""
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.library import opcheck

from tests.backends.test_detection import fake_gpu
from tests.conftest import DEVICE, TRITON_LOW_PRECISION, cpu_only
from twinkle import backends
from twinkle.kernels import fused_linear_logprobs, registry

OP = 'fused_linear_logprobs'
BACKENDS = ['chunked', 'triton']
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}
NAMES = ('logprobs', 'entropy', 'hidden.grad', 'weight.grad')


def make_case(shape=(13,), hidden_size=33, vocab=97, dtype=torch.float32, ignored=0.3, seed=0):
    """Odd sizes: H=33, V=97 (no power of two, not a multiple of any block)."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, hidden_size, generator=generator)
    weight = torch.randn(vocab, hidden_size, generator=generator) * 0.3
    labels = torch.randint(0, vocab, shape, generator=generator)
    labels[torch.rand(shape, generator=generator) < ignored] = -100
    return hidden.to(DEVICE, dtype), weight.to(DEVICE, dtype), labels.to(DEVICE)


def skip_unavailable(backend):
    reason = registry.unavailable_reason(OP, backend, DEVICE.type)
    if reason:
        pytest.skip(f'{backend}: {reason}')


def outputs_and_grads(backend, case, through=('logprobs', 'entropy'), **options):
    """(logprobs, entropy, hidden.grad, weight.grad): backward of random per-token upstream
    gradients on the outputs named in ``through``."""
    skip_unavailable(backend)
    hidden, weight, labels = (t.clone().requires_grad_(t.is_floating_point()) for t in case)
    logprobs, entropy = fused_linear_logprobs(hidden, weight, labels, return_entropy=True, backend=backend,
                                              **options)
    generator = torch.Generator().manual_seed(1)
    upstream = [torch.randn(labels.shape, generator=generator).to(DEVICE) for _ in range(2)]
    loss = sum((output * grad).sum() for name, output, grad in zip(('logprobs', 'entropy'), (logprobs, entropy),
                                                                     upstream) if name in through)
    loss.backward()
    return [logprobs.detach(), entropy.detach(), hidden.grad, weight.grad]


def assert_close_to_scale(got, want, tolerance, name):
    scale = float(want.abs().max()) if want.numel() else 1.0
    torch.testing.assert_close(got.float(), want.float(), rtol=tolerance, atol=tolerance * scale, msg=name)


def assert_matches_reference(backend, case, **options):
    """The backend on ``case`` against the fp32 reference on the same values upcast."""
    expected = outputs_and_grads('reference', tuple(t.float() if t.is_floating_point() else t for t in case),
                                 **options)
    actual = outputs_and_grads(backend, case, **options)
    dtype = case[0].dtype
    for name, got, want in zip(NAMES, actual, expected):
        assert got.shape == want.shape, name
        assert got.dtype == (torch.float32 if name in ('logprobs', 'entropy') else dtype), name
        assert_close_to_scale(got, want, TOLERANCE[dtype], name)


def test_reference_is_log_softmax_gathered():
    """The oracle itself against the textbook formulas, fwd and bwd (temperature, batched shape)."""
    hidden, weight, labels = make_case(shape=(3, 5))
    actual = outputs_and_grads('reference', (hidden, weight, labels), temperature=0.7)
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    log_probs = torch.log_softmax(hidden @ weight.t() / 0.7, dim=-1)
    valid = labels != -100
    logprobs = log_probs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * valid
    entropy = torch.distributions.Categorical(logits=log_probs).entropy() * valid
    generator = torch.Generator().manual_seed(1)
    upstream = [torch.randn(labels.shape, generator=generator).to(DEVICE) for _ in range(2)]
    ((logprobs * upstream[0]).sum() + (entropy * upstream[1]).sum()).backward()
    for name, got, want in zip(NAMES, actual, (logprobs.detach(), entropy.detach(), hidden.grad, weight.grad)):
        assert_close_to_scale(got, want, 1e-5, name)


CASES = {
    'plain': dict(),
    'temperature': dict(temperature=0.6),
    'hot': dict(temperature=2.5),
}
THROUGH = {'both': ('logprobs', 'entropy'), 'logprobs': ('logprobs',), 'entropy': ('entropy',)}


@pytest.mark.parametrize('through', list(THROUGH))
@pytest.mark.parametrize('case', list(CASES))
@pytest.mark.parametrize('chunk_size', [None, 4])  # None: one chunk; 4 does not divide 13
@pytest.mark.parametrize('backend', BACKENDS)
def test_backend_matches_reference(backend, chunk_size, case, through):
    assert_matches_reference(backend, make_case(shape=(13,) if backend == 'chunked' else (7,)), chunk_size=chunk_size,
                             through=THROUGH[through], **CASES[case])


def test_chunked_bf16_matches_fp32_reference():
    assert_matches_reference('chunked', make_case(dtype=torch.bfloat16), chunk_size=5, temperature=0.8)


def test_triton_low_precision_and_online_softmax_over_blocks(monkeypatch):
    from twinkle.kernels.fused_linear_logprobs import triton as triton_backend
    monkeypatch.setattr(triton_backend, 'MAX_BLOCK', 32)  # V=97 -> four blocks per row, the last one partial
    for dtype in (torch.float32, *TRITON_LOW_PRECISION):  # fp16 alone under the interpreter
        assert_matches_reference('triton', make_case(shape=(7,), dtype=dtype), chunk_size=3, temperature=0.8)


@pytest.mark.parametrize('backend', BACKENDS)
def test_peaked_logits_keep_the_entropy_exact(backend, monkeypatch):
    """Logits of ~+-200 (temperature 0.05): logsumexp - E[z] would cancel to ~1e-5; the shifted
    sums keep the entropy to fp32 rounding. Against fp64, with a block boundary inside each row."""
    from twinkle.kernels.fused_linear_logprobs import triton as triton_backend
    monkeypatch.setattr(triton_backend, 'MAX_BLOCK', 32)
    hidden, weight, labels = make_case(shape=(6,), ignored=0.0)
    logprobs, entropy = fused_linear_logprobs(hidden, weight, labels, temperature=0.05, return_entropy=True,
                                              backend=backend)
    log_probs = torch.log_softmax(hidden.double() @ weight.double().t() / 0.05, dim=-1)
    torch.testing.assert_close(logprobs.double(), log_probs.gather(1, labels.unsqueeze(1)).squeeze(1),
                               rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(entropy.double(), -(log_probs.exp() * log_probs).sum(-1), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('backend', BACKENDS)
def test_qwen_vocabulary_against_fp64(backend):
    """V=151936 (ten Triton blocks a row) against fp64, fwd and bwd through both outputs."""
    case = make_case(shape=(3,), hidden_size=16, vocab=151936, ignored=0.0)
    actual = outputs_and_grads(backend, case, temperature=0.9)
    hidden, weight = (t.double().requires_grad_() for t in case[:2])
    log_probs = torch.log_softmax(hidden @ weight.t() / 0.9, dim=-1)
    logprobs = log_probs.gather(1, case[2].unsqueeze(1)).squeeze(1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    generator = torch.Generator().manual_seed(1)
    upstream = [torch.randn(3, generator=generator).to(DEVICE, torch.float64) for _ in range(2)]
    ((logprobs * upstream[0]).sum() + (entropy * upstream[1]).sum()).backward()
    for name, got, want in zip(NAMES, actual, (logprobs.detach(), entropy.detach(), hidden.grad, weight.grad)):
        assert_close_to_scale(got.double(), want, 1e-5, name)


@pytest.mark.parametrize('backend', ['reference', *BACKENDS])
def test_ignored_tokens_get_zero_and_no_gradient(backend):
    hidden, weight, labels = make_case(shape=(2, 5), ignored=0.4)
    ignored = labels == -100
    assert 0 < int(ignored.sum()) < labels.numel()
    logprobs, entropy, d_hidden, d_weight = outputs_and_grads(backend, (hidden, weight, labels), chunk_size=3)
    assert logprobs.shape == entropy.shape == (2, 5)
    assert bool((logprobs[ignored] == 0).all()) and bool((entropy[ignored] == 0).all())
    assert bool((logprobs[~ignored] < 0).all()) and bool((entropy[~ignored] > 0).all())
    assert bool((d_hidden[ignored] == 0).all()) and bool((d_hidden[~ignored] != 0).any())
    # an ignored token's hidden state does not reach the weight's gradient either
    moved = hidden.clone()
    moved[ignored] += 5.0
    torch.testing.assert_close(outputs_and_grads(backend, (moved, weight, labels), chunk_size=3)[3], d_weight,
                               rtol=0, atol=0)


@pytest.mark.parametrize('backend', ['reference', *BACKENDS])
def test_empty_and_all_ignored_give_zeros(backend):
    for shape, ignored in (((0,), 0.0), ((4,), 1.0)):
        logprobs, entropy, d_hidden, d_weight = outputs_and_grads(backend, make_case(shape=shape, ignored=ignored))
        assert logprobs.shape == entropy.shape == shape
        for tensor in (logprobs, entropy, d_hidden, d_weight):
            assert bool((tensor == 0).all())


@pytest.mark.parametrize('backend', ['reference', *BACKENDS])
def test_logprobs_alone_frozen_weight_and_no_grad(backend):
    skip_unavailable(backend)
    hidden, weight, labels = make_case()
    expected = fused_linear_logprobs(hidden, weight, labels, return_entropy=True, backend='reference')[0]
    hidden.requires_grad_()
    logprobs = fused_linear_logprobs(hidden, weight, labels, backend=backend)
    assert isinstance(logprobs, torch.Tensor) and logprobs.dtype == torch.float32
    assert_close_to_scale(logprobs.detach(), expected, 1e-5, 'logprobs')
    logprobs.sum().backward()
    assert hidden.grad is not None and weight.grad is None
    with torch.no_grad():
        assert not fused_linear_logprobs(hidden, weight.requires_grad_(), labels, backend=backend).requires_grad


def test_ignore_index_inside_the_vocabulary_is_ignored():
    hidden, weight, labels = make_case(ignored=0.0)
    labels[:4] = 0
    assert_matches_reference('chunked', (hidden, weight, labels), ignore_index=0, chunk_size=4)


# -- bad input -------------------------------------------------------------------------------

def _call(**changes):
    hidden, weight, labels = (t.cpu() for t in make_case())  # the checks are the same on every device
    kwargs = dict(hidden=hidden, weight=weight, labels=labels)
    kwargs.update(changes)
    return fused_linear_logprobs(kwargs.pop('hidden'), kwargs.pop('weight'), kwargs.pop('labels'), **kwargs)


BAD_INPUTS = {
    'hidden': [dict(hidden=torch.ones(13, 33, dtype=torch.long)), dict(hidden=[[1.0]])],
    'weight': [dict(weight=torch.randn(97)), dict(weight=torch.randn(2, 97, 33)), dict(weight=torch.randn(97, 32)),
               dict(weight=torch.randn(97, 33, dtype=torch.float64))],
    'labels': [dict(labels=torch.zeros(13)), dict(labels=torch.zeros(13, dtype=torch.bool)),
               dict(labels=torch.zeros(12, dtype=torch.long)), dict(labels=torch.zeros(13, 1, dtype=torch.long)),
               dict(labels=torch.full((13,), 97)), dict(labels=torch.full((13,), -1))],
    'temperature': [dict(temperature=0.0), dict(temperature=-1.0), dict(temperature=float('inf')),
                    dict(temperature=float('nan')), dict(temperature='1.0'), dict(temperature=True),
                    dict(temperature=torch.tensor(1.0))],
    'ignore_index': [dict(ignore_index=1.5), dict(ignore_index=None)],
    'return_entropy': [dict(return_entropy=1)],
    'chunk_size': [dict(chunk_size=0), dict(chunk_size=2.5), dict(chunk_size=True)],
}


@pytest.mark.parametrize('argument,changes', [(name, change) for name, changes in BAD_INPUTS.items()
                                              for change in changes])
def test_bad_input_names_the_argument_before_any_backend(argument, changes, monkeypatch):
    def no_backend(*args, **kwargs):
        raise AssertionError('a backend was resolved before the inputs were checked')
    monkeypatch.setattr(registry, 'resolve', no_backend)
    monkeypatch.setenv('TWINKLE_CHECK_VALUES', '1')  # labels in range is a value check (a host sync)
    with pytest.raises(ValueError, match=argument):
        _call(**changes)


def test_labels_out_of_range_pass_unchecked_without_check_values(monkeypatch):
    """Value checks are a host sync: off by default (the batch is checked where it is built)."""
    monkeypatch.delenv('TWINKLE_CHECK_VALUES', raising=False)
    reached = []
    monkeypatch.setattr(registry, 'resolve', lambda *args: lambda *inputs: reached.append(inputs) or
                        (torch.zeros(13), torch.zeros(0)))
    _call(labels=torch.full((13,), 97))
    assert reached


# -- dispatch --------------------------------------------------------------------------------

def test_priorities_and_the_logged_choice(fresh_registry, twinkle_logs):
    op = registry._op(OP)
    assert op.order('cuda') == ['triton', 'chunked', 'reference']
    assert op.order('cpu') == ['chunked', 'reference']
    assert op.order('npu') == ['chunked', 'reference']
    assert registry.select(OP, 'cpu') == registry.Selection('chunked', 'first in cpu priority')
    assert any(OP in r.getMessage() and 'chunked' in r.getMessage() for r in twinkle_logs.records)


def test_gpu_without_triton_falls_back_to_chunked_with_a_reason(monkeypatch, fresh_registry):
    monkeypatch.delenv('TRITON_INTERPRET', raising=False)
    monkeypatch.delenv('TWINKLE_DEVICE', raising=False)
    fake_gpu(monkeypatch, 'NVIDIA A100', (8, 0))
    real = registry.has_package
    monkeypatch.setattr(registry, 'has_package', lambda name: name != 'triton' and real(name))
    backends.reset()
    try:
        choice = registry.select(OP, 'cuda')
        assert choice.backend == 'chunked'
        assert 'triton unavailable: needs triton: pip install "twinkle[triton]"' in choice.reason
    finally:
        backends.reset()


# -- the registered ops ----------------------------------------------------------------------

OPCHECK_TESTS = {'test_schema', 'test_autograd_registration', 'test_faketensor', 'test_aot_dispatch_dynamic'}
NAMESPACES = {'chunked': 'twinkle_chunked', 'triton': 'twinkle_triton'}
OPCHECK_VARIANTS = ('entropy', 'logprobs-frozen-weight', 'all-ignored', 'empty')


def opcheck_inputs(variant, dtype):
    hidden, weight, labels = make_case(shape=(0,) if variant == 'empty' else (7,), hidden_size=16, vocab=41,
                                       dtype=dtype, ignored=1.0 if variant == 'all-ignored' else 0.3)
    hidden.requires_grad_()
    weight.requires_grad_(variant != 'logprobs-frozen-weight')
    return hidden, weight, labels, variant != 'logprobs-frozen-weight'


@pytest.mark.parametrize('variant', OPCHECK_VARIANTS)
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16], ids=['fp32', 'bf16'])
@pytest.mark.parametrize('backend', BACKENDS)
def test_opcheck(backend, dtype, variant):
    registry.resolve(OP, backend, DEVICE)  # importing the backend defines its ops
    namespace = getattr(torch.ops, NAMESPACES[backend])
    hidden, weight, labels, entropy = opcheck_inputs(variant, dtype)
    args = (hidden, weight, labels, 0.7, -100, entropy, 3)
    assert set(opcheck(namespace.fused_linear_logprobs_forward, args)) == OPCHECK_TESTS
    logprobs, entropy_out, lse = namespace.fused_linear_logprobs_forward(*args)
    assert entropy_out.shape == (labels.shape if entropy else (0,))
    grads = [torch.randn(labels.shape).to(DEVICE), torch.randn(labels.shape).to(DEVICE) if entropy else None]
    backward_args = (*grads, hidden.detach(), weight.detach(), labels, lse.detach(), entropy_out.detach(), 0.7,
                     -100, 3, True, weight.requires_grad)
    assert set(opcheck(namespace.fused_linear_logprobs_backward, backward_args)) == OPCHECK_TESTS


@pytest.mark.parametrize('backend', ['reference', *BACKENDS])
def test_fullgraph_compile_without_graph_breaks_equals_eager(backend):
    skip_unavailable(backend)
    torch._dynamo.reset()
    hidden, weight, labels = make_case(shape=(7,))
    upstream = torch.linspace(0.5, 2.0, 7, device=DEVICE)

    def step(hidden, weight, labels):  # an RL loss's shape: ratio-weighted log-probs and an entropy bonus
        logprobs, entropy = fused_linear_logprobs(hidden, weight, labels, temperature=0.7, return_entropy=True,
                                                  chunk_size=3, backend=backend)
        return (logprobs * upstream).sum() + 0.01 * entropy.sum()

    def loss_and_grads(function):
        leaves = [t.clone().requires_grad_() for t in (hidden, weight)]
        loss = function(*leaves, labels)
        loss.backward()
        return [loss.detach(), *(leaf.grad for leaf in leaves)]

    eager = loss_and_grads(step)  # the registry chooses and imports outside any graph
    explanation = torch._dynamo.explain(step)(hidden, weight, labels)
    assert explanation.graph_break_count == 0, [reason.reason for reason in explanation.break_reasons]
    assert explanation.graph_count == 1
    compiled = loss_and_grads(torch.compile(step, fullgraph=True, backend='aot_eager'))
    for name, got, want in zip(('loss', 'hidden.grad', 'weight.grad'), compiled, eager):
        assert_close_to_scale(got, want, 1e-6, name)


# -- memory ----------------------------------------------------------------------------------

MEMORY_SCRIPT = textwrap.dedent('''
    import sys
    import torch
    from twinkle.kernels import fused_linear_logprobs
    def status(key):
        return next(int(line.split()[1]) * 1024 for line in open('/proc/self/status') if line.startswith(key))
    def eager(hidden, weight, labels, entropy):
        log_probs = torch.log_softmax(hidden @ weight.t(), dim=-1)
        chosen = log_probs.gather(1, labels.unsqueeze(1)).squeeze(1)
        return chosen.sum() + (-(log_probs.exp() * log_probs).sum(-1)).sum() if entropy else chosen.sum()
    def fused(hidden, weight, labels, entropy):
        if entropy:
            logprobs, entropy = fused_linear_logprobs(hidden, weight, labels, return_entropy=True, backend='chunked')
            return logprobs.sum() + entropy.sum()
        return fused_linear_logprobs(hidden, weight, labels, backend='chunked').sum()
    def peak(function, n, hidden_size, vocab, entropy):
        """VmHWM above the inputs during forward + backward (dH and dW included)."""
        hidden = torch.randn(n, hidden_size, requires_grad=True)
        weight = torch.randn(vocab, hidden_size, requires_grad=True)
        labels = torch.randint(0, vocab, (n,))
        open('/proc/self/clear_refs', 'w').write('5')  # VmHWM := VmRSS
        base = status('VmRSS')
        function(hidden, weight, labels, entropy).backward()
        return status('VmHWM') - base
    n, hidden_size, vocab = map(int, sys.argv[1:])
    for function in (fused, eager):  # warm-up: BLAS kernels and code pages are not the op's memory
        peak(function, 64, hidden_size, 1000, True)
    # fused first: memory the eager one frees may stay mapped and would hide the fused path's allocations
    for entropy in (False, True):
        print(peak(fused, n, hidden_size, vocab, entropy), peak(eager, n, hidden_size, vocab, entropy))
''')


@cpu_only("the chunked backend's resident memory (VmHWM) in a CPU process")
def test_chunked_peak_memory_at_qwen_vocabulary():
    """N=1024, H=32, V=151936, fp32, forward + backward, in a fresh process: the fused op's peak
    (its chunk buffers of at most 128 MiB, dH, dW 19 MiB) <= 0.15 x eager ``log_softmax(h @ W.T)``
    gathered (several N x V tensors of 594 MiB), for the log-probs alone and with the entropy."""
    result = subprocess.run([sys.executable, '-c', MEMORY_SCRIPT, '1024', '32', '151936'], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    (fused, eager), (fused_entropy, eager_entropy) = (map(int, line.split()) for line in result.stdout.splitlines())
    print(f'peak MiB fused/eager: logprobs {fused / 2**20:.1f}/{eager / 2**20:.1f} = {fused / eager:.3f}; '
          f'with entropy {fused_entropy / 2**20:.1f}/{eager_entropy / 2**20:.1f} = {fused_entropy / eager_entropy:.3f}')
    assert eager > 2 * 1024 * 151936 * 4, eager  # the eager path really held N x V tensors
    assert fused <= 0.15 * eager, (fused, eager)
    assert fused_entropy <= 0.15 * eager_entropy, (fused_entropy, eager_entropy)
