"""TransformersModel with context parallelism (gloo, CPU, fp32): the tiny Qwen3 at cp=2, ulysses=2
(2 ranks), ulysses=2 x cp=2 and FSDP2 fsdp=2 x cp=2 (4 ranks), and the tiny Qwen3-MoE at
ep=2 x ulysses=2, equal one process on padded and packed batches of uneven samples -- losses of
five steps, every gradient of the first (each EP rank: its experts' slice), the logits of a
probe batch (1e-5 of scale) -- and each attention module receives only its rank's shard. Refusals run in one
process: an attention implementation that cannot shard, heads Ulysses cannot split, left padding."""
import pytest
import torch

from tests.model.cp_job import LENGTHS, PROBE
from tests.parallel.ep_job import launch
from twinkle import DeviceMesh
from twinkle.model import TransformersModel
from twinkle.parallel.context_parallel_model import shard_batch
from twinkle.parallel.sequence_shards import shard_sequences

JOB = 'tests.model.cp_job'
LAYOUTS = {  # name -> cp, ulysses, fsdp, ep, model
    'cp2': (2, 1, 1, 1, 'dense'), 'ulysses2': (1, 2, 1, 1, 'dense'), 'cp2_ulysses2': (2, 2, 1, 1, 'dense'),
    'fsdp2_cp2': (2, 1, 2, 1, 'dense'), 'ep2_ulysses2': (1, 2, 1, 2, 'moe'),
}
TWINS = {'dense': (1, 1, 1, 1, 'dense'), 'moe': (1, 1, 1, 1, 'moe')}


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    results = {}
    for name, (cp, ulysses, fsdp, ep, model) in {**TWINS, **LAYOUTS}.items():
        results[name] = launch(cp * ulysses * fsdp * ep, tmp_path_factory.mktemp(name), JOB,
                               *map(str, (cp, ulysses, fsdp, ep, model)), timeout=600)
    return results


def close(got, want, rel=1e-5):
    assert got.shape == want.shape
    assert (got - want).abs().max() <= rel * want.abs().max()


def padded_length(lengths, cp, ulysses, packed):
    rows = [list(lengths)] if packed else [[n] for n in lengths]
    return shard_sequences(rows, sum(lengths) if packed else max(lengths), cp=cp, ulysses=ulysses).padded_length


@pytest.mark.slow
@pytest.mark.parametrize('layout', list(LAYOUTS))
@pytest.mark.parametrize('kind', ['padded', 'packed'])
def test_ranks_equal_one_process(runs, layout, kind):
    one = runs[LAYOUTS[layout][-1]][0][kind]
    for rank in runs[layout]:
        result = rank[kind]
        close(torch.tensor(result['losses']), torch.tensor(one['losses']))
        assert result['grads'].keys() == one['grads'].keys()
        for name, grad in one['grads'].items():
            local = result['grads'][name]
            if local.shape != grad.shape:  # an EP rank's experts
                grad = grad[result['ep_rank'] * local.shape[0]:(result['ep_rank'] + 1) * local.shape[0]]
            close(local, grad)
    logits = torch.zeros_like(one['probe_logits'])
    for rank in runs[layout]:
        source, local = rank[kind]['probe_source'], rank[kind]['probe_logits']
        rows = torch.arange(source.shape[0])[:, None].expand_as(source)
        logits[rows[source >= 0], source[source >= 0]] = local[source >= 0]
    real = one['probe_logits'].abs().sum(-1) > 0 if kind == 'packed' else torch.tensor(
        [[t < n for t in range(max(PROBE))] for n in PROBE])
    close(logits[real], one['probe_logits'][real])


@pytest.mark.slow
@pytest.mark.parametrize('layout', list(LAYOUTS))
@pytest.mark.parametrize('kind', ['padded', 'packed'])
def test_attention_sees_only_its_shard(runs, layout, kind):
    cp, ulysses, fsdp, ep, model = LAYOUTS[layout]
    packed, data_ranks = kind == 'packed', fsdp * ep
    for rank, result in enumerate(runs[layout]):
        data_rank = rank // (cp * ulysses)  # the data dims are outer to cp and ulysses
        batches = [lengths[data_rank::data_ranks] for lengths in LENGTHS] + [PROBE]
        expected = [padded_length(lengths, cp, ulysses, packed) // (cp * ulysses) for lengths in batches]
        seen = result[kind]['seen']  # 2 layers x (5 training steps + the probe)
        assert seen == [length for length in expected for _ in range(2)], seen
    whole = [sum(lengths) if packed else max(lengths) for lengths in (*LENGTHS, PROBE)]  # one process: all of it
    assert runs[model][0][kind]['seen'] == [length for length in whole for _ in range(2)]


def test_an_attention_that_cannot_shard_is_refused(tiny_config):
    with pytest.raises(ValueError, match=r"attn_implementation='sdpa' cannot run context parallelism \(cp_size=2\)"):
        TransformersModel(config=tiny_config, device_mesh=DeviceMesh.from_sizes(cp_size=2), attn_implementation='sdpa')


def test_heads_ulysses_cannot_split_are_refused_at_load(tiny_config):
    tiny_config.num_attention_heads, tiny_config.num_key_value_heads = 3, 3
    with pytest.raises(ValueError, match='ulysses_size=2 must divide the 3 attention heads'):
        TransformersModel(config=tiny_config, device_mesh=DeviceMesh.from_sizes(ulysses_size=2))
    tiny_config.num_attention_heads, tiny_config.num_key_value_heads = 12, 3
    with pytest.raises(ValueError, match='ulysses_size=4 and the 3 key/value heads'):
        TransformersModel(config=tiny_config, device_mesh=DeviceMesh.from_sizes(ulysses_size=4))


def test_left_padding_is_refused_where_the_batch_is_built():
    batch = {'input_ids': torch.zeros(2, 4, dtype=torch.long), 'attention_mask': torch.tensor([[0, 1, 1, 1], [1] * 4])}
    with pytest.raises(ValueError, match='attention_mask row 0 is not padded on the right'):
        shard_batch(batch, DeviceMesh.from_sizes(cp_size=2))
