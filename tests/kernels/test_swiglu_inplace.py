"""``swiglu(gate, up, inplace=True)``: backward writes the two gradients over gate and up (the cpu
backend's donated path), with results equal to the plain path and refusals where overwriting would
corrupt something a caller holds."""
import pytest
import torch

from tests.conftest import cpu_only
from twinkle.kernels.swiglu import TwinkleSwiGLUMLP, swiglu
from twinkle.kernels.swiglu import module as swiglu_module

pytestmark = cpu_only("the cpu backend's donated path (C++ kernels)")


def projections(shape, dtype, seed=0):
    """gate and up as an MLP has them: fresh results of autograd-tracked ops, never leaves."""
    generator = torch.Generator().manual_seed(seed)
    leaves = [torch.randn(shape, generator=generator, dtype=torch.float32).to(dtype).requires_grad_()
              for _ in range(2)]
    return leaves, [leaf * 1 for leaf in leaves]


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('shape', [(37, 129), (3, 5, 17), (0, 8)])
def test_inplace_matches_plain_path_and_reuses_the_inputs_memory(dtype, shape):
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    results = {}
    for inplace in (False, True):
        leaves, (gate, up) = projections(shape, dtype)
        storages = (gate.untyped_storage().data_ptr(), up.untyped_storage().data_ptr())
        out = swiglu(gate, up, inplace=inplace, backend='cpu')
        grads = torch.autograd.grad(out, [gate, up], grad)
        results[inplace] = (out, *grads)
        if gate.numel():  # empty tensors have no memory to reuse (every data_ptr is 0)
            assert (tuple(g.untyped_storage().data_ptr() for g in grads) == storages) == inplace
    for plain, donated in zip(results[False], results[True]):
        torch.testing.assert_close(donated, plain, rtol=0, atol=0)  # the same kernel, the same order


def test_inplace_gradient_is_right_against_the_reference():
    leaves, (gate, up) = projections((64, 33), torch.float32)
    swiglu(gate, up, inplace=True, backend='cpu').square().sum().backward()
    expected = [leaf.detach().clone().requires_grad_() for leaf in leaves]
    swiglu(*expected, backend='reference').square().sum().backward()
    for leaf, oracle in zip(leaves, expected):
        torch.testing.assert_close(leaf.grad, oracle.grad, rtol=1e-5, atol=1e-6 * float(oracle.grad.abs().max()))


def test_a_second_backward_through_overwritten_inputs_fails_clearly():
    _, (gate, up) = projections((4, 8), torch.float32)
    out = swiglu(gate, up, inplace=True, backend='cpu').sum()
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match='modified by an inplace operation'):
        out.backward()


@pytest.mark.parametrize('make, argument, why', [
    (lambda leaves, views: (leaves[0], views[1]), 'gate', 'leaf'),
    (lambda leaves, views: (views[0], leaves[1]), 'up', 'leaf'),
    (lambda leaves, views: (views[0].t().contiguous().t(), views[1]), 'gate', 'not contiguous'),
    (lambda leaves, views: (views[0][:2], views[1][:2]), 'gate', 'view of part'),
    (lambda leaves, views: (views[0].detach(), views[1]), 'gate', 'does not require grad'),
])
def test_inputs_that_must_not_be_overwritten_are_refused_by_name(make, argument, why):
    leaves, views = projections((4, 8), torch.float32)
    gate, up = make(leaves, views)
    with pytest.raises(ValueError, match=f'over {argument} .*{why}'):
        swiglu(gate, up, inplace=True)


def test_backend_without_an_inplace_path_runs_its_plain_function_and_says_so(twinkle_logs, fresh_registry):
    fresh_registry._OPS['swiglu'].functions.pop('reference:inplace', None)  # as in a fresh process: logged once
    leaves, (gate, up) = projections((4, 8), torch.float32)
    out = swiglu(gate, up, inplace=True, backend='reference')
    grads = torch.autograd.grad(out.sum(), [gate, up])
    assert grads[0].untyped_storage().data_ptr() != gate.untyped_storage().data_ptr()
    assert 'no inplace variant' in twinkle_logs.text


def test_mlp_donates_its_projections_only_when_training_with_grad(monkeypatch):
    calls = []
    real = swiglu_module.swiglu
    monkeypatch.setattr(swiglu_module, 'swiglu', lambda gate, up, inplace: calls.append(inplace) or real(gate, up))
    torch.manual_seed(0)
    mlp = TwinkleSwiGLUMLP(8, 16, bias=True)  # with a bias nn.Linear returns a whole view of its GEMM output
    x = torch.randn(2, 3, 8)
    mlp(x).sum().backward()
    with torch.no_grad():
        mlp(x)
    mlp.requires_grad_(False)
    mlp(x)
    assert calls == [True, False, False]
