"""Every registered op of rms_norm, swiglu, rope, fused_linear_cross_entropy, the MoE ops and
varlen attention, on every backend that runs here: the references (``twinkle_ref::*``, forward
and backward ops), the native CPU kernels (``twinkle_cpu::*``) and the Triton kernels under the
interpreter (``twinkle_triton::*``), or compiled when the suite runs on a GPU
(``TWINKLE_TEST_DEVICE=cuda``; the CPU kernels are skipped there).

``torch.library.opcheck`` with all its default checks (schema, autograd registration, fake
kernel against the real one, AOT dispatch with dynamic shapes, forward and backward) on fp32 and
bf16 inputs, an odd shape and an empty input where the op allows one. Then torch.compile
(fullgraph, AOTAutograd) of the public functions: one graph, no break, the eager forward and
gradients.
"""
import pytest
import torch

from tests.conftest import DEVICE
from twinkle import kernels
from twinkle.kernels import registry

DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16}


def randn(*shape, dtype=torch.float32, seed=0, grad=False, scale=1.0):
    tensor = (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale).to(DEVICE, dtype)
    return tensor.requires_grad_(grad)


def on_device(values, dtype=torch.int64):
    return torch.as_tensor(values, dtype=dtype).to(DEVICE)


def positive(*shape, seed=0):
    """fp32 values in [0.5, 1.5): a plausible rstd."""
    return (torch.rand(shape, generator=torch.Generator().manual_seed(seed)) + 0.5).to(DEVICE)


def rotation(batch, seq, rotary_dim, dtype, seed=2):
    angles = randn(batch, seq, rotary_dim, seed=seed) * 3  # both halves differ: a swapped half fails
    return angles.cos().to(dtype), angles.sin().to(dtype)


def heads_view(batch, seq, heads, head_dim, dtype, seed, grad=False):
    """(B, H, T, D) as a transposed view of (B, T, H, D), the layout of HF's attention."""
    return randn(batch, seq, heads, head_dim, dtype=dtype, seed=seed).transpose(1, 2).requires_grad_(grad)


# -- sample inputs: op -> case -> dtype -> args (floating inputs require grad for forward ops) -------

def rms_norm_args(case, dtype, grad=True):
    """'odd' keeps an fp32 weight with bf16 x (mixed precision keeps norms in fp32)."""
    rows = {'odd': (3, 5), 'empty': (0,)}[case]
    weight_dtype = torch.float32 if case == 'odd' else dtype
    return (randn(*rows, 37, dtype=dtype, grad=grad), randn(37, dtype=weight_dtype, seed=1, grad=grad), 1e-6, 0.5)


def rms_norm_backward_args(case, dtype):
    x, weight, _, offset = rms_norm_args(case, dtype, grad=False)
    return randn(*x.shape, dtype=dtype, seed=2), x, weight, positive(*x.shape[:-1]), offset


def swiglu_args(case, dtype, grad=True):
    shape = {'odd': (3, 5, 37), 'empty': (0, 8)}[case]  # scale 4: both tails of the sigmoid
    return randn(*shape, dtype=dtype, grad=grad, scale=4), randn(*shape, dtype=dtype, seed=1, grad=grad)


def swiglu_backward_args(case, dtype):
    gate, up = swiglu_args(case, dtype, grad=False)
    return (randn(*gate.shape, dtype=dtype, seed=2), gate, up)


ROPE_SHAPES = {  # case -> (batch, heads, kv_heads, seq, head_dim, rotary_dim, cos_batch)
    'odd': (2, 3, 1, 5, 22, 12, 2),     # partial rotary, odd heads, cos per batch
    'empty': (2, 3, 1, 0, 8, 8, 1),     # no tokens
}


def rope_args(case, dtype, unsqueeze_dim=1):
    batch, heads, kv_heads, seq, head_dim, rotary_dim, cos_batch = ROPE_SHAPES[case]
    q = heads_view(batch, seq, heads, head_dim, dtype, seed=0, grad=True)
    k = heads_view(batch, seq, kv_heads, head_dim, dtype, seed=1, grad=True)
    if unsqueeze_dim == 2:
        q, k = (x.detach().transpose(1, 2).requires_grad_() for x in (q, k))
    cos, sin = rotation(cos_batch, seq, rotary_dim, dtype)
    return q, k, cos, sin, unsqueeze_dim


def reference_rope_args(case, dtype):
    q, k, cos, sin, unsqueeze_dim = rope_args(case, dtype, unsqueeze_dim=2 if case == 'odd' else 1)
    return q, k, cos.requires_grad_(), sin.requires_grad_(), unsqueeze_dim  # the reference differentiates them


def cpu_rope_args(case, dtype):
    q, _, cos, sin, unsqueeze_dim = rope_args(case, dtype)
    return q, cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim), False


def triton_rope_args(case, dtype):
    return (*rope_args(case, dtype), False)


def fused_linear_cross_entropy_args(case, dtype):
    tokens, vocab, hidden = {'odd': (7, 11, 5), 'empty': (0, 11, 5)}[case]
    labels = torch.randint(0, vocab, (tokens,), generator=torch.Generator().manual_seed(3))
    labels[::3] = -100
    labels = on_device(labels)
    if case == 'odd':  # bias, softcap, smoothing, mean over the counted tokens
        return (randn(tokens, hidden, dtype=dtype, grad=True), randn(vocab, hidden, dtype=dtype, seed=1, grad=True),
                labels, randn(vocab, dtype=dtype, seed=2, grad=True), -100, 'mean', 0.1, 3.0, None)
    return (randn(tokens, hidden, dtype=dtype, grad=True), randn(vocab, hidden, dtype=dtype, seed=1, grad=True),
            labels, None, -100, 'none', 0.0, None, 4)


def moe_permute_args(case, dtype):
    tokens, top_k, experts = {'odd': (7, 2, 5), 'empty': (0, 2, 4)}[case]
    topk_ids = torch.rand(tokens, experts, generator=torch.Generator().manual_seed(4)).argsort(-1)[:, :top_k]
    return randn(tokens, 6, dtype=dtype, grad=True), on_device(topk_ids), experts


def moe_unpermute_args(case, dtype):
    tokens, top_k = {'odd': (7, 2), 'empty': (0, 2)}[case]
    row_map = torch.randperm(tokens * top_k, generator=torch.Generator().manual_seed(5)).view(tokens, top_k)
    return (randn(tokens * top_k, 6, dtype=dtype, grad=True), on_device(row_map),
            randn(tokens, top_k, dtype=dtype, seed=1, grad=True))


def grouped_experts_args(case, dtype):
    group_sizes = {'odd': [3, 0, 4, 2], 'empty': [0, 0, 0, 0]}[case]  # an expert without tokens
    experts, hidden, intermediate = len(group_sizes), 6, 5
    return (randn(sum(group_sizes), hidden, dtype=dtype, grad=True), on_device(group_sizes),
            randn(experts, 2 * intermediate, hidden, dtype=dtype, seed=1, grad=True, scale=hidden ** -0.5),
            randn(experts, hidden, intermediate, dtype=dtype, seed=2, grad=True, scale=intermediate ** -0.5))


def varlen_attention_args(case, dtype):
    bounds = {'odd': [0, 3, 3, 7], 'empty': [0]}[case]  # an empty sequence in the middle
    total = bounds[-1]
    return (randn(total, 4, 8, dtype=dtype, grad=True), randn(total, 2, 8, dtype=dtype, seed=1, grad=True),
            randn(total, 2, 8, dtype=dtype, seed=2, grad=True), on_device(bounds, torch.int32),
            True, 8 ** -0.5, max([end - start for start, end in zip(bounds, bounds[1:])], default=0))


def varlen_attention_lse_args(case, dtype):
    bounds_q, bounds_k = {'odd': ([0, 3, 3, 7], [0, 2, 4, 4]), 'empty': ([0], [0])}[case]  # no keys for sequence 2
    return (randn(bounds_q[-1], 4, 8, dtype=dtype, grad=True),
            randn(bounds_k[-1], 2, 8, dtype=dtype, seed=1, grad=True),
            randn(bounds_k[-1], 2, 8, dtype=dtype, seed=2, grad=True), on_device(bounds_q, torch.int32),
            on_device(bounds_k, torch.int32), False, 8 ** -0.5)


def needs(op_name, backend):
    """Skip unless ``backend`` of ``op_name`` runs on the test device; import its module."""
    reason = registry.unavailable_reason(op_name, backend, DEVICE)
    if reason:
        pytest.skip(f'{op_name} {backend}: {reason}')
    registry.resolve(op_name, backend, DEVICE)


REFERENCE = {  # registry op -> its sample inputs
    'rms_norm': rms_norm_args,
    'swiglu': swiglu_args,
    'rope': reference_rope_args,
    'fused_linear_cross_entropy': fused_linear_cross_entropy_args,
    'moe_permute': moe_permute_args,
    'moe_unpermute': moe_unpermute_args,
    'grouped_experts': grouped_experts_args,
    'varlen_attention': varlen_attention_args,
    'varlen_attention_lse': varlen_attention_lse_args,
}
FAST = {  # (backend, op) -> (the registry op whose module registers it, its sample inputs)
    ('cpu', 'rms_norm_forward'): ('rms_norm', rms_norm_args),
    ('cpu', 'rms_norm_backward'): ('rms_norm', rms_norm_backward_args),
    ('cpu', 'swiglu_forward'): ('swiglu', swiglu_args),
    ('cpu', 'swiglu_backward'): ('swiglu', swiglu_backward_args),
    ('cpu', 'rope_rotate'): ('rope', cpu_rope_args),
    ('triton', 'rms_norm_forward'): ('rms_norm', rms_norm_args),
    ('triton', 'rms_norm_backward'): ('rms_norm', rms_norm_backward_args),
    ('triton', 'swiglu_forward'): ('swiglu', swiglu_args),
    ('triton', 'swiglu_backward'): ('swiglu', swiglu_backward_args),
    ('triton', 'rope_rotate'): ('rope', triton_rope_args),
}
NAMESPACES = {'reference': 'twinkle_ref', 'cpu': 'twinkle_cpu', 'triton': 'twinkle_triton'}
CASES = [pytest.param(case, dtype, id=f'{case}-{name}') for case in ('odd', 'empty') for name, dtype in DTYPES.items()]


def op(backend, name):
    return getattr(getattr(torch.ops, NAMESPACES[backend]), name)


def backward_args(forward, args):
    """Arguments of a reference's backward op: a gradient per floating output, every floating
    tensor input flagged as needing one, then the forward's inputs."""
    outputs = forward(*args)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    grad_outputs = [randn(*out.shape, dtype=out.dtype, seed=7) if out.is_floating_point() else None
                    for out in outputs]
    tensor_inputs = [arg for arg, spec in zip(args, forward.default._schema.arguments) if 'Tensor' in str(spec.type)]
    needs_grad = [tensor is not None and tensor.is_floating_point() for tensor in tensor_inputs]
    detached = [arg.detach() if isinstance(arg, torch.Tensor) else arg for arg in args]
    return (grad_outputs, needs_grad, *detached)


@pytest.mark.parametrize('case, dtype', CASES)
@pytest.mark.parametrize('name', list(REFERENCE))
def test_reference_ops_pass_opcheck(name, case, dtype):
    args = REFERENCE[name](case, dtype)
    needs(name, 'reference')
    torch.library.opcheck(op('reference', name), args)


@pytest.mark.parametrize('case, dtype', CASES)
@pytest.mark.parametrize('name', list(REFERENCE))
def test_reference_backward_ops_pass_opcheck(name, case, dtype):
    needs(name, 'reference')
    args = REFERENCE[name](case, dtype)
    torch.library.opcheck(op('reference', f'{name}_backward'), backward_args(op('reference', name), args))


@pytest.mark.parametrize('case, dtype', CASES)
@pytest.mark.parametrize('backend, name', list(FAST), ids=[f'{b}-{n}' for b, n in FAST])
def test_fast_ops_pass_opcheck(backend, name, case, dtype):
    op_name, make_args = FAST[backend, name]
    needs(op_name, backend)
    torch.library.opcheck(op(backend, name), make_args(case, dtype))


def test_reference_gradient_never_aliases_the_incoming_one():
    """With nothing to rotate, the reference's vjp is a view of the incoming gradient; the backward
    op hands out a copy (an op's output may not alias its input) holding the same values."""
    q, k = randn(1, 2, 3, 4, grad=True), randn(1, 1, 3, 4, seed=1)
    no_rotation = torch.ones(1, 3, 0, device=DEVICE)
    q_out, _ = kernels.apply_rotary_pos_emb(q, k, no_rotation, no_rotation, backend='reference')
    grad_out = randn(*q.shape, seed=2)
    (grad_q,) = torch.autograd.grad(q_out, q, grad_out)
    torch.testing.assert_close(grad_q, grad_out, rtol=0, atol=0)
    assert grad_q.untyped_storage().data_ptr() != grad_out.untyped_storage().data_ptr()


# -- torch.compile of the public functions ---------------------------------------------------------

def public(name, backend):
    """The public function of ``name`` with ``backend`` forced, taking the sample inputs."""
    functions = {
        'rms_norm': lambda x, weight, eps, offset: kernels.rms_norm(x, weight, eps, offset=offset, backend=backend),
        'swiglu': lambda gate, up: kernels.swiglu(gate, up, backend=backend),
        'rope': lambda q, k, cos, sin, unsqueeze_dim: kernels.apply_rotary_pos_emb(
            q, k, cos, sin, unsqueeze_dim=unsqueeze_dim, backend=backend),
        'fused_linear_cross_entropy': lambda hidden, weight, labels, bias, ignore_index, reduction, smoothing,
        softcap, chunk_size: kernels.fused_linear_cross_entropy(
            hidden, weight, labels, bias=bias, ignore_index=ignore_index, reduction=reduction,
            label_smoothing=smoothing, logit_softcap=softcap, chunk_size=chunk_size, backend=backend),
        'moe_permute': lambda hidden, topk_ids, experts: kernels.moe_permute(hidden, topk_ids, experts,
                                                                             backend=backend),
        'moe_unpermute': lambda expert_out, row_map, weights: kernels.moe_unpermute(expert_out, row_map, weights,
                                                                                    backend=backend),
        'grouped_experts': lambda permuted, sizes, gate_up, down: kernels.grouped_experts(
            permuted, sizes, gate_up, down, backend=backend),
        'varlen_attention': lambda q, k, v, bounds, causal, scale, max_seqlen: kernels.varlen_attention(
            q, k, v, bounds, causal=causal, scale=scale, max_seqlen=max_seqlen, backend=backend),
        'varlen_attention_lse': lambda q, k, v, bounds_q, bounds_k, causal, scale: kernels.varlen_attention_lse(
            q, k, v, bounds_q, bounds_k, causal=causal, scale=scale, backend=backend),
    }
    return functions[name]


def outputs_and_grads(fn, args):
    """Outputs of ``fn`` on fresh leaves of ``args``, and the gradients of its floating outputs
    (seeded with fixed random cotangents) w.r.t. the leaves that require grad."""
    leaves = [a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
              for a in args]
    outputs = fn(*leaves)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    differentiable = [out for out in outputs if out.requires_grad]
    cotangents = [randn(*out.shape, dtype=out.dtype, seed=9) for out in differentiable]
    wanted = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor) and leaf.requires_grad]
    grads = torch.autograd.grad(differentiable, wanted, cotangents)
    return [out.detach() for out in outputs] + list(grads)


COMPILED = [('triton', 'rms_norm'), ('triton', 'swiglu'), ('triton', 'rope')] + [
    ('reference', name) for name in REFERENCE]


def compile_args(backend, name):
    if (backend, name) == ('triton', 'rope'):
        return rope_args('odd', torch.float32)  # the fast backends do not differentiate cos/sin
    return REFERENCE[name]('odd', torch.float32)


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()  # every test compiles the same lambdas: no recompile limit, no stale guards
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize('backend, name', COMPILED, ids=[f'{b}-{n}' for b, n in COMPILED])
def test_torch_compile_fullgraph_matches_eager(backend, name, fresh_dynamo):
    """One graph through AOTAutograd, no break; forward and gradients equal to eager."""
    needs(name, backend)
    fn, args = public(name, backend), compile_args(backend, name)
    eager = outputs_and_grads(fn, args)
    explanation = torch._dynamo.explain(fn)(*args)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
    compiled = outputs_and_grads(torch.compile(fn, fullgraph=True, backend='aot_eager'), args)
    assert len(compiled) == len(eager)
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
