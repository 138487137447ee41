"""Weight sync: what the sampler holds after sync_weights equals the trained model bit for bit."""
import copy
import multiprocessing
import socket
import time

import pytest
import torch
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict

from twinkle import assets
from twinkle.checkpoint_engine import (CheckpointEngineManager, InProcessCheckpointEngine,
                                       ProcessGroupCheckpointEngine, SyncTimeout, model_weights)
from twinkle.model import TransformersModel


class ModuleSampler:
    """The sampler side of the contract: ``load_weights(weights, adapter_name=None, peft_config=None)``."""

    def __init__(self, module):
        self.module = module

    def load_weights(self, weights, adapter_name=None, peft_config=None):
        weights = dict(weights)
        if adapter_name is None:
            result = self.module.load_state_dict(weights, strict=False)
            assert not result.unexpected_keys, result.unexpected_keys
        else:
            set_peft_model_state_dict(self.module, weights, adapter_name=adapter_name)


@pytest.fixture(scope='module')
def trained():
    """A LoRA adapter after two optimizer steps (B no longer zero, so merging changes W)."""
    model = TransformersModel(model_id=assets.tiny_model_path('qwen3'), mixed_precision='fp32')
    model.add_adapter_to_model('default', LoraConfig(target_modules='all-linear', r=4, lora_alpha=8))
    model.set_optimizer('AdamW', lr=1e-2)
    for step in range(2):
        model.forward_backward(inputs=[{'input_ids': [1, 5, 9, 3, 7 + step], 'labels': [1, 5, 9, 3, 7 + step]}])
        model.clip_grad_and_step()
    return model


def test_adapter_sync_copies_the_lora_weights_bit_for_bit(trained):
    sampler_module = copy.deepcopy(trained.model)
    for name, parameter in sampler_module.named_parameters():
        if 'lora_' in name:
            parameter.data.zero_()
    summary = CheckpointEngineManager(model=trained, sampler=ModuleSampler(sampler_module)).sync_weights()
    want = get_peft_model_state_dict(trained.model, adapter_name='default')
    got = get_peft_model_state_dict(sampler_module, adapter_name='default')
    assert summary['kind'] == 'adapter' and summary['tensors'] == len(want) > 0
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name


def test_merged_sync_gives_the_base_model_peft_would_merge(trained):
    merged = copy.deepcopy(trained.model).merge_and_unload()
    sampler_module = copy.deepcopy(merged)
    for parameter in sampler_module.parameters():
        parameter.data.zero_()
    CheckpointEngineManager(model=trained, sampler=ModuleSampler(sampler_module)).sync_weights(merge_and_sync=True)
    want = merged.state_dict()
    changed = 0
    for name, tensor in sampler_module.state_dict().items():
        assert torch.equal(tensor, want[name]), name
        changed += 'q_proj' in name
    assert changed > 0
    base = trained.model.get_base_model()
    q_proj = base.model.layers[0].self_attn.q_proj
    assert not torch.equal(want['model.layers.0.self_attn.q_proj.weight'], q_proj.base_layer.weight)


def test_bad_arguments_name_what_is_wrong(trained):
    with pytest.raises(ValueError, match='adapter_name .*nope'):
        model_weights(trained, 'nope')
    with pytest.raises(ValueError, match='model= or sampler='):
        CheckpointEngineManager()
    with pytest.raises(ValueError, match='engine='):
        CheckpointEngineManager(model=trained)
    with pytest.raises(ValueError, match='merge_and_sync'):
        CheckpointEngineManager(model=trained, sampler=ModuleSampler(None)).sync_weights(merge_and_sync='yes')
    with pytest.raises(RuntimeError, match='nothing was sent'):
        InProcessCheckpointEngine().receive()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        return probe.getsockname()[1]


def _tensors():
    generator = torch.Generator().manual_seed(0)
    return [('a', torch.randn(3, 5, generator=generator)), ('b', torch.randn(7, generator=generator).bfloat16()),
            ('c', torch.arange(11)), ('empty', torch.empty(0, 4)), ('d', torch.randn(40, 40, generator=generator))]


def _peer(rank, port, mode, results):
    try:
        engine = ProcessGroupCheckpointEngine(rank=rank, world_size=3, port=port, timeout=5 if mode == 'ok' else 2,
                                              bucket_bytes=64)
        if mode == 'stall' and rank == 0:
            time.sleep(8)  # joined, but never sends
            return
        if rank == 0:
            engine.send({'kind': 'full'}, iter(_tensors()))
            results.put((rank, 'sent'))
        else:
            started = time.monotonic()
            try:
                batch = engine.receive()
                received = [(name, tensor.clone()) for name, tensor in batch.weights]
                results.put((rank, (batch.meta, received)))
            except SyncTimeout as error:
                results.put((rank, ('timeout', str(error), time.monotonic() - started)))
    except Exception as error:  # reported to the test, never swallowed
        results.put((rank, ('error', repr(error))))


def _run(mode):
    context = multiprocessing.get_context('spawn')
    results, port = context.Queue(), _free_port()
    peers = [context.Process(target=_peer, args=(rank, port, mode, results)) for rank in range(3)]
    for peer in peers:
        peer.start()
    answers = dict(results.get(timeout=60) for _ in range(2 if mode == 'stall' else 3))
    for peer in peers:
        peer.join(timeout=30)
        assert peer.exitcode is not None, 'a sync peer did not exit'
    return answers


def test_buckets_over_a_process_group_arrive_bit_for_bit_at_every_sampler():
    answers = _run('ok')
    assert answers[0] == 'sent'
    for rank in (1, 2):
        meta, received = answers[rank]
        assert meta == {'kind': 'full'}
        assert [name for name, _ in received] == [name for name, _ in _tensors()]
        for (name, got), (_, want) in zip(received, _tensors()):
            assert got.dtype == want.dtype and torch.equal(got, want), name


def test_a_stalled_sender_fails_the_samplers_within_the_named_timeout():
    answers = _run('stall')
    for rank in (1, 2):
        kind, message, waited = answers[rank]
        assert kind == 'timeout', answers[rank]
        assert 'weight sync failed' in message and 'rank 0 = the model' in message
        assert waited < 6  # timeout=2 s, one bucket header wait
