"""The all-to-all token dispatcher on 2 CPU processes (gloo): twinkle's experts under EP equal the
same kernelized model in one process (logits, loss, gradients; also when one rank receives no
tokens); Hugging Face's experts (no kernelize) stay Hugging Face's and the log says so; one
expert-parallel layer reads the host once in forward (the split sizes) and never in backward."""
import pytest

from .ep_job import launch
from .test_expert_parallel import RANKS, assert_matches_single_process


@pytest.fixture(scope='module')
def dispatch_ranks(tmp_path_factory):
    return launch(RANKS, tmp_path_factory.mktemp('ep_dispatch'), 'tests.parallel.ep_dispatch_job')


@pytest.mark.parametrize('kind', ['random', 'forced'])
def test_all_to_all_dispatcher_on_two_ranks_equals_one_process(dispatch_ranks, kind):
    results = [r[kind]['ep'] for r in dispatch_ranks]
    assert all(result['twinkle_experts'] for result in results)
    assert [(r['first_experts'], r['local_experts']) for r in results] == [([0, 0], [2, 2]), ([2, 2], [2, 2])]
    assert_matches_single_process(results, dispatch_ranks[0][kind]['twin'])
    if kind == 'forced':  # every token picks experts 0 and 1: rank 1's experts got nothing
        for name in results[1]['expert_grad_names']:
            assert not results[1]['grads'][name].any(), name


def test_kernels_none_keeps_hugging_faces_experts_and_says_so(dispatch_ranks):
    for rank, result in enumerate(r['hf'] for r in dispatch_ranks):
        assert result['all_hf'] and not result['any_twinkle'], rank
        assert result['num_experts'] == [2, 2]  # the count each module holds, as HF's own EP sets it
        assert result['calls'] == {'hf_experts_forward': 2}, rank  # one per MoE layer; no twinkle experts
        kept = [m for m in result['messages'] if "Qwen3MoeExperts stays Hugging Face's own experts" in m]
        assert len(kept) == 1 and "'grouped_mm'" in kept[0] and 'kernelize did not replace them' in kept[0], result['messages']


def test_one_host_read_per_layer_in_forward_none_in_backward(dispatch_ranks):
    for result in (r['host_reads'] for r in dispatch_ranks):
        forward = result['forward']
        assert sum(forward.values()) == 1, forward
        assert next(iter(forward)).startswith('tolist at expert_parallel.py:'), forward
        assert result['backward'] == {}
