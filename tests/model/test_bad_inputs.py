"""TransformersModel refuses, or skips with a warning, what would otherwise train or load wrongly
without a word: partial adapter loads, NaN weights, damaged files, other target modules, steps
without trained tokens, mesh dims it does not apply."""
import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file

from tests.model.conftest import token_batch
from twinkle import DeviceMesh
from twinkle.model import TransformersModel
from twinkle.model.transformers.model import APPLIED_DIMS, UNAPPLIED_ADVICE

ALL = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj']


def lora_model(tiny_config, targets=ALL, seed=0):
    torch.manual_seed(seed)
    model = TransformersModel(config=tiny_config)
    model.add_adapter_to_model('default', LoraConfig(r=4, target_modules=targets, init_lora_weights=False))
    model.set_optimizer('AdamW', lr=1e-2, weight_decay=0.1)
    return model


def lora_tensors(model):
    return {name: p.detach().clone() for name, p in model.model.named_parameters() if 'lora_' in name}


@pytest.fixture
def saved(tiny_config, tmp_path):
    return lora_model(tiny_config).save('ck', output_dir=str(tmp_path))


def drop_keys(path, keep):
    file = f'{path}/adapter_model.safetensors'
    weights = load_file(file)
    save_file({k: v for k, v in weights.items() if keep(k)}, file)


def test_a_partial_adapter_is_refused_unless_strict_false(tiny_config, saved, twinkle_logs):
    drop_keys(saved, keep=lambda key: '.layers.0.self_attn.q_proj.' in key)  # 2 of 28 LoRA tensors
    model = lora_model(tiny_config, seed=1)
    with pytest.raises(ValueError, match=r"26 weights of the 'default' adapter are not in it.*strict=False"):
        model.load(saved)
    model.load(saved, strict=False)
    assert "partial load (strict=False): 26 weights" in twinkle_logs.text


def test_nan_weights_are_refused_naming_file_and_tensor(tiny_config, saved):
    file = f'{saved}/adapter_model.safetensors'
    weights = load_file(file)
    name = sorted(weights)[0]
    weights[name][0, 0] = float('nan')
    save_file(weights, file)
    with pytest.raises(ValueError, match=rf"adapter_model.safetensors: tensor '{name}' holds 1 NaN/inf"):
        lora_model(tiny_config).load(saved)


def test_a_truncated_file_is_named(tiny_config, saved):
    file = f'{saved}/adapter_model.safetensors'
    data = open(file, 'rb').read()
    open(file, 'wb').write(data[:len(data) // 2])
    with pytest.raises(ValueError, match=r'adapter_model.safetensors is not a readable safetensors file'):
        lora_model(tiny_config).load(saved)


def test_other_target_modules_are_named(tiny_config, saved):
    model = lora_model(tiny_config, targets=['q_proj', 'v_proj'])
    with pytest.raises(ValueError, match=r"only saved: \['down_proj', 'gate_proj', 'k_proj', 'o_proj', 'up_proj'\]"):
        model.load(saved)


def test_a_step_without_trained_tokens_is_skipped(tiny_config, twinkle_logs):
    model = lora_model(tiny_config)
    before = lora_tensors(model)
    batch = token_batch(size=2, seed=0)
    for row in batch:
        row['labels'] = [-100] * len(row['labels'])
    assert model.forward_backward(inputs=batch)['num_tokens'] == 0
    model.clip_grad_and_step()
    assert 'step skipped' in twinkle_logs.text
    assert model._state(None).optimizer_steps == 0
    for name, tensor in lora_tensors(model).items():
        torch.testing.assert_close(tensor, before[name], rtol=0, atol=0, msg=name)


def test_step_before_forward_backward_is_refused(tiny_config):
    model = lora_model(tiny_config)
    with pytest.raises(RuntimeError, match=r'step\(\) with no gradients: call forward_backward'):
        model.step()
    assert model._state(None).optimizer_steps == 0


@pytest.mark.parametrize('dim, advice', [('tp', 'MegatronModel'), ('pp', 'MegatronModel')])
def test_a_parallel_size_transformers_model_does_not_apply_is_refused(tiny_config, dim, advice):
    """Before: tp_size=2 on 2 ranks trained with the whole model on every rank, without a word."""
    mesh = DeviceMesh.from_sizes(**{f'{dim}_size': 2})
    with pytest.raises(ValueError, match=rf'device_mesh has {dim}_size=2.*{advice}'):
        TransformersModel(config=tiny_config, device_mesh=mesh)


@pytest.mark.parametrize('dim', ['dp', 'fsdp', 'ep', 'cp', 'ulysses'])
def test_the_dims_it_applies_pass_the_check(dim):
    mesh = DeviceMesh.from_sizes(**{f'{dim}_size': 2})
    mesh.refuse_unapplied(APPLIED_DIMS, 'TransformersModel', UNAPPLIED_ADVICE)
