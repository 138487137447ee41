"""Four tenants at once on one base model: each gets what it gets alone; none can reach another's things."""
import concurrent.futures

import pytest
import requests
import torch

from twinkle import assets
from twinkle.dataset import Dataset, DatasetMeta
from twinkle_client import ServiceError, TwinkleClient
from twinkle_client.model import MultiLoraTransformersModel

from .conftest import RunningServer, make_config
from .tenant_jobs import JOBS, adapter_tensors


@pytest.fixture(scope='module')
def features():
    dataset = Dataset(dataset_meta=DatasetMeta(assets.self_cognition_path(), data_slice=range(12)))
    dataset.set_template('Qwen3_5Template', model_id=assets.tiny_model_path('qwen3'), max_length=128)
    dataset.map('SelfCognitionProcessor', init_args={'model_name': 'twinkle', 'model_author': 'us'})
    dataset.encode(batched=True)
    return [{key: dataset[i][key] for key in ('input_ids', 'labels')} for i in range(len(dataset))]


def run_all(server, features, concurrently: bool):
    clients = {key: TwinkleClient(server.url, key) for key in JOBS}
    if not concurrently:
        return {key: job(clients[key], features) for key, job in JOBS.items()}
    with concurrent.futures.ThreadPoolExecutor(len(JOBS)) as pool:
        futures = {key: pool.submit(job, clients[key], features) for key, job in JOBS.items()}
        return {key: future.result(timeout=600) for key, future in futures.items()}


def test_four_tenants_at_once_each_end_with_the_adapter_they_get_alone(server, features, tmp_path):
    together = run_all(server, features, concurrently=True)
    with RunningServer(make_config(tmp_path)) as alone_server:
        alone = run_all(alone_server, features, concurrently=False)
    for key in JOBS:
        assert together[key].get('losses') == alone[key].get('losses'), key  # bit for bit: see the note
        assert together[key].get('tokens') == alone[key].get('tokens'), key
        assert together[key].get('logprobs') == alone[key].get('logprobs'), key
        if 'path' in together[key]:
            mine = adapter_tensors(server.config.checkpoint_dir, together[key]['path'])
            theirs = adapter_tensors(alone_server.config.checkpoint_dir, alone[key]['path'])
            assert mine.keys() == theirs.keys() and mine
            for name in mine:
                assert torch.equal(mine[name], theirs[name]), (key, name)
    ranks = {key: {t.shape[0] for n, t in adapter_tensors(server.config.checkpoint_dir, together[key]['path']).items()
                   if 'lora_A' in n} for key in ('key-a', 'key-b')}
    assert ranks == {'key-a': {8}, 'key-b': {32}}


def test_a_tenant_cannot_read_load_sample_with_or_delete_another_tenants_things(server, features):
    alice, bob = TwinkleClient(server.url, 'key-a'), TwinkleClient(server.url, 'key-b')
    mine = MultiLoraTransformersModel(client=alice)
    mine.add_adapter_to_model('private', {'r': 4, 'lora_alpha': 8})
    path = mine.save(name='private-ckpt')
    before = adapter_tensors(server.config.checkpoint_dir, path)
    theirs = MultiLoraTransformersModel(client=bob)
    for call, status in ((lambda: theirs.get_train_configs(adapter_name='private'), 404),
                         (lambda: theirs.forward_backward(features[:1], adapter_name='private'), 404),
                         (lambda: bob.delete_checkpoint('private-ckpt'), 404),
                         (lambda: bob.request('DELETE', '/v1/adapters/private'), 404),
                         (lambda: bob.request('POST', '/v1/sample', {'inputs': [{'input_ids': [1, 2]}],
                                                                      'adapter_uri': path}), 403)):
        with pytest.raises(ServiceError) as raised:
            call()
        assert raised.value.status == status, raised.value
    theirs.add_adapter_to_model('private', {'r': 4, 'lora_alpha': 8})
    with pytest.raises(ServiceError, match='403'):
        theirs.load(path, adapter_name='private')
    theirs.save(name='private-ckpt', adapter_name='private')  # bob's own namespace: alice's stays as it was
    after = adapter_tensors(server.config.checkpoint_dir, path)
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert [c['name'] for c in alice.list_checkpoints()].count('private-ckpt') == 1
    assert 'private' in [a['name'] for a in alice.list_adapters()]


def test_a_key_for_no_tenant_or_no_key_is_401(server):
    for headers in ({}, {'Authorization': 'Bearer not-a-key'}, {'X-API-Key': ''}):
        assert requests.get(f'{server.url}/v1/adapters', headers=headers, timeout=30).status_code == 401
    assert requests.get(f'{server.url}/v1/health', timeout=30).status_code == 200


def test_quotas_and_bad_values_answer_4xx_naming_the_field(server):
    client = TwinkleClient(server.url, 'key-d')
    with pytest.raises(ServiceError, match=r"lora.r=128 is above this server's max_rank=64"):
        client.request('POST', '/v1/adapters', {'name': 'big', 'lora': {'r': 128}})
    with pytest.raises(ServiceError) as raised:
        client.request('POST', '/v1/adapters', {'name': 'x', 'lora': {'r': 'eight'}})
    assert raised.value.status == 422 and any(item['loc'][-1] == 'r' for item in raised.value.detail)
    with pytest.raises(ServiceError) as raised:
        client.request('POST', '/v1/adapters', {'name': '../etc'})
    assert raised.value.status == 422 and raised.value.detail[0]['loc'][-1] == 'name'
    response = requests.post(f'{server.url}/v1/adapters', data=b'{not json', timeout=30,
                             headers={'Authorization': 'Bearer key-d', 'Content-Type': 'application/json'})
    assert response.status_code == 422
    big = b'{"name": "' + b'x' * (server.config.max_request_bytes + 10) + b'"}'
    response = requests.post(f'{server.url}/v1/adapters', data=big, timeout=60,
                             headers={'Authorization': 'Bearer key-d', 'Content-Type': 'application/json'})
    assert response.status_code == 413


def test_pushing_a_checkpoint_offline_fails_clearly_and_only_for_its_owner(server):
    alice = MultiLoraTransformersModel(client=TwinkleClient(server.url, 'key-a'))
    alice.add_adapter_to_model('pushed', {'r': 2, 'lora_alpha': 4})
    path = alice.save(name='to-push')
    with pytest.raises(ServiceError) as raised:  # this machine has no hub: HF_HUB_OFFLINE / no network
        alice.upload_to_hub(checkpoint_dir=path, hub_model_id='hf://someone/adapter')
    assert raised.value.status == 424 and 'could not push' in raised.value.detail
    bob = MultiLoraTransformersModel(client=TwinkleClient(server.url, 'key-b'))
    with pytest.raises(ServiceError) as raised:
        bob.upload_to_hub(checkpoint_dir=path, hub_model_id='hf://someone/adapter')
    assert raised.value.status == 404
