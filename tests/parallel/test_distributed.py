"""FSDP2 and HSDP on gloo with CPU processes under torchrun: the same losses as one process,
checkpoints that move between world sizes, exact resume, and named errors for stalls."""
import json

import pytest
import torch
from transformers import Qwen3ForCausalLM

from twinkle import DeviceMesh
from twinkle.parallel import load_sharded

from .jobs import STALL_TIMEOUT, STEPS, Trainer, build_model, launch, local_parameter_bytes, probe_input

# fp32 on both sides; only the order of the cross-rank sums differs.
RTOL = 1e-5


@pytest.fixture(scope='module')
def single_process():
    mesh = DeviceMesh.from_sizes()
    return {'full': Trainer(mesh).run(STEPS), 'lora': Trainer(mesh, lora=True).run(STEPS)}


@pytest.fixture(scope='module')
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp('fsdp')
    return out, launch('fsdp', 2, out)


@pytest.fixture(scope='module')
def four_ranks(tmp_path_factory):
    return launch('hsdp', 4, tmp_path_factory.mktemp('hsdp'))


def assert_same_trajectory(got, expected):
    for key in ('loss', 'grad_norm'):
        torch.testing.assert_close(torch.tensor(got[key]), torch.tensor(expected[key]), rtol=RTOL, atol=0, msg=key)


def assert_ranks_split_each_batch(results, kind, expected):
    """Equal losses alone would not show it: every rank reading the whole batch gives them too."""
    for step, global_rows in enumerate(expected[kind]['rows']):
        slices = [result[kind]['rows'][step] for result in results]
        assert sorted(sum(slices, [])) == sorted(global_rows), f'step {step}: {slices}'


@pytest.mark.parametrize('kind', ['full', 'lora'])
def test_fsdp_two_ranks_trains_like_one_process(two_ranks, single_process, kind):
    _, results = two_ranks
    assert 'fsdp_size=2' in results[0]['placement'] and '0*' in results[0]['placement']
    for rank_result in results:
        assert_same_trajectory(rank_result[kind], single_process[kind])
    assert_ranks_split_each_batch(results, kind, single_process)


def test_fsdp_shards_parameters(two_ranks):
    _, results = two_ranks
    unsharded = local_parameter_bytes(build_model())
    for rank_result in results:  # half of each weight, plus padding of odd row counts
        assert unsharded / 2 <= rank_result['full_param_bytes'] < 0.52 * unsharded


@pytest.mark.parametrize('kind', ['full', 'lora'])
def test_hsdp_four_ranks_trains_like_one_process(four_ranks, single_process, kind):
    assert sorted(result['data_rank'] for result in four_ranks) == [0, 1, 2, 3]
    assert 'dp_size=2 x fsdp_size=2' in four_ranks[0]['placement']
    for rank_result in four_ranks:
        assert_same_trajectory(rank_result[kind], single_process[kind])
    assert_ranks_split_each_batch(four_ranks, kind, single_process)


def test_bf16_policy_computes_in_bf16_and_keeps_fp32_weights(two_ranks, single_process):
    _, results = two_ranks
    assert results[0]['bf16_dtypes'] == {'stored': 'torch.float32', 'logits': 'torch.bfloat16'}
    got, expected = torch.tensor(results[0]['bf16']['loss']), torch.tensor(single_process['full']['loss'][:2])
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=0)  # bf16 logits: ~3 significant digits
    assert not torch.equal(got, expected)


def test_full_checkpoint_saved_on_two_ranks_loads_on_one(two_ranks):
    out, _ = two_ranks
    model = Qwen3ForCausalLM.from_pretrained(out / 'full_checkpoint').eval()
    with torch.no_grad():
        logits = model(input_ids=probe_input()).logits
    torch.testing.assert_close(logits, torch.load(out / 'full_logits.pt'), rtol=0, atol=1e-5)
    assert not list(out.glob('*.tmp-*')), 'staging directory left behind'


def test_lora_checkpoint_holds_adapter_only_and_loads_on_one(two_ranks):
    from peft import PeftModel
    out, _ = two_ranks
    files = {path.name for path in (out / 'lora_checkpoint').iterdir()}
    assert {'adapter_model.safetensors', 'adapter_config.json'} <= files and 'model.safetensors' not in files
    model = PeftModel.from_pretrained(build_model(), out / 'lora_checkpoint').eval()
    with torch.no_grad():
        logits = model(input_ids=probe_input()).logits
    torch.testing.assert_close(logits, torch.load(out / 'lora_logits.pt'), rtol=0, atol=1e-5)


def test_sharded_resume_reproduces_the_uninterrupted_run_exactly(two_ranks):
    _, results = two_ranks
    for rank_result in results:
        assert rank_result['resumed'] == rank_result['uninterrupted']  # losses, norms and data rows


def test_sharded_checkpoint_saved_on_two_ranks_loads_on_one(two_ranks):
    out, _ = two_ranks
    trainer = Trainer(DeviceMesh.from_sizes(), seed=99, attention_dropout=0.2)
    extra_state = load_sharded(str(out / 'sharded'), trainer.model, trainer.optimizer)
    assert extra_state['dataloader']['consumed_samples'] == 12  # 3 global batches of 4
    assert trainer.optimizer.state_dict()['state'][0]['step'].item() == 3
    torch.testing.assert_close(trainer.probe_logits(), torch.load(out / 'sharded_logits.pt'), rtol=0, atol=1e-5)


def test_stalled_rank_fails_the_job_with_a_named_error(tmp_path):
    results = launch('stall', 2, tmp_path)
    error, seconds = results[0]['error'], results[0]['seconds']
    assert error is not None, 'the stalled collective returned'
    assert "'all_reduce_sum'" in error and 'rank 0 of 2' in error
    assert "rank 1 last entered 'initialize #1'" in error
    assert 0.8 * STALL_TIMEOUT <= seconds < STALL_TIMEOUT + 3, json.dumps(results[0])


def test_the_data_group_reaches_the_data_ranks_only(tmp_path):
    """dp=2 x tp=2: ranks 0,2 and 1,3 read different data (tp innermost), so each data-group sum has
    exactly the ranks of one tp coordinate; the world sum has all four."""
    results = launch('data_group', 4, tmp_path, timeout=120)
    assert [r['data_rank'] for r in results] == [0, 0, 1, 1]
    assert [r['data_sum'] for r in results] == [101, 1010, 101, 1010]
    assert {r['world_sum'] for r in results} == {1111}
