"""varlen_attention_lse, the block of a split attention, on its reference and its sdpa backend
(torch's fused CPU flash kernel): output and log-sum-exp against an independent float64 formula
(queries and keys of a sequence in different numbers, empty key sets), equality with
varlen_attention when the blocks are whole sequences, and the property ring attention rests on:
key blocks merged by their log-sum-exp give the whole attention, forward and backward (autograd
of the reference; varlen_attention_lse_backward of each block, fed the merged output and
log-sum-exp, on both backends). Tolerances: 1e-5 of scale (the op computes in fp32 for every input dtype); bf16
gradients, rounded once to bf16, 2^-7 of scale."""
import pytest
import torch

from twinkle import kernels


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def close(got, want, rel=1e-5):
    got, want = got.double(), want.double()
    finite = want.isfinite()
    assert torch.equal(finite, got.isfinite())
    assert (got[finite] - want[finite]).abs().max() <= rel * max(want[finite].abs().max(), 1.0)


def dense(q, k, v, lengths_q, lengths_k, causal, scale):
    """float64, all tokens at once: query i sees key j iff same sequence (and j's slot <= i's)."""
    seq_q = torch.repeat_interleave(torch.arange(len(lengths_q)), torch.tensor(lengths_q))
    seq_k = torch.repeat_interleave(torch.arange(len(lengths_k)), torch.tensor(lengths_k))
    slot_q = torch.cat([torch.arange(n) for n in lengths_q]) if sum(lengths_q) else torch.zeros(0, dtype=torch.long)
    slot_k = torch.cat([torch.arange(n) for n in lengths_k]) if sum(lengths_k) else torch.zeros(0, dtype=torch.long)
    seen = seq_q[:, None] == seq_k[None, :]
    if causal:
        seen &= slot_k[None, :] <= slot_q[:, None]
    groups = q.shape[1] // k.shape[1]
    k, v = (t.double().repeat_interleave(groups, dim=1) for t in (k, v))
    scores = (torch.einsum('qhd,khd->hqk', q.double(), k) * scale).masked_fill(~seen, float('-inf'))
    lse = scores.logsumexp(-1)
    weights = torch.where(seen, (scores - lse[..., None]).exp(), 0.0)
    return torch.einsum('hqk,khd->qhd', weights, v), lse.transpose(0, 1)


def bounds(lengths):
    return torch.tensor([0, *torch.tensor(lengths, dtype=torch.long).cumsum(0).tolist()])


@pytest.mark.parametrize('lengths_q, lengths_k, causal', [
    ([5, 1, 9, 3], [5, 1, 9, 3], True),
    ([5, 1, 9, 3], [5, 1, 9, 3], False),
    ([4, 2, 6], [2, 5, 6], False),      # fewer / more keys than queries
    ([3, 4, 2], [3, 0, 2], False),      # a sequence with no keys: out 0, lse -inf
    ([3, 5], [6, 2], True),             # causal with unequal counts: slot t sees slots <= t
])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_matches_dense_formula(lengths_q, lengths_k, causal, dtype):
    q = randn(sum(lengths_q), 4, 8, dtype=dtype).requires_grad_()
    k = randn(sum(lengths_k), 2, 8, seed=1, dtype=dtype).requires_grad_()
    v = randn(sum(lengths_k), 2, 8, seed=2, dtype=dtype).requires_grad_()
    with torch.no_grad():
        fused = kernels.varlen_attention_lse(q, k, v, bounds(lengths_q), bounds(lengths_k), causal=causal,
                                             backend='sdpa')
    out, lse = kernels.varlen_attention_lse(q, k, v, bounds(lengths_q), bounds(lengths_k), causal=causal,
                                            backend='reference')
    close(fused[0], out, rel=1e-5 if dtype == torch.float32 else 2 ** -7)  # bf16: the kernel computes in bf16
    close(fused[1], lse, rel=1e-5 if dtype == torch.float32 else 2 ** -7)
    assert out.dtype == lse.dtype == torch.float32 and lse.shape == (sum(lengths_q), 4)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want_out, want_lse = dense(*leaves, lengths_q, lengths_k, causal, 8 ** -0.5)
    close(out, want_out)
    close(lse, want_lse)
    grad_out, grad_lse = randn(*out.shape, seed=3), randn(*lse.shape, seed=4)
    torch.autograd.backward([out, lse.masked_fill(lse.isinf(), 0.0)], [grad_out, grad_lse])
    torch.autograd.backward([want_out, want_lse.masked_fill(want_lse.isinf(), 0.0)],
                            [grad_out.double(), grad_lse.double()])
    for got, want in zip((q, k, v), leaves):  # gradients come back in the input dtype: one rounding
        close(got.grad, want.grad, rel=1e-5 if dtype == torch.float32 else 2 ** -7)


def test_whole_sequences_equal_varlen_attention():
    lengths = [7, 1, 4]
    q, k, v = randn(12, 4, 8), randn(12, 2, 8, seed=1), randn(12, 2, 8, seed=2)
    for backend in ('reference', 'sdpa'):
        out, _ = kernels.varlen_attention_lse(q, k, v, bounds(lengths), bounds(lengths), causal=True, backend=backend)
        close(out, kernels.varlen_attention(q, k, v, bounds(lengths), causal=True, backend='reference'))


def key_blocks(lengths, split):
    """Each sequence's keys in two blocks: the first ``split`` and the rest."""
    cu = bounds(lengths)
    first = torch.cat([torch.arange(s, s + split) for s in cu[:-1].tolist()])
    rest = torch.cat([torch.arange(s + split, e) for s, e in zip(cu[:-1].tolist(), cu[1:].tolist())])
    return cu, [(first, bounds([split] * len(lengths))), (rest, bounds([n - split for n in lengths]))]


def test_key_blocks_merged_by_log_sum_exp_equal_the_whole_attention():
    """Two key blocks: merged output and its autograd gradients equal attention over all keys."""
    lengths = [5, 3, 6]
    cu, blocks = key_blocks(lengths, 2)
    q = randn(14, 4, 8).requires_grad_()
    k, v = randn(14, 2, 8, seed=1).requires_grad_(), randn(14, 2, 8, seed=2).requires_grad_()
    (out_a, lse_a), (out_b, lse_b) = (kernels.varlen_attention_lse(q, k[keys], v[keys], cu, cu_k, backend='reference')
                                      for keys, cu_k in blocks)
    lse = torch.logaddexp(lse_a, lse_b)
    merged = (lse_a - lse).exp()[..., None] * out_a + (lse_b - lse).exp()[..., None] * out_b
    grad = randn(*merged.shape, seed=5)
    merged.backward(grad)
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    whole, _ = kernels.varlen_attention_lse(q, k, v, cu, cu, backend='reference')
    whole.backward(grad)
    close(merged, whole)
    for got, t in zip(grads, (q, k, v)):
        close(got, t.grad)


@pytest.mark.parametrize('backend', ['reference', 'sdpa'])
@pytest.mark.parametrize('causal', [False, True])
def test_block_backward_fed_the_merged_result_sums_to_the_whole_gradient(backend, causal):
    """Per block, varlen_attention_lse_backward(grad, merged out, merged lse): the sum over blocks
    is the whole attention's gradient. Non-causal: two key blocks per sequence; causal: the whole
    causal attention as one block (its mask in the backward)."""
    lengths = [5, 3, 6]
    cu, blocks = key_blocks(lengths, 2)
    blocks = [(torch.arange(14), cu)] if causal else blocks
    q = randn(14, 4, 8).requires_grad_()
    k, v = randn(14, 2, 8, seed=1).requires_grad_(), randn(14, 2, 8, seed=2).requires_grad_()
    whole, lse = kernels.varlen_attention_lse(q, k, v, cu, cu, causal=causal, backend='reference')
    grad = randn(*whole.shape, seed=5)
    whole.backward(grad)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    with torch.no_grad():
        for keys, cu_k in blocks:
            block = kernels.varlen_attention_lse_backward(grad, q, k[keys], v[keys], whole, lse, cu, cu_k,
                                                          causal=causal, backend=backend)
            dq += block[0]
            dk[keys] += block[1]
            dv[keys] += block[2]
    for got, t in zip((dq, dk, dv), (q, k, v)):
        close(got, t.grad)


def test_sdpa_is_forward_only_and_says_so():
    q = randn(4, 2, 8).requires_grad_()
    with pytest.raises(ValueError, match='the sdpa backend is forward only'):
        kernels.varlen_attention_lse(q, q, q, torch.tensor([0, 4]), torch.tensor([0, 4]), backend='sdpa')


def test_no_tokens():
    empty = torch.zeros(0, 2, 8)
    for backend in ('reference', 'sdpa'):
        out, lse = kernels.varlen_attention_lse(empty, empty, empty, torch.tensor([0]), torch.tensor([0]),
                                                backend=backend)
        assert out.shape == (0, 2, 8) and lse.shape == (0, 2)


@pytest.mark.parametrize('change, message', [
    (lambda a: a.update(cu_seq_lens_k=torch.tensor([0, 4])), 'cu_seq_lens_k: expected as many boundaries'),
    (lambda a: a.update(cu_seq_lens_q=a['cu_seq_lens_q'].float()), 'cu_seq_lens_q must be a non-empty integer'),
    (lambda a: a.update(cu_seq_lens_k=torch.tensor([0, 2, 7])), 'cu_seq_lens_k must rise from 0 to the 6'),
    (lambda a: a.update(k=a['k'][..., :4], v=a['v'][..., :4]), 'k: expected head dim'),
    (lambda a: a.update(k=torch.cat([a['k']] * 3, 1)[:, :3], v=torch.cat([a['v']] * 3, 1)[:, :3]), 'must divide'),
    (lambda a: a.update(v=a['v'].double()), 'share a dtype'),
    (lambda a: a.update(scale=-1.0), 'scale must be a positive'),
])
def test_bad_inputs_name_the_argument(change, message, monkeypatch):
    monkeypatch.setenv('TWINKLE_CHECK_VALUES', '1')
    arguments = dict(q=randn(9, 4, 8), k=randn(6, 2, 8), v=randn(6, 2, 8),
                     cu_seq_lens_q=torch.tensor([0, 4, 9]), cu_seq_lens_k=torch.tensor([0, 2, 6]))
    change(arguments)
    with pytest.raises(ValueError, match=message):
        kernels.varlen_attention_lse(**arguments)


# -- the fused CUDA / Ascend blocks, through fake modules that keep the kernels' conventions ------------
# flash-attn: lse (heads, total_q), int32 boundaries, dq/dk/dv written in place; npu_fusion_attention:
# TND with sequence ends, softmax_max / softmax_sum (T, N, 8). The fakes compute with the reference, so
# what is checked is twinkle's side: layouts, dtypes, the merged-result backward, and the fallbacks.

def _fake_flash(calls):
    import types

    from twinkle.kernels.varlen_attention import sdpa

    def _flash_attn_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                   softmax_scale, causal, window_size_left=-1, window_size_right=-1, softcap=0.0,
                                   alibi_slopes=None, return_softmax=False, block_table=None):
        assert cu_seqlens_q.dtype == cu_seqlens_k.dtype == torch.int32 and dropout_p == 0.0
        assert (window_size_left, window_size_right, softcap, return_softmax) == (-1, -1, 0.0, False)
        calls.append(('forward', max_seqlen_q, max_seqlen_k, causal))
        out, lse = kernels.varlen_attention_lse(q, k, v, cu_seqlens_q.long(), cu_seqlens_k.long(), causal=causal,
                                                scale=softmax_scale, backend='reference')
        empty = lse.isinf()  # a query with no key: flash writes what it writes; twinkle must not care
        return out.masked_fill(empty[..., None], float('nan')).to(q.dtype), lse.t().contiguous(), None, None

    def _flash_attn_varlen_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k,
                                    max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
                                    window_size_left, window_size_right, softcap, alibi_slopes, deterministic,
                                    rng_state=None):
        assert out.dtype == dout.dtype == q.dtype and softmax_lse.shape == (q.shape[1], q.shape[0])
        calls.append(('backward', max_seqlen_q, max_seqlen_k, causal))
        grads = sdpa.varlen_attention_lse_backward(dout, q, k, v, out, softmax_lse.t(), cu_seqlens_q.long(),
                                                   cu_seqlens_k.long(), causal, softmax_scale)
        for target, grad in zip((dq, dk, dv), grads):
            target.copy_(grad)

    interface = types.SimpleNamespace(_flash_attn_varlen_forward=_flash_attn_varlen_forward,
                                      _flash_attn_varlen_backward=_flash_attn_varlen_backward)
    return types.SimpleNamespace(flash_attn_interface=interface), interface


def _fake_npu(calls):
    import types

    from twinkle.kernels.varlen_attention import sdpa

    def cu(ends):
        return torch.tensor([0, *ends])

    def npu_fusion_attention(q, k, v, head_num, layout, scale, keep_prob, actual_seq_qlen, actual_seq_kvlen,
                             atten_mask=None, sparse_mode=0):
        assert layout == 'TND' and head_num == q.shape[1] and keep_prob == 1.0
        calls.append(('forward', actual_seq_qlen, actual_seq_kvlen, sparse_mode))
        out, lse = kernels.varlen_attention_lse(q, k, v, cu(actual_seq_qlen), cu(actual_seq_kvlen),
                                                causal=sparse_mode == 3, scale=scale, backend='reference')
        row_max = lse - 0.5  # any split with max + log(sum) = lse
        return out.to(q.dtype), row_max[..., None].expand(-1, -1, 8), torch.full((*lse.shape, 8), 0.5).exp()

    def npu_fusion_attention_grad(q, k, v, dy, head_num, layout, softmax_max, softmax_sum, attention_in,
                                  scale_value, keep_prob, actual_seq_qlen, actual_seq_kvlen, atten_mask=None,
                                  sparse_mode=0):
        assert softmax_max.shape == softmax_sum.shape == (*q.shape[:2], 8) and attention_in.dtype == q.dtype
        calls.append(('backward', actual_seq_qlen, actual_seq_kvlen, sparse_mode))
        lse = softmax_max[..., 0] + softmax_sum[..., 0].log()
        return (*sdpa.varlen_attention_lse_backward(dy, q, k, v, attention_in, lse, cu(actual_seq_qlen),
                                                    cu(actual_seq_kvlen), sparse_mode == 3, scale_value), None)

    return types.SimpleNamespace(npu_fusion_attention=npu_fusion_attention,
                                 npu_fusion_attention_grad=npu_fusion_attention_grad)


def _install(monkeypatch, name, calls):
    import sys
    from twinkle.kernels.varlen_attention import flash, npu
    if name == 'flash':
        package, interface = _fake_flash(calls)
        monkeypatch.setitem(sys.modules, 'flash_attn', package)
        monkeypatch.setitem(sys.modules, 'flash_attn.flash_attn_interface', interface)
        return flash
    monkeypatch.setitem(sys.modules, 'torch_npu', _fake_npu(calls))
    return npu


@pytest.mark.parametrize('name', ['flash', 'npu'])
def test_fused_blocks_give_the_ring_its_output_lse_and_merged_gradients(monkeypatch, name):
    """Two key blocks (a causal diagonal one, a full earlier one) merged by lse, then each block's
    backward from the merged result: equal to the whole attention's output and gradients."""
    calls = []
    module = _install(monkeypatch, name, calls)
    lengths = [6, 3, 5]
    q = randn(sum(lengths), 4, 8, dtype=torch.bfloat16)
    k, v = randn(sum(lengths), 2, 8, seed=1, dtype=torch.bfloat16), randn(sum(lengths), 2, 8, seed=2,
                                                                             dtype=torch.bfloat16)
    cu, scale = bounds(lengths), 8 ** -0.5
    grad_out = randn(sum(lengths), 4, 8, seed=3)
    whole = [t.float().requires_grad_() for t in (q, k, v)]
    want, _ = kernels.varlen_attention_lse(*whole, cu, cu, causal=True, scale=scale, backend='reference')
    want.backward(grad_out)
    # queries: the second half of each sequence; keys: its first half (full) and second half (causal)
    half = [n // 2 for n in lengths]
    rows_late = torch.cat([torch.arange(s + h, s + n) for s, h, n in zip(cu[:-1].tolist(), half, lengths)])
    rows_early = torch.cat([torch.arange(s, s + h) for s, h in zip(cu[:-1].tolist(), half)])
    cu_late, cu_early = bounds([n - h for n, h in zip(lengths, half)]), bounds(half)
    blocks = [(rows_early, cu_early, False), (rows_late, cu_late, True)]
    parts = [module.varlen_attention_lse(q[rows_late], k[keys], v[keys], cu_late, cu_keys, causal, scale)
             for keys, cu_keys, causal in blocks]
    lse = torch.logsumexp(torch.stack([part_lse for _, part_lse in parts]), 0)
    out = sum(part_out * (part_lse - lse).exp()[..., None] for part_out, part_lse in parts)
    close(out, want.detach()[rows_late], rel=2 ** -7)
    dq = torch.zeros(q.shape)
    dk, dv = torch.zeros(k.shape), torch.zeros(v.shape)
    for keys, cu_keys, causal in blocks:
        grads = module.varlen_attention_lse_backward(grad_out[rows_late], q[rows_late], k[keys], v[keys], out, lse,
                                                     cu_late, cu_keys, causal, scale)
        dq[rows_late] += grads[0].float()
        dk[keys] += grads[1].float()
        dv[keys] += grads[2].float()
    # the late queries' attention is all of these two blocks (the early queries' is another ring step)
    close(dq[rows_late], whole[0].grad[rows_late], rel=2 ** -6)
    assert [call[0] for call in calls] == ['forward', 'forward', 'backward', 'backward']
    assert dk.abs().sum() > 0 and dv.abs().sum() > 0


@pytest.mark.parametrize('name', ['flash', 'npu'])
def test_fused_blocks_hand_what_they_cannot_express_to_the_reference_and_say_why(monkeypatch, name, twinkle_logs):
    from twinkle.kernels.varlen_attention import sdpa
    monkeypatch.setattr(sdpa, '_warned', set())
    calls = []
    module = _install(monkeypatch, name, calls)
    q = randn(8, 2, 4, dtype=torch.bfloat16)
    expected = kernels.varlen_attention_lse(q, q, q, bounds([3, 5]), bounds([5, 3]), causal=True,
                                            backend='reference')
    got = module.varlen_attention_lse(q, q, q, bounds([3, 5]), bounds([5, 3]), True, 4 ** -0.5)
    close(got[0], expected[0])
    assert 'aligns causal masks bottom-right' in twinkle_logs.text and not calls
    got32 = module.varlen_attention_lse(q.float(), q.float(), q.float(), bounds([8]), bounds([8]), False, 0.5)
    assert 'fp16/bf16 only' in twinkle_logs.text and not calls and got32[0].dtype == torch.float32
    out, lse = module.varlen_attention_lse(q, q[:5], q[:5], bounds([3, 5]), bounds([5, 0]), False, 0.5)
    assert torch.equal(out[3:], torch.zeros(5, 2, 4)) and bool((lse[3:] == float('-inf')).all())  # no keys


def test_cuda_and_npu_select_their_fused_blocks():
    from twinkle.kernels import registry
    assert registry._op('varlen_attention_lse').priority['cuda'][0] == 'flash_attn'
    assert registry._op('varlen_attention_lse').priority['npu'][0] == 'npu'
