"""The MoE backends are registered torch ops: ``torch.library.opcheck`` (schema, autograd
registration, fake kernel, AOT dispatch with static and dynamic shapes) on every forward and
backward op of every backend that runs here, and a fullgraph torch.compile of the experts' path
(permute -> grouped experts -> unpermute) per backend with no graph break and eager's numbers.

Backends: cpu and triton (under the interpreter) for dispatch and combine; cpu, grouped_mm (its
CPU kernel) and triton for the experts. Inputs: fp32 and bf16, a routing that leaves an expert
without tokens, and no tokens at all. (Numbers against the reference: test_moe_ops.py.)
"""
import traceback

import pytest
import torch

from tests.conftest import cpu_only
from twinkle import kernels
from twinkle.kernels import registry

pytestmark = cpu_only('CPU-tensor inputs; the triton cases run through the interpreter')

EXPERTS, TOP_K, HIDDEN, INTERMEDIATE = 4, 2, 32, 16  # grouped_mm: 16-byte aligned sizes in bf16 too
NAMESPACE = {'cpu': 'twinkle_cpu', 'triton': 'twinkle_triton', 'grouped_mm': 'twinkle_grouped_mm'}
DTYPES = [torch.float32, torch.bfloat16]
CASES = {'empty_expert': 9, 'no_tokens': 0}  # tokens


def topk_ids(tokens):
    """Expert 2 is nobody's choice: every token picks two of experts 0, 1 and 3."""
    choices = torch.tensor([[0, 1], [3, 0], [1, 3]])
    return choices.repeat(tokens // 3 + 1, 1)[:tokens]


def ops_of(op, backend):
    """The namespace holding ``backend``'s ops of ``op`` (importing the backend registers them)."""
    registry.resolve(op, backend, 'cpu')
    return getattr(torch.ops, NAMESPACE[backend])


def leaf(shape, dtype, seed, grad=True):
    tensor = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return tensor.requires_grad_(grad)


def routing_inputs(tokens, dtype, grad=True):
    ids = topk_ids(tokens)
    hidden = leaf((tokens, HIDDEN), dtype, 0, grad)
    weights = torch.rand(tokens, TOP_K, generator=torch.Generator().manual_seed(1)).to(dtype).requires_grad_(grad)
    return hidden, ids, weights


def tokens_per_expert(tokens):
    return torch.bincount(topk_ids(tokens).flatten(), minlength=EXPERTS)


def opcheck_cases(backends):
    return [pytest.param(backend, dtype, tokens, id=f'{backend}-{str(dtype)[6:]}-{case}')
            for backend in backends for dtype in DTYPES for case, tokens in CASES.items()]


@pytest.mark.parametrize('backend, dtype, tokens', opcheck_cases(['cpu', 'triton']))
def test_dispatch_and_combine_ops_pass_opcheck(backend, dtype, tokens):
    hidden, ids, weights = routing_inputs(tokens, dtype)
    permute_ops, unpermute_ops = ops_of('moe_permute', backend), ops_of('moe_unpermute', backend)
    permuted, _, row_map = permute_ops.moe_permute_forward(hidden.detach(), ids, EXPERTS)
    expert_out = permuted.clone().requires_grad_()
    grad_out = leaf((tokens, HIDDEN), dtype, 2, grad=False)
    checks = [
        (permute_ops.moe_permute_forward, (hidden, ids, EXPERTS)),
        (permute_ops.moe_permute_backward, (permuted, row_map)),
        (unpermute_ops.moe_unpermute_forward, (expert_out, row_map, weights)),
    ] + [(unpermute_ops.moe_unpermute_backward, (grad_out, permuted, row_map, weights.detach(), weights_grad))
         for weights_grad in (True, False)]
    for op, args in checks:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize('backend, dtype, tokens', opcheck_cases(['cpu', 'grouped_mm', 'triton']))
def test_grouped_experts_ops_pass_opcheck(backend, dtype, tokens):
    ops = ops_of('grouped_experts', backend)
    counts = tokens_per_expert(tokens) if tokens else torch.zeros(EXPERTS, dtype=torch.int64)
    rows = int(counts.sum())
    permuted = leaf((rows, HIDDEN), dtype, 0)
    gate_up = leaf((EXPERTS, 2 * INTERMEDIATE, HIDDEN), dtype, 1)
    down = leaf((EXPERTS, HIDDEN, INTERMEDIATE), dtype, 2)
    hidden = leaf((rows, INTERMEDIATE), dtype, 3)
    grad_gate, grad_up = leaf((rows, INTERMEDIATE), dtype, 4, False), leaf((rows, INTERMEDIATE), dtype, 5, False)
    grad_out = leaf((rows, HIDDEN), dtype, 6, False)
    flags = [(True, True), (True, False), (False, True)]  # (input_grad, weight_grad)
    checks = [
        (ops.grouped_gate_up_forward, (permuted, gate_up, counts)),
        (ops.grouped_down_forward, (hidden, down, counts)),
    ] + [(ops.grouped_gate_up_backward, (grad_gate, grad_up, permuted.detach(), gate_up.detach(), counts, *flag))
         for flag in flags] + [
        (ops.grouped_down_backward, (grad_out, hidden.detach(), down.detach(), counts, *flag)) for flag in flags]
    for op, args in checks:
        torch.library.opcheck(op, args)


# -- no host read in the GPU backends ------------------------------------------------------------

READS = ('item', 'tolist', '__bool__', '__int__', '__float__', '__index__', 'nonzero', 'cpu', 'numpy')


@pytest.mark.parametrize('experts', ['triton', 'grouped_mm'])
def test_gpu_backends_read_no_tensor_value_to_the_host(experts, monkeypatch, fresh_registry):
    """The backends CUDA runs (dispatch and combine in Triton; experts in grouped_mm or Triton, whose
    tile list stays on the device) read no value of a tensor from the host, forward or backward.
    Counted: the reads whose caller is twinkle's MoE code (the interpreter's own are not)."""
    kernels.configure(moe_permute='triton', moe_unpermute='triton', grouped_experts=experts)
    inputs = routing_inputs(70, torch.float32) + (leaf((EXPERTS, 2 * INTERMEDIATE, HIDDEN), torch.float32, 1),
                                                  leaf((EXPERTS, HIDDEN, INTERMEDIATE), torch.float32, 2))
    reads = []
    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counting(getattr(torch.Tensor, name), name, reads))
    experts_path(*inputs).sum().backward()
    assert reads == []
    assert all(tensor.grad is not None for tensor in inputs if tensor.requires_grad)


def counting(method, name, reads):
    def counted(tensor, *args, **kwargs):
        caller = next(frame for frame in reversed(traceback.extract_stack()[:-1])
                      if '/torch/' not in frame.filename)
        if '/twinkle/kernels/moe/' in caller.filename:
            reads.append(f'{name} at {caller.filename}:{caller.lineno}')
        return method(tensor, *args, **kwargs)
    return counted


# -- fullgraph compile of the experts' path ------------------------------------------------------

def experts_path(hidden, ids, weights, gate_up, down):
    """What TwinkleMoeExperts.forward computes, through the public ops."""
    permuted, counts, row_map = kernels.moe_permute(hidden, ids, EXPERTS)
    expert_out = kernels.grouped_experts(permuted, counts, gate_up, down)
    return kernels.moe_unpermute(expert_out, row_map, weights)


def forward_and_gradients(fn, inputs, grad_out):
    leaves = [tensor.detach().clone().requires_grad_(tensor.requires_grad) for tensor in inputs]
    out = fn(*leaves)
    out.backward(grad_out)
    return [out.detach()] + [tensor.grad for tensor in leaves if tensor.requires_grad]


@pytest.mark.parametrize('routing, experts', [('cpu', 'cpu'), ('cpu', 'grouped_mm'), ('triton', 'triton')])
def test_experts_path_compiles_fullgraph_with_eager_numbers(routing, experts, fresh_registry):
    kernels.configure(moe_permute=routing, moe_unpermute=routing, grouped_experts=experts)
    torch._dynamo.reset()
    tokens = 9
    hidden, ids, weights = routing_inputs(tokens, torch.float32)
    gate_up = leaf((EXPERTS, 2 * INTERMEDIATE, HIDDEN), torch.float32, 1) / HIDDEN ** 0.5
    down = leaf((EXPERTS, HIDDEN, INTERMEDIATE), torch.float32, 2) / INTERMEDIATE ** 0.5
    inputs = [hidden, ids, weights, gate_up, down]

    explanation = torch._dynamo.explain(experts_path)(*inputs)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1

    grad_out = leaf((tokens, HIDDEN), torch.float32, 7, grad=False)
    expected = forward_and_gradients(experts_path, inputs, grad_out)
    compiled = torch.compile(experts_path, backend='aot_eager', fullgraph=True)
    got = forward_and_gradients(compiled, inputs, grad_out)
    assert len(got) == 5  # output; gradients of hidden, weights, gate_up, down
    for actual, wanted in zip(got, expected):
        torch.testing.assert_close(actual, wanted, rtol=0, atol=0)  # the same kernels in the same order
