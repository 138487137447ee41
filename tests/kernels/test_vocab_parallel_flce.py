"""vocab_parallel_fused_linear_cross_entropy on gloo process groups (tests/kernels/vocab_parallel_flce_job.py):
loss and gradients (hidden, each rank's weight shard) equal ``F.cross_entropy(hidden @ W_full.T)``
forward and backward, on 2 ranks, on a group of one rank, and on 3 ranks whose padded vocabulary
does not divide (``vocab_size`` masks the padding rows); no tensor of any rank reaches N x V_r,
let alone N x V; inputs the ranks disagree on raise the same ValueError on every rank, and a
rank that never calls is named in its peer's CollectiveTimeout.

Tolerances, relative to the reference's scale (max|got - want| <= tol * max|want|): fp32 1e-5
(measured <= 7e-7); bf16 2e-2 (measured <= 7e-3: the op multiplies in bf16, so its logits are
rounded once to bf16 where the reference upcasts first, and dH is summed over the ranks in bf16).
A reference that is exactly 0 (ignored tokens, padding rows) must be exactly 0. One launch per
world size serves every test of it.
"""
import pytest
import torch

from tests.parallel.ep_job import launch
from twinkle.kernels.fused_linear_cross_entropy import vocab_parallel_fused_linear_cross_entropy

JOB = 'tests.kernels.vocab_parallel_flce_job'
TOLERANCE = {'torch.float32': 1e-5, 'torch.bfloat16': 2e-2}
GRADS = ('hidden_grad', 'weight_grad')


@pytest.fixture(scope='module')
def two_ranks(tmp_path_factory):
    return launch(2, tmp_path_factory.mktemp('vp_flce_2'), JOB, 'two_ranks', timeout=300)


@pytest.fixture(scope='module')
def three_ranks(tmp_path_factory):
    return launch(3, tmp_path_factory.mktemp('vp_flce_3'), JOB, 'three_ranks', timeout=300)


def assert_close_to_scale(got: torch.Tensor, want: torch.Tensor, tolerance: float, what: str) -> None:
    assert got.shape == want.shape, (what, got.shape, want.shape)
    if not want.numel():
        return
    error = (got.float() - want.float()).abs().max().item()
    scale = want.abs().max().item()
    assert error <= tolerance * scale, f'{what}: max error {error:.3g} > {tolerance} x scale {scale:.3g}'


def assert_matches_reference(ranks, name: str, partial_hidden_grad: bool = False) -> None:
    """Every rank's loss and gradients against the reference; the loss and the (reduced) hidden
    gradient are bitwise the same on every rank."""
    cases = [rank['cases'][name] for rank in ranks]
    tolerance = TOLERANCE[cases[0]['dtype']]
    dtype = getattr(torch, cases[0]['dtype'].split('.')[1])
    for rank, case in enumerate(cases):
        got, want = case['op'], case['reference']
        assert got['loss'].dtype == torch.float32
        assert_close_to_scale(got['loss'], want['loss'], tolerance, f'{name} rank {rank} loss')
        assert torch.equal(got['loss'], cases[0]['op']['loss']), f'{name}: rank {rank} has another loss'
        for grad in GRADS:
            if want[grad] is None:
                assert got[grad] is None, (name, grad)
                continue
            assert got[grad].dtype == dtype, (name, grad, got[grad].dtype)
            if grad == 'hidden_grad' and partial_hidden_grad:
                continue
            assert_close_to_scale(got[grad], want[grad], tolerance, f'{name} rank {rank} {grad}')
            if grad == 'hidden_grad':
                assert torch.equal(got[grad], cases[0]['op'][grad]), f'{name}: rank {rank} has another dH'


def names(ranks, prefix: str):
    found = [name for name in ranks[0]['cases'] if name.startswith(prefix)]
    assert found, prefix
    return found


@pytest.mark.parametrize('prefix', ['mean-', 'sum-', 'none-', 'batched', 'ignore-index-0', 'bf16-'])
def test_two_ranks_equal_full_vocab_cross_entropy(two_ranks, prefix):
    """13 tokens (30% ignored), H=33, V=50 in shards of 25; default and 4-token chunks; (2, 7) tokens."""
    for name in names(two_ranks, prefix):
        assert_matches_reference(two_ranks, name)


@pytest.mark.parametrize('kind', ['all-ignored', 'empty'])
def test_no_counted_tokens_give_zero_loss_and_gradients(two_ranks, kind):
    for name in names(two_ranks, kind):
        assert_matches_reference(two_ranks, name)
        for rank in two_ranks:
            op = rank['cases'][name]['op']
            assert bool((op['loss'] == 0).all()) and not torch.isnan(op['loss']).any(), (name, op['loss'])
            assert all(bool((op[grad] == 0).all()) for grad in GRADS), name
            if kind == 'empty':
                assert op['hidden_grad'].shape == (0, 33) and op['weight_grad'].shape == (25, 33)


def test_hidden_gradient_left_partial_sums_to_the_full_one(two_ranks):
    """reduce_grad_hidden=False: each rank returns G_r @ W_r, which the caller's op must sum."""
    for name in names(two_ranks, 'partial-hidden-grad-'):
        assert_matches_reference(two_ranks, name, partial_hidden_grad=True)
        partials = [rank['cases'][name]['op']['hidden_grad'] for rank in two_ranks]
        want = two_ranks[0]['cases'][name]['reference']['hidden_grad']
        assert_close_to_scale(sum(partials), want, 1e-5, f'{name} summed over ranks')
        assert (partials[0] - want).abs().max() > 0.1 * want.abs().max(), f'{name}: rank 0 alone is not partial'


def test_frozen_inputs_get_no_gradient(two_ranks):
    for name in ('frozen-weight', 'frozen-hidden'):
        assert_matches_reference(two_ranks, name)


def test_group_of_one_rank_holds_the_whole_head(two_ranks):
    for name in names(two_ranks, 'one-rank-'):
        assert_matches_reference(two_ranks, name)


@pytest.mark.parametrize('prefix', ['padded-', 'padding-shard', 'divides'])
def test_three_ranks_padded_vocabulary(three_ranks, prefix):
    """V=10 padded to 12 (shards of 4), V=5 padded to 12 (rank 2 holds padding only), V=12 unpadded.
    The padding rows are 30x larger than the others: unmasked, they would take the probability."""
    for name in names(three_ranks, prefix):
        assert_matches_reference(three_ranks, name)
    padding_only = three_ranks[2]['cases']['padding-shard-sum']['op']['weight_grad']
    assert bool((padding_only == 0).all())
    assert bool((three_ranks[1]['cases']['padding-shard-sum']['op']['weight_grad'][1:] == 0).all())


def test_no_rank_allocates_n_by_v(two_ranks):
    """Largest tensor any op produced in forward + backward (64 tokens, H=8, V=96, shards of 48):
    16-row chunks, and the default sizing under a 16-row budget, stay at one 16 x 48 chunk; the
    reference, the negative control, holds the 64 x 96 logits. GEMMs: three per chunk of 'sum' in
    forward (none in backward), one per chunk under no_grad."""
    for rank in two_ranks:
        found = rank['memory']
        assert found['reference']['numel'] == 64 * 96, found
        for run in ('chunk16', 'budget16', 'no_grad'):
            assert found[run]['numel'] <= 16 * 48, (run, found[run])
        assert found['chunk16']['gemms'] == 3 * 4 and found['no_grad']['gemms'] == 4, found
        assert found['budget16']['gemms'] == 4 + 3 * 4, found  # 'none' recomputes the logits in backward


def test_ranks_that_disagree_all_raise_naming_the_argument(two_ranks):
    errors = [rank['errors'] for rank in two_ranks]
    assert errors[0] == errors[1]  # the same error on every rank: none is left waiting
    found = errors[0]
    expected = {'tokens': 'hidden:', 'shard_rows': 'weight_shard:', 'overlap': 'vocab_start:', 'gap': 'vocab_start:',
                'vocab_size': 'vocab_size=9', 'reduction': "reduction:", 'other_labels': 'labels:',
                'label_range': 'labels:', 'backward_twice': 'cannot run twice'}
    for key, start in expected.items():
        assert found[key] is not None and start in found[key], (key, found[key])
    assert "['mean', 'sum']" in found['reduction']
    assert found['other_labels_unchecked'] is None  # the labels' fingerprint is a value check


def test_a_peer_that_never_calls_is_named(two_ranks):
    """Rank 1 skips the call: rank 0 gets a CollectiveTimeout naming the op and rank 1."""
    error = two_ranks[0]['stall']
    assert "'vocab_parallel_fused_linear_cross_entropy forward'" in error, error
    assert 'rank 1 last entered' in error, error


def _inputs(**changes):
    kwargs = dict(hidden=torch.randn(5, 8), weight_shard=torch.randn(4, 8), labels=torch.zeros(5, dtype=torch.long),
                  group=None, vocab_start=0)
    kwargs.update(changes)
    return kwargs


BAD_INPUTS = {
    'hidden': [dict(hidden=torch.ones(5, 8, dtype=torch.long)), dict(hidden=[[1.0]])],
    'weight_shard': [dict(weight_shard=torch.randn(4)), dict(weight_shard=torch.randn(4, 7)),
                     dict(weight_shard=torch.randn(4, 8, dtype=torch.float64)), dict(weight_shard=torch.randn(0, 8))],
    'labels': [dict(labels=torch.zeros(5)), dict(labels=torch.zeros(5, dtype=torch.bool)),
               dict(labels=torch.zeros(4, dtype=torch.long))],
    'vocab_start': [dict(vocab_start=-1), dict(vocab_start=1.0), dict(vocab_start=True)],
    'vocab_size': [dict(vocab_size=0), dict(vocab_size=10.0)],
    'ignore_index': [dict(ignore_index=None)],
    'reduction': [dict(reduction='avg')],
    'chunk_size': [dict(chunk_size=0), dict(chunk_size=2.5)],
    'reduce_grad_hidden': [dict(reduce_grad_hidden=1)],
    'group': [dict()],  # valid inputs, but no process group in this process
}


@pytest.mark.parametrize('argument,changes', [(name, change) for name, changes in BAD_INPUTS.items()
                                              for change in changes])
def test_bad_input_names_the_argument(argument, changes):
    assert not torch.distributed.is_initialized()
    kwargs = _inputs(**changes)
    with pytest.raises(ValueError, match=argument):
        vocab_parallel_fused_linear_cross_entropy(kwargs.pop('hidden'), kwargs.pop('weight_shard'),
                                                  kwargs.pop('labels'), **kwargs)
