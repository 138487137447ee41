"""MoE ops (moe_permute, grouped_experts, moe_unpermute): every backend against the reference,
forward and backward, on random, skewed (some experts empty) and one-expert routings; empty
inputs; dispatch per device; the Ascend mapping through a fake torch_npu; input checks.

Tolerances (relative to the largest magnitude of the expected tensor): fp32 1e-5 (same math,
other summation order); fp16 under the Triton interpreter 2e-3 and bf16 on the CPU backend 2e-2
(the reference rounds after every op, the fast paths accumulate in fp32 and round once).
Dispatch and combine only copy and sum rows, so their fp32 forward is compared exactly.
Tensors are made on the test device (tests/conftest.py); compiled Triton is checked in bf16 too (2e-2).
"""
import importlib.machinery
import sys
import types

import pytest
import torch

from tests.conftest import DEVICE, FAKE_NPU, TRITON_LOW_PRECISION, cpu_only, require_cpu
from twinkle import kernels
from twinkle.backends.cuda import CudaBackend
from twinkle.kernels import registry

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
ROUTINGS = ('random', 'skewed', 'one_expert')


def routing(kind, tokens, experts, top_k, seed=0):
    """(tokens, top_k) distinct expert ids per token. 'skewed': choices drawn from a steep
    distribution, leaving some experts without tokens; 'one_expert': expert 1 is everyone's first."""
    gen = torch.Generator().manual_seed(seed)
    if kind == 'random':
        scores = torch.rand(tokens, experts, generator=gen)
    elif kind == 'skewed':
        scores = torch.rand(tokens, experts, generator=gen) * 0.5 ** torch.arange(experts, dtype=torch.float32)
    else:
        scores = torch.rand(tokens, experts, generator=gen)
        scores[:, 1] = 2.0
    return scores.topk(top_k, dim=1).indices.to(DEVICE)


def skip_unavailable(ops, backend):
    """Skips a backend that does not run on the test device (the cpu one on a GPU)."""
    for op in ops:
        reason = registry.unavailable_reason(op, backend, DEVICE.type)
        if reason:
            pytest.skip(f'{op} {backend}: {reason}')


def expert_inputs(tokens_per_expert, hidden, intermediate, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    experts, rows = len(tokens_per_expert), int(sum(tokens_per_expert))
    permuted = torch.randn(rows, hidden, generator=gen)
    gate_up = torch.randn(experts, 2 * intermediate, hidden, generator=gen) / hidden ** 0.5
    down = torch.randn(experts, hidden, intermediate, generator=gen) / intermediate ** 0.5
    grad = torch.randn(rows, hidden, generator=gen)
    counts = torch.tensor(tokens_per_expert, dtype=torch.int64)
    return [t.to(DEVICE, dtype) for t in (permuted, gate_up, down, grad)] + [counts.to(DEVICE)]


def run_experts(backend, permuted, gate_up, down, grad, counts):
    skip_unavailable(['grouped_experts'], backend)
    leaves = [t.detach().clone().requires_grad_() for t in (permuted, gate_up, down)]
    out = kernels.grouped_experts(leaves[0], counts, leaves[1], leaves[2], backend=backend)
    if out.requires_grad:
        out.backward(grad)
    return [out.detach()] + [leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for leaf in leaves]


def assert_close(actual, expected, dtype):
    for a, e in zip(actual, expected):
        assert a.dtype == e.dtype and a.shape == e.shape
        scale = e.float().abs().max().item() if e.numel() else 1.0
        torch.testing.assert_close(a.float(), e.float(), rtol=0, atol=TOLERANCE[dtype] * max(scale, 1e-6))


# -- moe_permute / moe_unpermute --------------------------------------------------------------

def dispatch_inputs(tokens=13, hidden=24, experts=6, top_k=2, kind='random', dtype=torch.float32):
    gen = torch.Generator().manual_seed(1)
    ids = routing(kind, tokens, experts, top_k)
    x = torch.randn(tokens, hidden, generator=gen).to(DEVICE, dtype)
    weights = torch.rand(tokens, top_k, generator=gen).to(DEVICE, dtype)
    return x, ids, weights, experts


def run_dispatch(backend, x, ids, weights, experts, grad_seed=2):
    """Dispatch, a row-dependent transform, combine; the outputs and the gradients of x and weights."""
    skip_unavailable(['moe_permute', 'moe_unpermute'], backend)
    x, weights = x.detach().clone().requires_grad_(), weights.detach().clone().requires_grad_()
    permuted, counts, row_map = kernels.moe_permute(x, ids, experts, backend=backend)
    scale = torch.arange(1, permuted.shape[0] + 1, dtype=x.dtype, device=x.device).unsqueeze(1)  # rows stay apart
    out = kernels.moe_unpermute(permuted * scale, row_map, weights, backend=backend)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(x.device, x.dtype))
    return permuted.detach(), counts, row_map, out.detach(), x.grad, weights.grad


@pytest.mark.parametrize('kind', ROUTINGS)
def test_reference_dispatch_groups_rows_by_expert_in_token_order(kind):
    x, ids, _, experts = dispatch_inputs(kind=kind)
    permuted, counts, row_map = kernels.moe_permute(x, ids, experts, backend='reference')
    assert counts.dtype == row_map.dtype == torch.int64 and counts.tolist() == torch.bincount(
        ids.flatten(), minlength=experts).tolist()
    expert_of_row = torch.repeat_interleave(torch.arange(experts, device=DEVICE), counts)
    assert torch.equal(expert_of_row[row_map], ids)                       # each choice sits in its expert's group
    assert torch.equal(permuted[row_map], x.unsqueeze(1).expand(-1, ids.shape[1], -1))  # holding its token
    token_of_row = torch.empty(row_map.numel(), dtype=torch.int64, device=DEVICE)
    token_of_row[row_map.flatten()] = torch.arange(ids.shape[0], device=DEVICE).repeat_interleave(ids.shape[1])
    for group in token_of_row.split(counts.tolist()):
        assert torch.equal(group, group.sort().values)                   # token order inside a group


def test_reference_combine_is_the_weighted_sum():
    x, ids, weights, experts = dispatch_inputs()
    permuted, _, row_map = kernels.moe_permute(x, ids, experts, backend='reference')
    expected = (weights.unsqueeze(-1) * x.unsqueeze(1)).sum(1)
    torch.testing.assert_close(kernels.moe_unpermute(permuted, row_map, weights, backend='reference'), expected)


@pytest.mark.parametrize('backend, dtype', [('cpu', torch.float32), ('cpu', torch.bfloat16), ('triton', torch.float32)]
                         + [('triton', dtype) for dtype in TRITON_LOW_PRECISION])
@pytest.mark.parametrize('kind', ROUTINGS)
def test_dispatch_and_combine_match_reference(backend, dtype, kind):
    inputs = dispatch_inputs(kind=kind, dtype=dtype)
    expected, got = run_dispatch('reference', *inputs), run_dispatch(backend, *inputs)
    for exact in range(3):  # permuted, tokens_per_expert, row_map: copies and indices
        assert torch.equal(got[exact], expected[exact])
    assert_close(got[3:], expected[3:], dtype)


@pytest.mark.parametrize('backend', ['reference', 'cpu', 'triton'])
def test_dispatch_and_combine_of_no_tokens(backend):
    permuted, counts, row_map, out, dx, dw = run_dispatch(backend, *dispatch_inputs(tokens=0))
    assert permuted.shape == (0, 24) and counts.tolist() == [0] * 6 and row_map.shape == (0, 2)
    assert out.shape == dx.shape == (0, 24) and dw.shape == (0, 2)


# -- grouped_experts -------------------------------------------------------------------------

GROUPS = {'random': [5, 3, 7, 4], 'skewed': [9, 0, 2, 0], 'one_expert': [0, 16, 0, 0]}


@pytest.mark.parametrize('groups', GROUPS.values(), ids=GROUPS.keys())
@pytest.mark.parametrize('backend', ['cpu', 'grouped_mm'])
def test_cpu_backends_match_reference_fp32(backend, groups):
    inputs = expert_inputs(groups, hidden=32, intermediate=16)  # grouped_mm: 16-byte aligned dims
    assert_close(run_experts(backend, *inputs), run_experts('reference', *inputs), torch.float32)


def test_cpu_backend_odd_shapes_and_bf16():
    inputs = expert_inputs([3, 0, 5], hidden=19, intermediate=11)
    assert_close(run_experts('cpu', *inputs), run_experts('reference', *inputs), torch.float32)
    inputs = expert_inputs([6, 1, 0, 9], hidden=40, intermediate=24, dtype=torch.bfloat16)
    assert_close(run_experts('cpu', *inputs), run_experts('reference', *inputs), torch.bfloat16)


@pytest.mark.parametrize('dtype', [torch.float32, *TRITON_LOW_PRECISION])
def test_triton_matches_reference(dtype):
    inputs = expert_inputs([70, 0, 3], hidden=40, intermediate=24, dtype=dtype)  # 70 rows: two row tiles
    assert_close(run_experts('triton', *inputs), run_experts('reference', *inputs), dtype)


@pytest.mark.parametrize('backend', ['cpu', 'grouped_mm', 'triton'])
def test_no_rows_gives_zero_weight_gradients(backend):
    permuted, gate_up, down, grad, counts = expert_inputs([0, 0], hidden=16, intermediate=8)
    out, d_permuted, d_gate_up, d_down = run_experts(backend, permuted, gate_up, down, grad, counts)
    assert out.shape == d_permuted.shape == (0, 16)
    assert torch.count_nonzero(d_gate_up) == 0 and torch.count_nonzero(d_down) == 0


def test_grouped_mm_refuses_unaligned_sizes():
    with pytest.raises(ValueError, match='multiples of 16 bytes'):
        run_experts('grouped_mm', *expert_inputs([2, 3], hidden=18, intermediate=8))


@cpu_only('calls backend cpu directly')
def test_weights_without_grad_skip_their_gradients():
    permuted, gate_up, down, grad, counts = expert_inputs([4, 2], hidden=16, intermediate=8)
    permuted.requires_grad_()
    kernels.grouped_experts(permuted, counts, gate_up, down, backend='cpu').backward(grad)
    expected = run_experts('reference', permuted.detach(), gate_up, down, grad, counts)[1]
    assert_close([permuted.grad], [expected], torch.float32)


# -- Ascend: a fake torch_npu with the documented contracts ------------------------------------

@pytest.fixture
def fake_torch_npu(monkeypatch, fresh_registry):
    require_cpu(FAKE_NPU)
    module = types.ModuleType('torch_npu')
    module.__spec__ = importlib.machinery.ModuleSpec('torch_npu', None)  # seen by find_spec
    module.calls = []

    def npu_moe_token_permute(tokens, indices, num_out_tokens=None, padded_mode=False):
        """Documented: sorted_indices = argsort(argsort(flat indices)), the row of each choice slot;
        out[sorted_indices[i]] = tokens[i // k]."""
        module.calls.append(('permute', indices.dtype))
        flat = indices.reshape(-1).long()
        sorted_indices = torch.argsort(torch.argsort(flat, stable=True))
        out = tokens.new_empty(flat.numel(), tokens.shape[1])
        index = sorted_indices.unsqueeze(1).expand(-1, tokens.shape[1])
        out = out.scatter(0, index, tokens.repeat_interleave(indices.shape[1], dim=0))
        return out, sorted_indices.to(torch.int32)

    def npu_moe_token_unpermute(permuted_tokens, sorted_indices, probs=None, padded_mode=False, restore_shape=None):
        """Documented: out[t] = sum_j probs[t, j] * permuted_tokens[sorted_indices[t * k + j]]."""
        module.calls.append(('unpermute', sorted_indices.dtype))
        rows = permuted_tokens[sorted_indices.long()].view(*probs.shape, -1)
        return (rows * probs.unsqueeze(-1)).sum(1)

    def npu_grouped_matmul(x, weight, *, group_list, split_item, group_type, group_list_type, **kwargs):
        """Documented: group sizes (group_list_type=1) split the rows of x (group_type=0) or the
        reduction dim (group_type=2, x passed transposed)."""
        module.calls.append(('gmm', split_item, group_type, group_list_type))
        (a,), (b,) = x, weight
        bounds = torch.cumsum(group_list, 0).tolist()
        starts = [0] + bounds[:-1]
        if group_type == 0:
            return [torch.cat([a[s:e] @ b[g] for g, (s, e) in enumerate(zip(starts, bounds))])]
        return [torch.stack([a[:, s:e] @ b[s:e] for s, e in zip(starts, bounds)])]

    module.npu_moe_token_permute = npu_moe_token_permute
    module.npu_moe_token_unpermute = npu_moe_token_unpermute
    module.npu_grouped_matmul = npu_grouped_matmul
    monkeypatch.setitem(sys.modules, 'torch_npu', module)
    return module


def test_npu_is_chosen_on_npu(fake_torch_npu):
    for op in ('moe_permute', 'moe_unpermute', 'grouped_experts'):
        assert kernels.select(op, 'npu').backend == 'npu'


def test_npu_dispatch_and_combine_map_row_map_to_sorted_indices(fake_torch_npu):
    inputs = dispatch_inputs(kind='skewed')
    expected = run_dispatch('reference', *inputs)
    got = run_dispatch_on_npu(*inputs)
    for exact in range(3):
        assert torch.equal(got[exact], expected[exact])
    assert_close(got[3:], expected[3:], torch.float32)
    assert fake_torch_npu.calls == [('permute', torch.int32), ('unpermute', torch.int32)]


def run_dispatch_on_npu(x, ids, weights, experts):
    x, weights = x.detach().clone().requires_grad_(), weights.detach().clone().requires_grad_()
    permuted, counts, row_map = registry.resolve('moe_permute', 'npu', 'npu')(x, ids, experts)
    scale = torch.arange(1, permuted.shape[0] + 1, dtype=x.dtype).unsqueeze(1)
    out = registry.resolve('moe_unpermute', 'npu', 'npu')(permuted * scale, row_map, weights)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(2)))
    return permuted.detach(), counts, row_map, out.detach(), x.grad, weights.grad


def test_npu_grouped_experts_map_to_grouped_matmul(fake_torch_npu):
    permuted, gate_up, down, grad, counts = expert_inputs([5, 0, 4], hidden=16, intermediate=8)
    leaves = [t.clone().requires_grad_() for t in (permuted, gate_up, down)]
    out = registry.resolve('grouped_experts', 'npu', 'npu')(leaves[0], counts, leaves[1], leaves[2])
    out.backward(grad)
    got = [out.detach()] + [leaf.grad for leaf in leaves]
    assert_close(got, run_experts('reference', permuted, gate_up, down, grad, counts), torch.float32)
    rows, weight_grads = ('gmm', 2, 0, 1), ('gmm', 3, 2, 1)
    assert fake_torch_npu.calls == [rows] * 3 + [rows] + [weight_grads] * 3 + [rows] * 2


def test_npu_empty_inputs_skip_the_kernels(fake_torch_npu):
    got = run_dispatch_on_npu(*dispatch_inputs(tokens=0))
    assert got[3].shape == (0, 24)
    permuted, gate_up, down, _, counts = expert_inputs([0, 0], hidden=16, intermediate=8)
    out = registry.resolve('grouped_experts', 'npu', 'npu')(permuted, counts, gate_up, down)
    assert out.shape == (0, 16) and fake_torch_npu.calls == []


# -- selection ---------------------------------------------------------------------------------

def test_selection_per_device(fresh_registry, monkeypatch):
    for op in ('moe_permute', 'moe_unpermute', 'grouped_experts'):
        assert kernels.select(op, 'cpu').backend == 'cpu'
    assert kernels.select('moe_permute', 'cuda').backend == 'triton'  # the interpreter counts as a GPU
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    for capability, expected in (((8, 0), 'grouped_mm'), ((7, 5), 'triton')):
        monkeypatch.setattr(CudaBackend, 'compute_capability', property(lambda self: capability))
        registry._chosen().clear()
        choice = kernels.select('grouped_experts', 'cuda')
        assert choice.backend == expected
    assert 'sm80+ GPU, this one is sm75' in choice.reason


@pytest.mark.parametrize('change', ['no _grouped_mm', 'torch 2.8'])
def test_grouped_mm_needs_torch_2_9(fresh_registry, monkeypatch, change):
    if change == 'no _grouped_mm':
        monkeypatch.delattr(torch, '_grouped_mm')
    else:
        monkeypatch.setattr(torch, '__version__', '2.8.0+cpu')  # _grouped_mm exists but has no CPU kernel
    assert 'needs torch >= 2.9' in registry.unavailable_reason('grouped_experts', 'grouped_mm', 'cpu')
    assert kernels.select('grouped_experts', 'cpu').backend == 'cpu'


# -- input checks ------------------------------------------------------------------------------

X, IDS = torch.randn(4, 8), torch.tensor([[0, 1], [2, 3], [1, 0], [3, 2]])


@pytest.mark.parametrize('hidden, topk_ids, experts, name, message', [
    (X.numpy(), IDS, 4, 'hidden', 'torch.Tensor'),
    (X[0], IDS, 4, 'hidden', 'dims'),
    (X.long(), IDS, 4, 'hidden', 'floating'),
    (X, IDS.float(), 4, 'topk_ids', 'integer'),
    (X, IDS[:3], 4, 'topk_ids', 'rows'),
    (X, IDS, 1, 'topk_ids', 'top-k'),                    # top-k 2 > 1 expert
    (X, IDS[:, :0], 4, 'topk_ids', 'top-k'),
    (X, torch.zeros(4, 3, dtype=torch.long), 2, 'topk_ids', r'top-k .*num_experts=2\], got 3'),  # ids valid
    (X, IDS + 1, 4, 'topk_ids', r'in \[0, 4\)'),          # id 4 out of range
    (X, IDS - 1, 4, 'topk_ids', r'in \[0, 4\)'),          # id -1
    (X, IDS, 0, 'num_experts', 'positive'),
    (X, IDS, 4.0, 'num_experts', 'positive'),
    (X, IDS.to('meta'), 4, 'topk_ids', 'meta'),
])
def test_permute_bad_inputs_name_the_argument(hidden, topk_ids, experts, name, message, monkeypatch):
    monkeypatch.setenv('TWINKLE_CHECK_VALUES', '1')  # the id range is a value check (a host sync)
    with pytest.raises(ValueError, match=rf'^{name}\b.*{message}'):
        kernels.moe_permute(hidden, topk_ids, experts)


ROWS, ROW_MAP, WEIGHTS = torch.randn(8, 4), torch.arange(8).view(4, 2), torch.rand(4, 2)


@pytest.mark.parametrize('expert_out, row_map, weights, name', [
    (ROWS.long(), ROW_MAP, WEIGHTS, 'expert_out'),
    (ROWS[:7], ROW_MAP, WEIGHTS, 'expert_out'),
    (ROWS, ROW_MAP.float(), WEIGHTS, 'row_map'),
    (ROWS, ROW_MAP.flatten(), WEIGHTS, 'row_map'),
    (ROWS, ROW_MAP, WEIGHTS[:3], 'topk_weights'),
    (ROWS, ROW_MAP, WEIGHTS.long(), 'topk_weights'),
])
def test_unpermute_bad_inputs_name_the_argument(expert_out, row_map, weights, name):
    with pytest.raises(ValueError, match=rf'^{name}\b'):
        kernels.moe_unpermute(expert_out, row_map, weights)


P, GU, D, C = torch.randn(6, 8), torch.randn(3, 10, 8), torch.randn(3, 8, 5), torch.tensor([2, 0, 4])


@pytest.mark.parametrize('args, name, message', [
    ((P[0], C, GU, D), 'permuted', 'dims'),
    ((P, C.float(), GU, D), 'tokens_per_expert', 'integer'),
    ((P, C[:2], GU, D), 'tokens_per_expert', 'length'),
    ((P, torch.tensor([3, -1, 4]), GU, D), 'tokens_per_expert', 'negative'),
    ((P, torch.tensor([2, 0, 3]), GU, D), 'tokens_per_expert', 'sum'),
    ((P, C, GU[:, :9], D), 'gate_up_proj', 'even'),
    ((P, C, GU[..., :7], D), 'gate_up_proj', 'hidden'),
    ((P, C, GU, D[..., :4]), 'down_proj', 'shape'),
    ((P, C, GU, D[:2]), 'down_proj', 'shape'),
    ((P, C, GU.double(), D), 'gate_up_proj', 'dtype'),
    ((P, C, GU, D.half()), 'down_proj', 'dtype'),
])
def test_grouped_experts_bad_inputs_name_the_argument(args, name, message, monkeypatch):
    monkeypatch.setenv('TWINKLE_CHECK_VALUES', '1')  # the group sizes are a value check (a host sync)
    with pytest.raises(ValueError, match=rf'^{name}\b.*{message}'):
        kernels.grouped_experts(*args)
