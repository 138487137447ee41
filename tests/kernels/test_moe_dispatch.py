"""Token dispatchers in one process, and the model-family table both kernelize and expert
parallelism read.

- ``TwinkleMoeExperts`` with its default (local) dispatcher computes what the three MoE ops called
  directly compute (the path before dispatchers), outputs and gradients; an installed dispatcher is
  the one used.
- Hugging Face's experts fed by a dispatcher (what expert parallelism does to a model that was not
  kernelized) equal HF's own forward, for every experts implementation HF runs on CPU, and stay in
  the autograd graph when they receive no rows.
- ``twinkle.kernels.families`` is the one source: a family added there is replaced by kernelize
  and distributed by ``apply_expert_parallel``; neither module names a Hugging Face class itself.
"""
import copy
import io
import tokenize
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts, Qwen3MoeSparseMoeBlock

from twinkle import DeviceMesh
from twinkle.kernels import TwinkleMoeExperts, families, kernelize
from twinkle.kernels.kernelize import auto_mapping
from twinkle.kernels.moe import grouped_experts, moe_permute, moe_unpermute
from twinkle.kernels.moe.dispatch import LOCAL_DISPATCHER, LocalTokenDispatcher
from twinkle.parallel.expert_parallel import _fed_by_dispatcher, apply_expert_parallel

TOKENS, HIDDEN, INTERMEDIATE, EXPERTS, TOP_K = 12, 32, 16, 8, 2
RTOL = 1e-5  # fp32, relative to each tensor's largest magnitude: only summation orders may differ


def routed_inputs(seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(TOKENS, HIDDEN, generator=generator)
    top_k_index = torch.rand(TOKENS, EXPERTS, generator=generator).topk(TOP_K, dim=1).indices
    top_k_weights = torch.rand(TOKENS, TOP_K, generator=generator).softmax(dim=1)
    return hidden, top_k_index, top_k_weights


def twinkle_experts(seed=0):
    torch.manual_seed(seed)
    experts = TwinkleMoeExperts(EXPERTS, HIDDEN, INTERMEDIATE)
    for parameter in experts.parameters():
        nn.init.normal_(parameter, std=0.2)
    return experts


def hf_experts(implementation, seed=0):
    torch.manual_seed(seed)
    config = Qwen3MoeConfig(hidden_size=HIDDEN, moe_intermediate_size=INTERMEDIATE, num_experts=EXPERTS,
                            num_experts_per_tok=TOP_K)
    config._experts_implementation = implementation
    experts = Qwen3MoeExperts(config)
    for parameter in experts.parameters():
        nn.init.normal_(parameter, std=0.2)
    return experts


def run(experts_call, parameters, hidden, top_k_index, top_k_weights):
    """Output and the gradients of hidden, the routing weights and ``parameters`` (random upstream)."""
    hidden = hidden.clone().requires_grad_()
    top_k_weights = top_k_weights.clone().requires_grad_()
    out = experts_call(hidden, top_k_index, top_k_weights)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    grads = torch.autograd.grad(out, [hidden, top_k_weights, *parameters], upstream, allow_unused=True)
    return [out.detach(), *grads]


def assert_close_to_scale(actual, expected):
    for index, (a, e) in enumerate(zip(actual, expected)):
        assert a is not None and a.shape == e.shape, index
        torch.testing.assert_close(a, e, rtol=0, atol=RTOL * float(e.abs().max()), msg=f'output/grad {index}')


def test_local_dispatcher_equals_the_ops_called_directly():
    experts = twinkle_experts()
    assert experts.token_dispatcher is LOCAL_DISPATCHER
    params = [experts.gate_up_proj, experts.down_proj]

    def ops_directly(hidden, top_k_index, top_k_weights):
        permuted, tokens_per_expert, row_map = moe_permute(hidden, top_k_index, EXPERTS)
        expert_out = grouped_experts(permuted, tokens_per_expert, *params)
        return moe_unpermute(expert_out, row_map, top_k_weights)

    inputs = routed_inputs()
    expected = run(ops_directly, params, *inputs)
    assert_close_to_scale(run(experts, params, *inputs), expected)
    assert all(grad.abs().max() > 0 for grad in expected[1:])  # every gradient is exercised


def test_kernelized_hf_experts_get_the_local_dispatcher_and_an_installed_one_is_used():
    block = kernelize(Qwen3MoeSparseMoeBlock(Qwen3MoeConfig(hidden_size=HIDDEN, moe_intermediate_size=INTERMEDIATE,
                                                            num_experts=EXPERTS, num_experts_per_tok=TOP_K)))
    assert isinstance(block.experts, TwinkleMoeExperts) and block.experts.token_dispatcher is LOCAL_DISPATCHER

    class Recording(LocalTokenDispatcher):
        def __init__(self):
            self.seen = []

        def dispatch(self, hidden, top_k_index, num_local_experts):
            self.seen.append((tuple(hidden.shape), num_local_experts))
            return super().dispatch(hidden, top_k_index, num_local_experts)

    experts = twinkle_experts()
    expected = experts(*routed_inputs())
    experts.token_dispatcher = recording = Recording()
    torch.testing.assert_close(experts(*routed_inputs()), expected, rtol=0, atol=0)
    assert recording.seen == [((TOKENS, HIDDEN), EXPERTS)]


@pytest.mark.parametrize('implementation', ['eager', 'grouped_mm', 'batched_mm'])
def test_hf_experts_fed_by_a_dispatcher_equal_their_own_forward(implementation):
    stock = hf_experts(implementation)
    fed = copy.deepcopy(stock)
    fed.__class__ = _fed_by_dispatcher(Qwen3MoeExperts)
    fed.token_dispatcher = LOCAL_DISPATCHER
    assert isinstance(fed, Qwen3MoeExperts) and type(fed).__name__ == 'Qwen3MoeExperts'
    inputs = routed_inputs()
    assert_close_to_scale(run(fed, [fed.gate_up_proj, fed.down_proj], *inputs),
                          run(stock, [stock.gate_up_proj, stock.down_proj], *inputs))


@pytest.mark.parametrize('implementation', ['eager', 'grouped_mm'])
def test_hf_experts_without_rows_stay_in_the_graph(implementation):
    """A rank that receives no rows must still run its backward through the experts (the combine's
    all-to-all and FSDP's gradient reduction are collectives): zero gradients, not missing ones."""
    fed = hf_experts(implementation)
    fed.__class__ = _fed_by_dispatcher(Qwen3MoeExperts)
    fed.token_dispatcher = LOCAL_DISPATCHER
    hidden, top_k_index, top_k_weights = (tensor[:0] for tensor in routed_inputs())
    out, *grads = run(fed, [fed.gate_up_proj, fed.down_proj], hidden, top_k_index, top_k_weights)
    assert out.shape == (0, HIDDEN)
    for grad in grads[2:]:
        assert grad is not None and not grad.any()


# -- families.py: one table ---------------------------------------------------------------------

class ToyExperts(nn.Module):
    """Fused SwiGLU experts of a family twinkle does not ship."""

    def __init__(self):
        super().__init__()
        self.num_experts = 4
        self.gate_up_proj = nn.Parameter(torch.zeros(4, 2 * INTERMEDIATE, HIDDEN))
        self.down_proj = nn.Parameter(torch.zeros(4, HIDDEN, INTERMEDIATE))
        self.act_fn = nn.SiLU()


def toy_model():
    return nn.Sequential(nn.Linear(HIDDEN, HIDDEN), ToyExperts())


def test_a_family_added_to_the_table_counts_for_kernelize_and_expert_parallelism(monkeypatch):
    with pytest.raises(ValueError, match=r'has no fused MoE experts .*knows .*\.Qwen3MoeExperts\)'):
        apply_expert_parallel(toy_model(), DeviceMesh.from_sizes(ep_size=3))
    assert auto_mapping(toy_model()) == {}
    toy = families.ModelFamily('toy', __name__, {'experts': 'ToyExperts'}, rope_function=None)
    monkeypatch.setattr(families, 'FAMILIES', [*families.FAMILIES, toy])
    assert families.role_of(ToyExperts) == 'experts' and families.family_of(ToyExperts) is toy
    assert auto_mapping(toy_model()) == {ToyExperts: TwinkleMoeExperts}
    with pytest.raises(ValueError, match=r'ep_size=3 must divide the expert count num_experts=4 of ToyExperts'):
        apply_expert_parallel(toy_model(), DeviceMesh.from_sizes(ep_size=3))


def test_the_shipped_families_cover_what_kernelize_replaced_before():
    expected = {f'transformers.models.{name}.modeling_{name}.{prefix}{suffix}'
                for name, prefix in (('llama', 'Llama'), ('qwen2', 'Qwen2'), ('qwen3', 'Qwen3'),
                                     ('qwen3_moe', 'Qwen3Moe'))
                for suffix in ('RMSNorm', 'MLP', 'ForCausalLM')}
    expected.add('transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeExperts')
    listed = {f'{family.modeling_module}.{name}' for family in families.FAMILIES for name in family.classes.values()}
    assert listed == expected
    with pytest.raises(ValueError, match='unknown roles'):
        families.ModelFamily('bad', 'pkg.modeling_bad', {'attention': 'BadAttention'})


@pytest.mark.parametrize('path', ['twinkle/kernels/kernelize.py', 'twinkle/parallel/expert_parallel.py'])
def test_no_model_family_named_outside_the_table(path):
    source = (Path(__file__).resolve().parents[2] / path).read_text()
    strings = [token.string for token in tokenize.generate_tokens(io.StringIO(source).readline)
               if token.type == tokenize.STRING]
    named = [s for s in strings if any(family in s for family in ('Qwen', 'Llama', 'transformers.models'))]
    assert named == [], f'{path} names model-family classes itself: {named}'
