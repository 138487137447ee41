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
