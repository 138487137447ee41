"""A LoRA adapter on lm_head keeps the loss fused and exact: same loss and gradients (base and
adapter weights) as the stock model with the stock peft head, logits never built; the LoRA variants
that are not one linear map (DoRA, merged, disabled) take the stock path and say so by building logits.
Models and batches are on the test device (tests/conftest.py)."""
import copy

import pytest
import torch

peft = pytest.importorskip('peft')
from transformers import Qwen3Config, Qwen3ForCausalLM  # noqa: E402

from tests.conftest import DEVICE  # noqa: E402
from twinkle import kernels  # noqa: E402

VOCAB = 512


def tiny_untied_qwen3(seed=0):
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        head_dim=16, tie_word_embeddings=False)).to(DEVICE)


def with_lora(model, **overrides):
    config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                             target_modules=['q_proj', 'v_proj', 'lm_head'], **overrides)
    torch.manual_seed(3)  # the same adapter initialisation for both models
    wrapped = peft.get_peft_model(model, config)
    for name, param in wrapped.named_parameters():
        if 'lora_B' in name:  # peft starts B at zero: the adapter's gradient path would be untested
            torch.nn.init.normal_(param, std=0.05)
    return wrapped


def a_batch(shape=(2, 19)):
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, VOCAB, shape, generator=generator)
    labels = input_ids.clone()
    labels[0, :4] = -100
    return input_ids.to(DEVICE), labels.to(DEVICE)


def train_step(model, backward=True):
    model.train()
    model.zero_grad()
    input_ids, labels = a_batch()
    out = model(input_ids=input_ids, labels=labels)
    if backward:
        out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def stock_and_fused(**overrides):
    base = tiny_untied_qwen3()
    stock = with_lora(copy.deepcopy(base), **overrides)
    fused = with_lora(kernels.kernelize(copy.deepcopy(base)), **overrides)
    return stock, fused


def test_lora_head_stays_fused_and_matches_stock_forward_and_backward():
    stock, fused = stock_and_fused()
    expected, grads_ref = train_step(stock)
    got, grads = train_step(fused)
    assert got.logits is None, 'the LoRA head fell back to building logits'
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-5, atol=0)
    assert any('lm_head.lora_A' in n for n in grads) and any('lm_head.lora_B' in n for n in grads)
    assert grads.keys() == grads_ref.keys()
    for name, grad in grads_ref.items():  # tolerance relative to each gradient's own scale
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-5 * grad.abs().max().item(), msg=name)


def test_lora_head_in_bf16_autocast_matches_stock_within_bf16_rounding():
    stock, fused = stock_and_fused()
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        expected, grads_ref = train_step(stock)
        got, grads = train_step(fused)
    assert got.logits is None
    torch.testing.assert_close(got.loss.float(), expected.loss.float(), rtol=2e-2, atol=0)
    for name in ('lm_head.lora_A', 'lm_head.lora_B'):
        key = next(n for n in grads_ref if name in n)
        ref = grads_ref[key].float()
        error = (grads[key].float() - ref).norm() / ref.norm()
        assert error < 5e-2, f'{key}: relative error {error:.3g}'


@pytest.mark.parametrize('variant', ['dora', 'merged', 'disabled'])
def test_lora_variants_that_are_not_one_linear_map_take_the_stock_path(variant):
    stock, fused = stock_and_fused(use_dora=variant == 'dora')
    for model in (stock, fused):
        if variant == 'merged':
            model.base_model.model.lm_head.merge()
        if variant == 'disabled':
            model.base_model.disable_adapter_layers()
    expected, _ = train_step(stock, backward=variant != 'disabled')  # disabled: nothing left to train
    got, _ = train_step(fused, backward=variant != 'disabled')
    assert got.logits is not None, f'{variant} LoRA head cannot be fused; it must build logits'
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-5, atol=0)
