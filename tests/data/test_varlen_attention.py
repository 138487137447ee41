"""varlen_attention: the reference against an independent dense block-diagonal formula, the sdpa
backend against the reference (forward and backward), input checks, dispatch of the flash-attn
and NPU backends through fake modules, and the Hugging Face integration on the tiny Qwen3.

Tolerances: fp32 1e-5; bf16 compares with the reference run on the same bf16 inputs (the
reference computes in fp32 and rounds once, SDPA in bf16 kernels): 3e-2.
"""
import sys
import types

import pytest
import torch

from twinkle import kernels
from twinkle.kernels import registry
from twinkle.kernels.varlen_attention import flash, npu

TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}


def packed(lengths, heads=4, kv_heads=2, dim=8, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q, k, v, grad = (torch.randn(total, h, dim, generator=generator).to(dtype)
                     for h in (heads, kv_heads, kv_heads, heads))
    cu_seq_lens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()]) if lengths else torch.tensor([0])
    return q, k, v, cu_seq_lens, grad


def run(backend, q, k, v, cu_seq_lens, grad, causal=True):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = kernels.varlen_attention(q, k, v, cu_seq_lens, causal=causal, backend=backend)
    out.backward(grad)
    return out, q.grad, k.grad, v.grad


def dense_block_diagonal(q, k, v, cu_seq_lens, causal):
    """Independent of both backends: one float64 softmax over all tokens with a block-diagonal mask."""
    total, groups = q.shape[0], q.shape[1] // k.shape[1]
    sequence = torch.repeat_interleave(torch.arange(len(cu_seq_lens) - 1), cu_seq_lens.diff())
    allowed = sequence[:, None] == sequence[None, :]
    if causal:
        allowed &= torch.ones(total, total, dtype=torch.bool).tril()
    k, v = (t.double().repeat_interleave(groups, dim=1) for t in (k, v))
    scores = torch.einsum('qhd,khd->hqk', q.double(), k) * q.shape[-1] ** -0.5
    weights = scores.masked_fill(~allowed, float('-inf')).softmax(-1)
    return torch.einsum('hqk,khd->qhd', weights, v)


@pytest.mark.parametrize('causal', [True, False])
def test_reference_matches_dense_block_diagonal_formula(causal):
    q, k, v, cu_seq_lens, grad = packed([5, 1, 9, 3])
    out, dq, dk, dv = run('reference', q, k, v, cu_seq_lens, grad, causal)
    q64, k64, v64 = (t.double().requires_grad_(True) for t in (q, k, v))
    expected = dense_block_diagonal(q64, k64, v64, cu_seq_lens, causal)
    expected.backward(grad.double())
    torch.testing.assert_close(out.double(), expected.detach(), rtol=1e-6, atol=1e-6)
    for got, want in ((dq, q64.grad), (dk, k64.grad), (dv, v64.grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_sequences_do_not_see_each_other():
    """Changing one sequence's keys leaves every other sequence's output untouched."""
    q, k, v, cu_seq_lens, _ = packed([4, 6, 3])
    before = kernels.varlen_attention(q, k, v, cu_seq_lens)
    k2, v2 = k.clone(), v.clone()
    k2[4:10] += 5.0
    v2[4:10] -= 3.0
    after = kernels.varlen_attention(q, k2, v2, cu_seq_lens)
    torch.testing.assert_close(after[:4], before[:4], rtol=0, atol=0)
    torch.testing.assert_close(after[10:], before[10:], rtol=0, atol=0)
    assert not torch.allclose(after[4:10], before[4:10])


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('causal', [True, False])
@pytest.mark.parametrize('lengths, heads, kv_heads, dim', [
    ([7, 1, 12, 0, 5], 4, 2, 8),   # an empty sequence in the middle
    ([0, 3], 6, 3, 5),             # empty first, odd head dim
    ([1], 2, 2, 16),               # one token, plain multi-head
    ([17, 2], 8, 1, 4),            # multi-query
])
def test_sdpa_matches_reference(lengths, heads, kv_heads, dim, causal, dtype):
    q, k, v, cu_seq_lens, grad = packed(lengths, heads, kv_heads, dim, dtype)
    expected = run('reference', q, k, v, cu_seq_lens, grad, causal)
    got = run('sdpa', q, k, v, cu_seq_lens, grad, causal)
    for a, b in zip(got, expected):
        assert a.dtype == dtype
        torch.testing.assert_close(a, b, **TOLERANCE[dtype])


@pytest.mark.parametrize('backend', ['reference', 'sdpa'])
def test_no_tokens(backend):
    q, k, v, cu_seq_lens, grad = packed([])
    out, dq, _, _ = run(backend, q, k, v, cu_seq_lens, grad)
    assert out.shape == (0, 4, 8) and dq.shape == (0, 4, 8)


def test_scale_is_applied():
    q, k, v, cu_seq_lens, _ = packed([6, 2])
    scaled = kernels.varlen_attention(q, k, v, cu_seq_lens, scale=0.3, backend='sdpa')
    expected = kernels.varlen_attention(q * (0.3 / 8 ** -0.5), k, v, cu_seq_lens, backend='reference')
    torch.testing.assert_close(scaled, expected, **TOLERANCE[torch.float32])


def test_cpu_selects_sdpa(fresh_registry):
    assert registry.select('varlen_attention', 'cpu').backend == 'sdpa'
    assert registry.unavailable_reason('varlen_attention', 'flash_attn', 'cpu') is not None
    assert registry.unavailable_reason('varlen_attention', 'npu', 'cpu') is not None


@pytest.mark.parametrize('change, message', [
    (lambda a: a.update(q=a['q'][0]), 'q must have 3 dims'),
    (lambda a: a.update(k=a['k'].long()), 'k must be a floating-point tensor'),
    (lambda a: a.update(v=a['v'][:, :1]), 'k and v must have the same shape'),
    (lambda a: a.update(k=a['k'][:-1], v=a['v'][:-1]), 'k: expected tokens'),
    (lambda a: a.update(k=a['k'][..., :4], v=a['v'][..., :4]), 'k: expected head dim'),
    (lambda a: a.update(k=torch.cat([a['k']] * 3, 1)[:, :3], v=torch.cat([a['v']] * 3, 1)[:, :3]), 'must divide'),
    (lambda a: a.update(v=a['v'].double()), 'share a dtype'),
    (lambda a: a.update(cu_seq_lens=a['cu_seq_lens'].float()), 'cu_seq_lens must be a non-empty integer'),
    (lambda a: a.update(cu_seq_lens=torch.tensor([0, 5, 3, 9])), 'cu_seq_lens must rise'),
    (lambda a: a.update(cu_seq_lens=torch.tensor([0, 5, 8])), 'cu_seq_lens must rise from 0 to the 9'),
    (lambda a: a.update(cu_seq_lens=torch.tensor([1, 5, 9])), 'cu_seq_lens must rise'),
    (lambda a: a.update(cu_seq_lens=[0, 5, 9]), 'cu_seq_lens must be a torch.Tensor'),
    (lambda a: a.update(scale=0.0), 'scale must be a positive'),
])
def test_bad_inputs_name_the_argument(change, message, monkeypatch):
    monkeypatch.setenv('TWINKLE_CHECK_VALUES', '1')  # the boundaries are a value check (a host sync)
    q, k, v, cu_seq_lens, _ = packed([5, 4])
    arguments = dict(q=q, k=k, v=v, cu_seq_lens=cu_seq_lens)
    change(arguments)
    with pytest.raises(ValueError, match=message):
        kernels.varlen_attention(**arguments)


# -- fused backends through fake modules (no CUDA / Ascend here) --------------------------------

def test_flash_attn_dispatch(monkeypatch):
    calls = []

    def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=None, causal=False):
        calls.append(dict(cu_q=cu_q, cu_k=cu_k, max_q=max_q, max_k=max_k, scale=softmax_scale, causal=causal))
        return kernels.varlen_attention(q, k, v, cu_q.long(), causal=causal, scale=softmax_scale, backend='reference')

    monkeypatch.setitem(sys.modules, 'flash_attn', types.SimpleNamespace(flash_attn_varlen_func=flash_attn_varlen_func))
    q, k, v, cu_seq_lens, _ = packed([3, 7, 2], dtype=torch.bfloat16)
    out = flash.varlen_attention(q, k, v, cu_seq_lens, False, 0.25, 7)
    (call,) = calls
    assert call['cu_q'].dtype == torch.int32 and call['cu_q'].tolist() == [0, 3, 10, 12]
    assert call['cu_k'] is call['cu_q'] and call['max_q'] == call['max_k'] == 7
    assert call['scale'] == 0.25 and call['causal'] is False
    assert out.shape == q.shape


def test_npu_dispatch(monkeypatch):
    calls = []

    def npu_fusion_attention(q, k, v, head_num, input_layout, **kwargs):
        calls.append(dict(head_num=head_num, layout=input_layout, **kwargs))
        return (torch.zeros_like(q), None, None)

    monkeypatch.setitem(sys.modules, 'torch_npu', types.SimpleNamespace(npu_fusion_attention=npu_fusion_attention))
    q, k, v, _, _ = packed([4, 5], heads=8, kv_heads=2, dtype=torch.float16)
    npu.varlen_attention(q, k, v, torch.tensor([0, 0, 4, 9]), True, 0.5, 5)
    npu.varlen_attention(q, k, v, torch.tensor([0, 4, 9]), False, 0.5, 5)
    causal, full = calls
    assert causal['head_num'] == 8 and causal['layout'] == 'TND' and causal['scale'] == 0.5
    assert causal['actual_seq_qlen'] == causal['actual_seq_kvlen'] == [4, 9]  # the empty sequence dropped
    assert causal['sparse_mode'] == 3 and causal['keep_prob'] == 1.0
    mask = causal['atten_mask']
    assert torch.equal(mask, torch.ones(2048, 2048, dtype=torch.bool).triu(1))  # True = future key, masked
    assert 'atten_mask' not in full and 'sparse_mode' not in full


@pytest.mark.parametrize('module', [flash, npu])
def test_fused_backends_run_fp32_on_sdpa_and_say_so(module, twinkle_logs, monkeypatch):
    monkeypatch.setattr(module.sdpa, '_warned', set())
    q, k, v, cu_seq_lens, _ = packed([3, 4])
    out = module.varlen_attention(q, k, v, cu_seq_lens, True, 8 ** -0.5, 4)
    torch.testing.assert_close(out, kernels.varlen_attention(q, k, v, cu_seq_lens, backend='reference'),
                               **TOLERANCE[torch.float32])
    assert 'fp16/bf16 only; torch.float32 inputs run on sdpa' in twinkle_logs.text
