"""Expert parallelism on gloo with 2 CPU processes: the tiny Qwen3-MoE computes the same logits,
loss and gradients as one process, also when one rank receives no tokens."""
import pytest
import torch

from twinkle import DeviceMesh
from twinkle.parallel.expert_parallel import apply_expert_parallel

from .ep_job import build_model, launch, single_process

RTOL = 1e-5  # fp32 on both sides; only summation orders differ: relative to each tensor's scale
RANKS = 2


@pytest.fixture(scope='module')
def ep_ranks(tmp_path_factory):
    return launch(RANKS, tmp_path_factory.mktemp('ep'))


def assert_matches_single_process(results, expected):
    torch.testing.assert_close(sum(r['loss_sum'] for r in results), expected['loss_sum'], rtol=RTOL, atol=0)
    for rank, result in enumerate(results):
        assert_close_to_scale(result['logits'], expected['logits'][rank::RANKS], 'logits')
        assert set(result['grads']) == set(expected['grads'])
        for name, grad in result['grads'].items():
            full = expected['grads'][name]
            if name in result['expert_grad_names']:
                first, local = result['first_experts'][0], result['local_experts'][0]
                full = full[first:first + local]
            assert_close_to_scale(grad, full, name)


def assert_close_to_scale(actual, expected, name):
    """max |actual - expected| <= RTOL x max |expected| (an absolute bound on fp32 logits flakes)."""
    assert actual.shape == expected.shape, name
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    error = float((actual - expected).abs().max()) if expected.numel() else 0.0
    assert error <= RTOL * scale, f'{name}: max error {error:.3g} > {RTOL} x scale {scale:.3g}'


def test_each_rank_holds_its_half_of_the_experts(ep_ranks):
    owned = [(r['random']['first_experts'], r['random']['local_experts']) for r in ep_ranks]
    assert owned == [([0, 0], [2, 2]), ([2, 2], [2, 2])]  # two MoE layers, 4 experts
    for result in ep_ranks:
        assert {result['random']['grads'][name].shape[0] for name in result['random']['expert_grad_names']} == {2}


def test_ep_two_ranks_equals_one_process(ep_ranks):
    assert_matches_single_process([r['random'] for r in ep_ranks], single_process())


def test_rank_without_tokens_still_completes_and_matches(ep_ranks):
    forced = [r['forced'] for r in ep_ranks]
    assert_matches_single_process(forced, single_process(forced=True))
    rank1 = forced[1]
    for name in rank1['expert_grad_names']:  # experts 2 and 3 got no tokens
        assert not rank1['grads'][name].any(), name


def test_dispatch_sends_exactly_the_routed_rows(ep_ranks):
    for result in ep_ranks:
        for kind in ('random', 'forced'):
            assert result[kind]['dispatched_bytes'] == result[kind]['routed_bytes'] > 0


def test_uneven_all_to_all_and_its_gradient(ep_ranks):
    rank0, rank1 = (r['exchange'] for r in ep_ranks)
    # rank r sent r + 1 rows of value r to rank 0 only
    torch.testing.assert_close(rank0['received'], torch.tensor([[0.] * 3, [1.] * 3, [1.] * 3]))
    assert rank0['recv_counts'].tolist() == [1, 2] and rank1['recv_counts'].tolist() == [0, 0]
    assert rank1['received'].shape == (0, 3)
    for rank, result in enumerate((rank0, rank1)):  # combine returns 2 x own rows; d/drows of (r+1)*sum(2 rows)
        torch.testing.assert_close(result['back'], torch.full((rank + 1, 3), 2.0 * rank))
        torch.testing.assert_close(result['grad'], torch.full((rank + 1, 3), 2.0 * (rank + 1)))
        assert result['bad_counts_error'].startswith('send_counts must have dim 0 equal to the 2 ranks')


def test_ep_size_not_dividing_experts_raises():
    with pytest.raises(ValueError, match=r'ep_size=3.*num_experts=4'):
        apply_expert_parallel(build_model(), DeviceMesh.from_sizes(ep_size=3))


def test_ep_needs_fused_experts_and_must_come_before_peft():
    from peft import LoraConfig, get_peft_model
    with pytest.raises(ValueError, match=r'ep_size=2 but Linear has no fused MoE experts'):
        apply_expert_parallel(torch.nn.Linear(2, 2), DeviceMesh.from_sizes(ep_size=2))
    wrapped = get_peft_model(build_model(), LoraConfig(r=2, target_parameters=['mlp.experts.gate_up_proj']))
    with pytest.raises(ValueError, match='apply_expert_parallel before get_peft_model'):
        apply_expert_parallel(wrapped, DeviceMesh.from_sizes(ep_size=2))
