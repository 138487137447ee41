"""The megatron-core CPU shim: a tiny GPTModel at tp=2 with sequence parallelism, and at pp=2 through
Megatron's pipeline schedule, on 2 gloo ranks computes the logits, loss and gradients of the same
model at tp=1 (fp32: 1e-5 of each tensor's scale); the patches are recorded and logged once, and
the shim refuses any process that is not CPU-only."""
import sys

import megatron.core  # noqa: F401  (the suite installs the megatron extra)
import pytest
import torch

from twinkle.model.megatron import apply_cpu_shim, applied_patches, require_megatron

from .gpt_job import SEED

PATCHES = ('cuda_device_is_cpu', 'cpu_rng_tracker', 'cpu_causal_mask')  # what this job's paths need
SCALE_RTOL = 1e-5  # fp32; only the order of the tp sums differs


def assert_close_to_scale(got, expected, what):
    torch.testing.assert_close(got, expected, rtol=0, atol=SCALE_RTOL * expected.abs().max().item(), msg=what)


def assert_gradients_match(run, what):
    assert run['grads'].keys() == run['reference_grads'].keys()
    for name, grad in run['grads'].items():
        assert grad.shape == run['reference_grads'][name].shape, name
        assert grad.abs().max() > 0, f'{what} {name}: no gradient reached it'
        assert_close_to_scale(grad, run['reference_grads'][name], f'{what} {name}')


@pytest.mark.parametrize('rank', [0, 1])
def test_tp2_sequence_parallel_equals_tp1(gpt_job, rank):
    result = gpt_job[0][rank]
    run = result['tp2']
    assert run['logits'].shape == result['reference_logits'].shape == (2, 8, 128)
    assert_close_to_scale(run['logits'], result['reference_logits'], 'logits')
    assert_close_to_scale(run['loss'], result['reference_loss'], 'loss')
    assert_gradients_match(run, 'tp=2')


def test_tp2_shards_weights(gpt_job):
    """Each rank holds half of every tensor-parallel weight (the equality above is not two full copies)."""
    shard = gpt_job[0][0]['tp2']['grads']
    assert shard['embedding.word_embeddings.weight'].shape == (64, 64)
    assert shard['decoder.layers.0.self_attention.linear_qkv.weight'].shape == (2 * 16 + 2 * 16, 64)
    assert shard['decoder.layers.0.mlp.linear_fc2.weight'].shape == (64, 64)


def test_both_ranks_agree(gpt_job):
    first, second = (result['tp2'] for result in gpt_job[0])
    assert torch.equal(first['logits'], second['logits'])
    assert torch.equal(first['loss'], second['loss'])


@pytest.mark.parametrize('rank', [0, 1])
def test_pp2_schedule_equals_tp1(gpt_job, rank):
    """Megatron's 1F1B schedule over 2 micro-batches (p2p over gloo): each stage holds its own layers
    (stage 0 the embedding, stage 1 the output layer) with the tp=1 gradients of those layers, and
    the last stage's micro-batch losses average to the tp=1 loss."""
    result = gpt_job[0][rank]
    run = result['pp2']
    assert_gradients_match(run, f'pp stage {rank}')
    held = run['grads'].keys()
    assert ('embedding.word_embeddings.weight' in held) == (rank == 0)
    assert ('output_layer.weight' in held) == (rank == 1)
    if rank == 1:
        assert len(run['microbatch_losses']) == 2
        assert_close_to_scale(torch.stack(run['microbatch_losses']).mean(), result['reference_loss'], 'pp loss')
    else:
        assert run['microbatch_losses'] == []


def test_applied_patches_are_recorded_and_logged_once(gpt_job):
    results, stderr = gpt_job
    applied = results[0]['patches']
    assert set(PATCHES) <= set(applied)  # the shim may hold more, for paths this job does not take
    for result in results:
        assert result['patches'] == result['patches_again'] == result['applied_at_end'] == applied
    for name in applied:
        lines = [line for line in stderr.splitlines() if f'megatron-core CPU shim: {name} (' in line]
        assert len(lines) == 1 and lines[0].startswith('[rank0]'), (name, lines)


def test_rng_tracker_forks_cpu_states_per_tp_rank(gpt_job):
    """Megatron seeds the tensor-parallel state with seed + 2718 + tp_rank; a fork draws from it and
    continues it next time, and leaves the default generator where it was."""
    draws = [result['rng'] for result in gpt_job[0]]
    for tp_rank, draw in enumerate(draws):
        expected = torch.rand(8, generator=torch.Generator().manual_seed(SEED + 2718 + tp_rank))
        torch.testing.assert_close(torch.cat([draw['first'], draw['second']]), expected, rtol=0, atol=0)
        assert draw['default_untouched']
    assert not torch.equal(draws[0]['first'], draws[1]['first'])


def test_refuses_a_device_that_is_not_cpu():
    before = applied_patches()
    with pytest.raises(ValueError, match="device_type='cuda'.*'cpu' only"):
        apply_cpu_shim('cuda')
    assert applied_patches() == before


def test_refuses_a_process_that_sees_cuda(monkeypatch):
    before = applied_patches()
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    with pytest.raises(RuntimeError, match='never patch megatron-core on a GPU'):
        apply_cpu_shim('cpu')
    assert applied_patches() == before


def test_missing_megatron_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, 'megatron.core', None)
    with pytest.raises(ImportError, match=r"pip install 'twinkle\[megatron\]'"):
        require_megatron()
