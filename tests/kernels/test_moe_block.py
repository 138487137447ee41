"""Qwen3-MoE through twinkle's MoE ops equals Hugging Face's, for every experts implementation HF
runs on CPU: the sparse block's output and the gradients of its input, router weight and expert
parameters, on random, skewed and one-expert-gets-everything routings; router logits and aux loss
of the whole model; LoRA on the expert parameters (peft ``target_parameters``).

Tolerances: fp32 relative 1e-5 of the largest magnitude (same math, other summation order).
bf16: against an fp32 run of the same block, twinkle's error must stay within 2x HF
grouped_mm's plus 2e-3 of the largest magnitude (both round GEMM outputs to bf16; twinkle
accumulates the combine in fp32). Blocks, models and inputs are on the test device (tests/conftest.py).
"""
import copy

import pytest
import torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts, Qwen3MoeSparseMoeBlock

from tests.conftest import DEVICE
from twinkle import kernels
from twinkle.kernels import TwinkleMoeExperts

HF_IMPLEMENTATIONS = ('eager', 'grouped_mm', 'batched_mm')  # the ones HF runs on CPU (deepgemm, sonicmoe: CUDA)
HIDDEN, EXPERTS, TOP_K = 32, 8, 2


def config(**overrides):
    return Qwen3MoeConfig(**{**dict(hidden_size=HIDDEN, moe_intermediate_size=16, num_experts=EXPERTS,
                                    num_experts_per_tok=TOP_K, norm_topk_prob=True), **overrides})


def sparse_block(routing, seed=0):
    """A block whose router produces the named routing on ``block_input`` (whose values are
    positive, so adding a constant c to router row e raises expert e's logit by c * sum(x))."""
    torch.manual_seed(seed)
    block = Qwen3MoeSparseMoeBlock(config())
    for param in block.parameters():
        torch.nn.init.normal_(param, std=0.2)
    with torch.no_grad():
        if routing == 'skewed':   # a steep preference: the last experts get few or no tokens
            block.gate.weight += 0.1 * torch.linspace(1, -1, EXPERTS).unsqueeze(1)
        elif routing == 'one_expert':
            block.gate.weight[3] += 1.0
    return block.to(DEVICE)


def block_input(dtype=torch.float32):
    return torch.rand(2, 12, HIDDEN, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)


def tokens_per_expert(block, x):
    _, _, ids = block.gate(x.reshape(-1, HIDDEN))
    return torch.bincount(ids.flatten(), minlength=EXPERTS)


def run_block(block, x, implementation=None):
    if implementation is not None:
        block.experts.config._experts_implementation = implementation
    block.zero_grad()
    x = x.detach().clone().requires_grad_()
    out = block(x)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(out.device, out.dtype))
    return [out.detach(), x.grad, block.gate.weight.grad, block.experts.gate_up_proj.grad,
            block.experts.down_proj.grad]


def max_error(actual, expected):
    return [(a.float() - e.float()).abs().max().item() for a, e in zip(actual, expected)]


def assert_fp32_close(actual, expected):
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-5 * e.abs().max().item())


def test_routings_are_what_they_say():
    x = block_input()
    assert (tokens_per_expert(sparse_block('skewed'), x) == 0).any()
    assert tokens_per_expert(sparse_block('one_expert'), x)[3] == x.shape[0] * x.shape[1]


@pytest.mark.parametrize('routing', ['random', 'skewed', 'one_expert'])
@pytest.mark.parametrize('implementation', HF_IMPLEMENTATIONS)
def test_block_equals_hf_fp32(implementation, routing):
    stock = sparse_block(routing)
    ours = kernels.kernelize(copy.deepcopy(stock))
    assert isinstance(ours.experts, TwinkleMoeExperts) and isinstance(ours.experts, Qwen3MoeExperts)
    x = block_input()
    assert_fp32_close(run_block(ours, x), run_block(stock, x, implementation))


@pytest.mark.parametrize('routing', ['random', 'one_expert'])
def test_block_bf16_is_as_accurate_as_hf(routing):
    stock = sparse_block(routing)
    ours = kernels.kernelize(copy.deepcopy(stock))
    exact = run_block(copy.deepcopy(stock), block_input(), 'grouped_mm')
    stock_bf16, ours_bf16 = stock.to(torch.bfloat16), ours.to(torch.bfloat16)
    theirs = run_block(stock_bf16, block_input(torch.bfloat16), 'grouped_mm')
    got = run_block(ours_bf16, block_input(torch.bfloat16))
    assert all(g.dtype == torch.bfloat16 for g in got)
    for name, ours_err, hf_err, e in zip(('out', 'd_input', 'd_router', 'd_gate_up', 'd_down'),
                                         max_error(got, exact), max_error(theirs, exact), exact):
        assert ours_err <= 2 * hf_err + 2e-3 * e.abs().max().item(), name


def test_input_in_another_dtype_runs_in_the_parameters_dtype_like_hf():
    """As under autocast: bf16 activations, fp32 experts. HF grouped_mm casts the input to the
    weights' dtype and the result back; so do we."""
    experts = sparse_block('random').experts
    x, weights = torch.randn(6, HIDDEN, device=DEVICE).bfloat16(), torch.rand(6, 1, device=DEVICE).bfloat16()
    ids = torch.randint(0, EXPERTS, (6, 1), device=DEVICE)
    experts.config._experts_implementation = 'grouped_mm'
    expected = experts(x, ids, weights)
    got = kernels.kernelize(experts)(x, ids, weights)
    assert got.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize('layout', ['act_fn', 'has_bias', 'is_transposed', 'is_concatenated'])
def test_kernelize_keeps_experts_that_are_not_swiglu(layout, twinkle_logs):
    """Checked when kernelizing, not at the first forward: such experts stay HF's, with the reason logged."""
    stock = sparse_block('random')
    if layout == 'act_fn':
        stock.experts.act_fn = torch.nn.GELU()
    else:
        setattr(stock.experts, layout, not getattr(stock.experts, layout))
    ours = kernels.kernelize(copy.deepcopy(stock))
    assert type(ours.experts) is Qwen3MoeExperts
    assert any('Qwen3MoeExperts kept' in r.getMessage() and layout in r.getMessage() for r in twinkle_logs.records)
    if layout == 'act_fn':  # HF's own experts still run (the others are layouts HF's weights here do not have)
        x = block_input()
        assert_fp32_close(run_block(ours, x, 'grouped_mm'), run_block(stock, x, 'grouped_mm'))


def test_kernelize_keeps_the_experts_class_when_one_layer_is_not_swiglu():
    model = tiny_model()
    model.model.layers[1].mlp.experts.act_fn = torch.nn.GELU()
    kernels.kernelize(model)
    assert not any(isinstance(m, TwinkleMoeExperts) for m in model.modules())


def test_experts_forced_onto_non_swiglu_experts_refuse_to_run():
    block = sparse_block('random')
    block.experts.act_fn = torch.nn.GELU()
    kernels.kernelize(block, {Qwen3MoeExperts: TwinkleMoeExperts})  # an explicit mapping is not second-guessed
    with pytest.raises(ValueError, match='act_fn'):
        block(block_input())


def test_fresh_experts_module_has_hf_names():
    stock = sparse_block('random').experts
    ours = TwinkleMoeExperts(EXPERTS, HIDDEN, 16).to(DEVICE)
    assert ours.state_dict().keys() == stock.state_dict().keys()
    ours.load_state_dict(stock.state_dict())
    x, weights = torch.randn(5, HIDDEN, device=DEVICE), torch.rand(5, 2, device=DEVICE)
    ids = torch.tensor([[0, 1], [7, 2], [2, 0], [5, 6], [1, 7]], device=DEVICE)
    stock.config._experts_implementation = 'eager'
    torch.testing.assert_close(ours(x, ids, weights), stock(x, ids, weights), atol=1e-5, rtol=1e-5)


# -- the whole model: router logits, aux loss, LoRA on expert parameters ------------------------

def tiny_model(seed=0):
    torch.manual_seed(seed)
    return Qwen3MoeForCausalLM(config(vocab_size=256, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                      output_router_logits=True)).to(DEVICE)


def model_step(model, seed=3):
    input_ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    model.zero_grad()
    out = model(input_ids=input_ids, labels=input_ids)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out, grads


def test_model_router_logits_and_aux_loss_unchanged():
    stock = tiny_model()
    ours = kernels.kernelize(copy.deepcopy(stock), {Qwen3MoeExperts: TwinkleMoeExperts})  # only the experts
    expected, expected_grads = model_step(stock)
    got, grads = model_step(ours)
    assert len(got.router_logits) == 2
    for logits, reference in zip(got.router_logits, expected.router_logits):
        torch.testing.assert_close(logits, reference, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got.aux_loss, expected.aux_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-5, atol=0)
    assert grads.keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def lora(model):
    from peft import LoraConfig, get_peft_model
    config = LoraConfig(r=4, lora_alpha=8, target_modules=[], init_lora_weights=False,  # random B: a non-zero delta
                        target_parameters=['experts.gate_up_proj', 'experts.down_proj'])
    torch.manual_seed(5)
    return get_peft_model(model, config)


@pytest.mark.parametrize('order', ['kernelize_then_lora', 'lora_then_kernelize'])
def test_lora_on_expert_parameters_equals_hf(order):
    stock = lora(tiny_model())
    if order == 'kernelize_then_lora':
        ours = lora(kernels.kernelize(tiny_model()))
    else:
        ours = kernels.kernelize(lora(tiny_model()))
    assert any(isinstance(m, TwinkleMoeExperts) for m in ours.modules())
    expected, expected_grads = model_step(stock)
    got, grads = model_step(ours)
    without_lora, _ = model_step(kernels.kernelize(tiny_model()))
    assert abs(got.loss.item() - without_lora.loss.item()) > 1e-3  # the adapter changes the result
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-5, atol=0)
    lora_grads = [name for name in expected_grads if 'lora_' in name]
    assert len(lora_grads) == 8 and grads.keys() == expected_grads.keys()  # A and B, 2 parameters, 2 layers
    for name in lora_grads:
        torch.testing.assert_close(grads[name], expected_grads[name], rtol=1e-4, atol=1e-6, msg=name)
