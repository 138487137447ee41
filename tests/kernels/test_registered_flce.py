"""fused_linear_cross_entropy's backends as registered torch ops (``<namespace>::
fused_linear_cross_entropy_forward`` / ``_backward``, see ``chunked.define_ops``).

- ``torch.library.opcheck`` (schema, fake kernel, autograd registration, AOT dispatch with dynamic
  shapes) on the cpu and triton (interpreter on CPU) ops, fp32 and bf16, every reduction, with and
  without bias (a frozen weight: gradients not asked for are empty outputs), label smoothing and
  softcap, all labels ignored, no tokens at all;
- the public function compiled ``fullgraph=True`` with each backend forced: no graph break, loss
  and gradients equal to eager;
- the gradients computed in forward are scaled in place by the first backward: a second one
  (retain_graph) is refused with a clear error in eager; 'none' recomputes, so it may run twice.

Tolerances: compiled against eager runs the same op on the same numbers, so fp32 agrees to 1e-6
relative (the reference backend's graph may reorder float sums).
"""
import pytest
import torch
from torch.library import opcheck

from tests.conftest import DEVICE
from twinkle.kernels import fused_linear_cross_entropy, registry

OP = 'fused_linear_cross_entropy'
NAMESPACES = {'cpu': 'twinkle_cpu', 'triton': 'twinkle_triton'}
OP_BACKENDS = [pytest.param('cpu', marks=pytest.mark.skipif(DEVICE.type != 'cpu', reason='the cpu op runs on CPU')),
               'triton']
OPCHECK_TESTS = {'test_schema', 'test_autograd_registration', 'test_faketensor', 'test_aot_dispatch_dynamic'}
REDUCTIONS = ('mean', 'sum', 'none')
VARIANTS = ('frozen-weight-no-bias', 'bias-smoothing-softcap', 'all-ignored', 'empty')
VOCAB, HIDDEN, TOKENS, CHUNK = 41, 16, 7, 3  # 3 rows a chunk: 7 tokens need a partial last chunk


def backend_ops(backend):
    """The forward and backward op of ``backend`` (importing its module defines them)."""
    registry.resolve(OP, backend, DEVICE)
    namespace = getattr(torch.ops, NAMESPACES[backend])
    return namespace.fused_linear_cross_entropy_forward, namespace.fused_linear_cross_entropy_backward


def make_inputs(variant, dtype):
    """(hidden, weight, labels, bias, label_smoothing, softcap), leaves requiring grad as the variant says."""
    generator = torch.Generator().manual_seed(0)
    tokens = 0 if variant == 'empty' else TOKENS
    hidden = torch.randn(tokens, HIDDEN, generator=generator)
    weight = torch.randn(VOCAB, HIDDEN, generator=generator) * 0.3
    bias = None if variant == 'frozen-weight-no-bias' else torch.randn(VOCAB, generator=generator)
    labels = torch.randint(0, VOCAB, (tokens,), generator=generator)
    labels[:2] = -100
    if variant == 'all-ignored':
        labels[:] = -100
    options = (0.1, 3.0) if variant == 'bias-smoothing-softcap' else (0.0, None)
    hidden, weight = (t.to(DEVICE, dtype).requires_grad_() for t in (hidden, weight))
    if variant == 'frozen-weight-no-bias':
        weight.requires_grad_(False)
    if bias is not None:
        bias = bias.to(DEVICE, dtype).requires_grad_()
    return (hidden, weight, labels.to(DEVICE), bias, *options)


def wanted(hidden, weight, bias):
    return hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad


@pytest.mark.parametrize('variant', VARIANTS)
@pytest.mark.parametrize('reduction', REDUCTIONS)
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16], ids=['fp32', 'bf16'])
@pytest.mark.parametrize('backend', OP_BACKENDS)
def test_opcheck_forward(backend, dtype, reduction, variant):
    forward, _ = backend_ops(backend)
    hidden, weight, labels, bias, smoothing, softcap = make_inputs(variant, dtype)
    args = (hidden, weight, labels, bias, -100, reduction, smoothing, softcap, CHUNK, *wanted(hidden, weight, bias))
    assert set(opcheck(forward, args)) == OPCHECK_TESTS  # raises on the first failing test

    loss, *grads = forward(*args)
    assert loss.dtype == torch.float32 and loss.shape == ((hidden.shape[0],) if reduction == 'none' else ())
    # gradients come out of forward for 'mean'/'sum' (dW, db fp32), only where asked for; 'none' has none
    expected_shapes = [t.shape if t is not None and t.requires_grad and reduction != 'none' else (0,)
                       for t in (hidden, weight, bias)]
    assert [grad.shape for grad in grads] == expected_shapes
    assert [grad.dtype for grad in grads] == [dtype, torch.float32, torch.float32]


@pytest.mark.parametrize('variant', VARIANTS)
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16], ids=['fp32', 'bf16'])
@pytest.mark.parametrize('backend', OP_BACKENDS)
def test_opcheck_unreduced_backward(backend, dtype, variant):
    _, backward = backend_ops(backend)
    hidden, weight, labels, bias, smoothing, softcap = make_inputs(variant, dtype)
    flags = wanted(hidden, weight, bias)
    grad_loss = torch.linspace(0.5, 2.0, hidden.shape[0], device=DEVICE)
    detached = [None if t is None else t.detach() for t in (hidden, weight, bias)]
    args = (grad_loss, detached[0], detached[1], labels, detached[2], -100, smoothing, softcap, CHUNK, *flags)
    assert set(opcheck(backward, args)) == OPCHECK_TESTS


def training_loss(backend, reduction):
    """The public function as a training step would call it (softcap only where liger is not)."""
    options = dict(label_smoothing=0.1, reduction=reduction, backend=backend)
    if backend != 'liger':  # liger: no chunk_size, and its softcap cannot run in the interpreter
        options.update(logit_softcap=3.0, chunk_size=CHUNK)

    def loss_of(hidden, weight, labels, bias):
        loss = fused_linear_cross_entropy(hidden, weight, labels, bias=bias, **options)
        if reduction == 'none':  # a per-token upstream gradient
            loss = (loss * torch.linspace(0.5, 2.0, loss.numel(), device=loss.device)).sum()
        return loss
    return loss_of


def loss_and_grads(function, inputs):
    hidden, weight, labels, bias = (t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs)
    loss = function(hidden, weight, labels, bias)
    loss.backward()
    return [loss.detach(), hidden.grad, weight.grad, bias.grad]


@pytest.mark.parametrize('reduction', REDUCTIONS)
@pytest.mark.parametrize('backend', ['reference', 'cpu', 'triton', 'liger'])
def test_fullgraph_compile_without_graph_breaks_equals_eager(backend, reduction):
    if backend == 'cpu' and DEVICE.type != 'cpu':
        pytest.skip('the cpu backend runs on CPU')
    torch._dynamo.reset()
    hidden, weight, labels, bias, _, _ = make_inputs('bias-smoothing-softcap', torch.float32)
    inputs = (hidden, weight, labels, bias)
    step = training_loss(backend, reduction)
    eager = loss_and_grads(step, inputs)  # the registry chooses and imports outside any graph

    explanation = torch._dynamo.explain(step)(*inputs)
    assert explanation.graph_break_count == 0, [reason.reason for reason in explanation.break_reasons]
    assert explanation.graph_count == 1

    compiled = loss_and_grads(torch.compile(step, fullgraph=True, backend='aot_eager'), inputs)
    for name, got, want in zip(('loss', 'hidden.grad', 'weight.grad', 'bias.grad'), compiled, eager):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * float(want.abs().max()), msg=name)


@pytest.mark.parametrize('reduction', ['mean', 'sum'])
@pytest.mark.parametrize('backend', ['cpu', 'triton', 'liger'])
def test_second_backward_is_refused_not_scaled_twice(backend, reduction):
    if backend == 'cpu' and DEVICE.type != 'cpu':
        pytest.skip('the cpu backend runs on CPU')
    hidden, weight, labels, bias, _, _ = make_inputs('bias-smoothing-softcap', torch.float32)
    loss = training_loss(backend, reduction)(hidden, weight, labels, bias)
    loss.backward(retain_graph=True)
    first = weight.grad.clone()
    with pytest.raises(RuntimeError, match='cannot run twice'):
        loss.backward()
    torch.testing.assert_close(weight.grad, first, rtol=0, atol=0)  # nothing was added or scaled


@pytest.mark.parametrize('backend', ['cpu', 'triton'])
def test_second_backward_recomputes_for_none_and_when_compiled(backend):
    """'none' keeps no gradients from forward, and a compiled 'mean' scales out of place: both may
    run backward twice, each adding the same gradient again."""
    if backend == 'cpu' and DEVICE.type != 'cpu':
        pytest.skip('the cpu backend runs on CPU')
    torch._dynamo.reset()
    for step in (training_loss(backend, 'none'),
                 torch.compile(training_loss(backend, 'mean'), fullgraph=True, backend='aot_eager')):
        hidden, weight, labels, bias, _, _ = make_inputs('bias-smoothing-softcap', torch.float32)
        loss = step(hidden, weight, labels, bias)
        loss.backward(retain_graph=True)
        first = [t.grad.clone() for t in (hidden, weight, bias)]
        loss.backward()
        for leaf, once in zip((hidden, weight, bias), first):
            torch.testing.assert_close(leaf.grad, 2 * once, rtol=1e-6, atol=1e-7)
