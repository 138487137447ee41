"""The parallel layer in one process: gradients, parallelize's checks, layer discovery, checkpoints."""
import random

import numpy as np
import pytest
import torch
from torch import nn

from twinkle import DeviceMesh
from twinkle.parallel import (all_reduce_sum, clip_grad_norm_, collective, decoder_layers, load_sharded, parallelize,
                              rng_state, save_full_state_dict, save_sharded, scale_gradients_, set_rng_state)

from .jobs import Trainer, build_model


def parameters_with_grads(seed=0):
    torch.manual_seed(seed)
    parameters = [nn.Parameter(torch.randn(shape)) for shape in ((3, 5), (7,), (1,))]
    for parameter in parameters:
        parameter.grad = torch.randn_like(parameter) * 4
    return parameters + [nn.Parameter(torch.ones(2))]  # one without a gradient


@pytest.mark.parametrize('max_norm, norm_type', [(1.0, 2.0), (100.0, 2.0), (0.5, 1.0), (2.0, float('inf'))])
def test_clip_grad_norm_matches_torch(max_norm, norm_type):
    ours, reference = parameters_with_grads(), parameters_with_grads()
    norm = clip_grad_norm_(ours, max_norm, norm_type)
    expected = torch.nn.utils.clip_grad_norm_(reference, max_norm, norm_type)
    torch.testing.assert_close(norm, expected, rtol=1e-6, atol=0)
    for got, want in zip(ours, reference):
        if want.grad is not None:
            torch.testing.assert_close(got.grad, want.grad, rtol=1e-6, atol=0)


def test_clip_grad_norm_without_gradients_is_zero():
    assert clip_grad_norm_([nn.Parameter(torch.ones(3))], 1.0).item() == 0.0
    with pytest.raises(ValueError, match='max_norm'):
        clip_grad_norm_(parameters_with_grads(), 0.0)


def test_scale_gradients_divides_every_gradient():
    parameters, reference = parameters_with_grads(), parameters_with_grads()
    scale_gradients_(parameters, torch.tensor(8))
    for got, want in zip(parameters, reference):
        if want.grad is not None:
            torch.testing.assert_close(got.grad, want.grad / 8, rtol=0, atol=0)
    for divisor in (0, -1.0, torch.tensor(0)):
        with pytest.raises(ValueError, match='divisor'):
            scale_gradients_(parameters, divisor)


def test_all_reduce_sum_is_a_copy_in_one_process():
    count = torch.tensor(5)
    total = all_reduce_sum(count)
    total += 1
    assert count.item() == 5 and all_reduce_sum(3).item() == 3


def test_collective_passes_errors_through_without_a_process_group():
    with pytest.raises(KeyError):
        with collective('step'):
            raise KeyError('not a communication failure')


@pytest.mark.parametrize('sizes, named', [({'tp_size': 2}, 'tp_size=2'), ({'pp_size': 2}, 'pp_size=2')])
def test_parallelize_refuses_dims_it_does_not_handle(sizes, named):
    with pytest.raises(NotImplementedError, match=named):
        parallelize(nn.Linear(2, 2), DeviceMesh.from_sizes(**sizes))


def test_parallelize_with_ep_needs_expert_parallel_experts():
    with pytest.raises(ValueError, match=r'ep_size=2 .* call apply_expert_parallel'):
        parallelize(nn.Linear(2, 2), DeviceMesh.from_sizes(ep_size=2))


def test_parallelize_checks_its_arguments():
    with pytest.raises(ValueError, match='mixed_precision'):
        parallelize(nn.Linear(2, 2), DeviceMesh.from_sizes(), mixed_precision='fp8')
    with pytest.raises(ValueError, match='mixed_precision'):
        parallelize(nn.Linear(2, 2), DeviceMesh.from_sizes(), mixed_precision=torch.int8)
    with pytest.raises(ValueError, match='mesh'):
        parallelize(nn.Linear(2, 2), {'fsdp': 2})
    with pytest.raises(RuntimeError, match='torchrun'):
        parallelize(nn.Linear(2, 2), DeviceMesh.from_sizes(fsdp_size=2))


def test_parallelize_leaves_a_single_rank_model_alone():
    model = build_model()
    before = {name: p.clone() for name, p in model.state_dict().items()}
    assert parallelize(model, DeviceMesh.from_sizes(), mixed_precision='auto') is model
    assert all(torch.equal(p, before[name]) for name, p in model.state_dict().items())


def test_decoder_layers_found_through_peft_and_by_module_list():
    for model in (build_model(), build_model(lora=True)):
        assert [type(layer).__name__ for layer in decoder_layers(model)] == ['Qwen3DecoderLayer'] * 2
    blocks = nn.ModuleList(nn.Linear(2, 2) for _ in range(3))
    plain = nn.Sequential(nn.Embedding(4, 2), nn.Sequential(blocks), nn.ModuleList([nn.Linear(2, 2)]))
    assert decoder_layers(plain) == list(blocks)
    with pytest.raises(ValueError, match='no decoder layers'):
        decoder_layers(nn.Linear(2, 2))


def test_full_checkpoint_replaces_an_older_one_atomically(tmp_path):
    from transformers import Qwen3ForCausalLM
    path = tmp_path / 'checkpoint'
    save_full_state_dict(build_model(seed=1), str(path))
    model = build_model(seed=2)
    save_full_state_dict(model, str(path))
    loaded = Qwen3ForCausalLM.from_pretrained(path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert [entry.name for entry in tmp_path.iterdir()] == ['checkpoint']
    with pytest.raises(ValueError, match='save_pretrained'):
        save_full_state_dict(nn.Linear(2, 2), str(tmp_path / 'linear'))


def test_sharded_checkpoint_round_trip_in_one_process(tmp_path):
    mesh = DeviceMesh.from_sizes()
    trainer = Trainer(mesh, attention_dropout=0.2)
    trainer.run(2)
    save_sharded(str(tmp_path / 'sharded'), trainer.model, trainer.optimizer, trainer.extra_state())
    expected = trainer.run(2)
    resumed = Trainer(mesh, seed=5, attention_dropout=0.2)
    assert not torch.equal(resumed.probe_logits(), trainer.probe_logits())
    resumed.restore(load_sharded(str(tmp_path / 'sharded'), resumed.model, resumed.optimizer))
    assert resumed.run(2) == expected
    with pytest.raises(ValueError, match='path'):
        load_sharded(str(tmp_path / 'missing'), resumed.model)


def test_rng_state_round_trip():
    def draw():
        return random.random(), np.random.rand(), torch.rand(3).tolist()

    state = rng_state()
    first = draw()
    set_rng_state(state)
    assert draw() == first

