"""kernelize: automatic and mapping-driven replacement in Hugging Face models (the tiny Qwen3 on the
test device, tests/conftest.py; the mapping tests on CPU, where they mean the same)."""
import copy
import importlib.machinery
import sys
import types

import pytest
import torch
from torch import nn
from transformers import Qwen3Config, Qwen3ForCausalLM
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

from tests.conftest import DEVICE
from twinkle import kernels
from twinkle.kernels import TwinkleRMSNorm


def tiny_qwen3(seed=0):
    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    model = Qwen3ForCausalLM(config)
    with torch.no_grad():  # non-trivial norm weights, so a wrong weight path shows
        for module in model.modules():
            if isinstance(module, Qwen3RMSNorm):
                module.weight.uniform_(0.5, 1.5)
    return model.to(DEVICE)


def loss_and_grads(model, input_ids):
    model.eval()  # eval: logits are built, so they can be compared (training uses the fused loss)
    model.zero_grad()
    out = model(input_ids=input_ids, labels=input_ids)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_auto_kernelize_replaces_every_known_module_and_keeps_numerics():
    stock = tiny_qwen3()
    ours = kernels.kernelize(copy.deepcopy(stock))
    norms = [m for m in ours.modules() if isinstance(m, Qwen3RMSNorm)]
    assert len(norms) == 2 * 4 + 1  # per layer: input, post-attention, q_norm, k_norm; plus final
    assert all(isinstance(m, TwinkleRMSNorm) for m in norms)
    assert ours.state_dict().keys() == stock.state_dict().keys()
    input_ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    logits_ref, grads_ref = loss_and_grads(stock, input_ids)
    logits, grads = loss_and_grads(ours, input_ids)
    # fp32: only the order of the fp32 reductions differs from HF's RMSNorm.
    torch.testing.assert_close(logits, logits_ref, rtol=1e-5, atol=1e-5)
    for name, grad in grads_ref.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_mapping_by_class_swaps_only_that_type():
    model = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8))

    class Doubling(nn.Module):
        def forward(self, x):
            return 2 * x

    kernels.kernelize(model, {nn.Linear: Doubling})
    assert isinstance(model[1], nn.Linear) and isinstance(model[1], Doubling)
    assert type(model[0]) is nn.LayerNorm
    torch.testing.assert_close(model[1](torch.ones(8)), torch.full((8,), 2.0))


def test_mapping_with_forward_function():
    model = nn.Sequential(nn.Linear(4, 4))
    kernels.kernelize(model, {nn.Linear: lambda self, x: x + 1})
    torch.testing.assert_close(model(torch.zeros(4)), torch.ones(4))


def test_device_keyed_mapping_skips_other_devices(twinkle_logs):
    model = nn.Sequential(nn.Linear(4, 4))
    kernels.kernelize(model, {nn.Linear: {'cuda': lambda self, x: x}})
    assert type(model[0]) is nn.Linear
    assert 'forward' not in vars(model[0])
    assert any('skipped on cpu' in r.getMessage() for r in twinkle_logs.records)


def test_dotted_path_sets_the_attribute(monkeypatch):
    target = types.ModuleType('twinkle_test_target')
    target.activation = torch.relu
    monkeypatch.setitem(sys.modules, 'twinkle_test_target', target)
    kernels.kernelize(nn.Linear(2, 2), {'twinkle_test_target.activation': torch.tanh})
    assert target.activation is torch.tanh
    with pytest.raises(ValueError, match='no attribute'):
        kernels.kernelize(nn.Linear(2, 2), {'twinkle_test_target.missing': torch.tanh})


def test_bad_mapping_key():
    with pytest.raises(TypeError, match='mapping keys'):
        kernels.kernelize(nn.Linear(2, 2), {42: torch.tanh})


def test_hub_reference_needs_the_kernels_package(monkeypatch):
    monkeypatch.setitem(sys.modules, 'kernels', None)
    with pytest.raises(ImportError, match=r'twinkle\[hub\]'):
        kernels.kernelize(nn.Sequential(nn.Linear(2, 2)), {nn.Linear: 'kernels-community/layers:Fast'})


def test_hub_reference_loads_the_layer(monkeypatch):
    class HubLinear(nn.Module):
        def forward(self, x):
            return torch.zeros_like(x)

    hub = types.ModuleType('kernels')
    hub.__spec__ = importlib.machinery.ModuleSpec('kernels', None)
    requested = []

    def get_kernel(repo_id):
        requested.append(repo_id)
        return types.SimpleNamespace(layers=types.SimpleNamespace(HubLinear=HubLinear))

    hub.get_kernel = get_kernel
    monkeypatch.setitem(sys.modules, 'kernels', hub)
    model = nn.Sequential(nn.Linear(2, 2))
    kernels.kernelize(model, {nn.Linear: 'kernels-community/layers:HubLinear'})
    assert requested == ['kernels-community/layers']
    torch.testing.assert_close(model(torch.ones(2)), torch.zeros(2))
    with pytest.raises(ValueError, match='org/repo:LayerName'):
        kernels.kernelize(model, {nn.Linear: 'no-layer-name'})


def test_unknown_model_is_left_alone(twinkle_logs):
    model = nn.Sequential(nn.Linear(2, 2))
    assert kernels.kernelize(model) is model
    assert type(model[0]) is nn.Linear
