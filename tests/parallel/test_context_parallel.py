"""Context parallelism's attention on gloo: ulysses=2, cp=2 (2 ranks), ulysses=2 x cp=2 and cp=4 (4 ranks),
on padded, packed and padded packed rows with a 1-token sequence (shorter than the shards) and
sequences crossing the zigzag chunk boundaries. The shards' outputs and q/k/v gradients,
reassembled, equal one process's attention over the whole sequences (1e-5 of scale); each rank
holds padded length / (cp x ulysses) tokens per row; bad inputs raise before any exchange."""
import pytest
import torch

from tests.parallel.cp_attention_job import CASES, LAYOUTS, inputs
from tests.parallel.ep_job import launch
from twinkle import kernels
from twinkle.parallel.sequence_shards import shard_sequences

JOB = 'tests.parallel.cp_attention_job'
LAYOUT_CASES = [(world, cp, ulysses, case) for world, layouts in LAYOUTS.items() for cp, ulysses in layouts
                for case in CASES]


@pytest.fixture(scope='module')
def ranks(tmp_path_factory):
    return {world: launch(world, tmp_path_factory.mktemp(f'cp{world}'), JOB, timeout=300) for world in LAYOUTS}


def single_process(case):
    """Attention of every row's real sequences in one process (the reference), and its gradients."""
    length, lengths, _, _ = CASES[case]
    q, k, v, grad = inputs(case)
    real = torch.tensor([[t < sum(row) for t in range(length)] for row in lengths])
    leaves = [t[real].requires_grad_() for t in (q, k, v)]
    cu = torch.tensor([0, *torch.tensor([n for row in lengths for n in row]).cumsum(0).tolist()])
    out = kernels.varlen_attention(*leaves, cu, causal=True, backend='reference')
    out.backward(grad[real])
    return real, {'out': out.detach(), 'dq': leaves[0].grad, 'dk': leaves[1].grad, 'dv': leaves[2].grad}


def close(got, want, rel=1e-5):
    assert got.shape == want.shape
    assert (got - want).abs().max() <= rel * want.abs().max()


@pytest.mark.parametrize('world, cp, ulysses, case', LAYOUT_CASES,
                         ids=[f'cp{cp}-ulysses{u}-{case}' for _, cp, u, case in LAYOUT_CASES])
def test_shards_equal_one_process(ranks, world, cp, ulysses, case):
    length, lengths, _, _ = CASES[case]
    shards = shard_sequences(lengths, length, cp=cp, ulysses=ulysses)
    results = [r[f'cp{cp}_ulysses{ulysses}'][case] for r in ranks[world]]
    real, want = single_process(case)
    for name, expected in want.items():
        close(shards.unshard([r[name] for r in results])[real], expected)
    assert all(r['local_length'] == shards.padded_length // (cp * ulysses) for r in results)


@pytest.mark.parametrize('world, cp, ulysses', [(w, cp, u) for w, layouts in LAYOUTS.items() for cp, u in layouts])
def test_bad_inputs_are_refused_before_any_exchange(ranks, world, cp, ulysses):
    for errors in (r[f'cp{cp}_ulysses{ulysses}']['errors'] for r in ranks[world]):
        if ulysses > 1:
            assert 'ulysses_size=2 must divide the 3 attention heads' in errors['heads']
        else:
            assert errors['heads'] == ''  # no head split without Ulysses
        assert f'laid out for cp=3 x ulysses=1, but the groups have cp={cp} x ulysses={ulysses}' in errors['layout']
        assert 'query must be (rows, local_length, heads, dim)' in errors['shape']
