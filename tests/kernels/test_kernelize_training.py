"""A kernelized tiny Qwen3 / Qwen3-MoE trains like the stock model: same loss and gradients,
loss computed without logits, lower peak memory in a training step. Models and batches are on the
test device (tests/conftest.py)."""
import copy
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

from tests.conftest import DEVICE, cpu_only
from twinkle import kernels
from twinkle.kernels import TwinkleRMSNorm, TwinkleSwiGLUMLP
from twinkle.kernels.causal_lm import TwinkleCausalLMLoss

VOCAB = 32768


def tiny_qwen3(vocab=VOCAB, seed=0):
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(Qwen3Config(vocab_size=vocab, hidden_size=64, intermediate_size=96,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        head_dim=16, tie_word_embeddings=True)).to(DEVICE)


def tiny_qwen3_moe(seed=0):
    torch.manual_seed(seed)
    return Qwen3MoeForCausalLM(Qwen3MoeConfig(vocab_size=1024, hidden_size=64, intermediate_size=96,
                                              moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                              head_dim=16, output_router_logits=True)).to(DEVICE)


def batch(vocab, seed=1, shape=(2, 24)):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, shape, generator=generator)
    labels = input_ids.clone()
    labels[0, :5] = -100  # a prompt that is not trained on
    return input_ids.to(DEVICE), labels.to(DEVICE)


def loss_and_grads(model, input_ids, labels, **kwargs):
    model.train()
    model.zero_grad()
    out = model(input_ids=input_ids, labels=labels, **kwargs)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_training_step(stock, ours, vocab, **kwargs):
    input_ids, labels = batch(vocab)
    expected, grads_ref = loss_and_grads(stock, input_ids, labels, **kwargs)
    got, grads = loss_and_grads(ours, input_ids, labels, **kwargs)
    assert got.logits is None  # the loss was computed without logits
    # fp32; RMSNorm/SwiGLU/RoPE/CE differ from HF only in the order of fp32 reductions.
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == grads_ref.keys()
    for name, grad in grads_ref.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    return got


def test_dense_model_every_module_replaced_and_same_step():
    stock = tiny_qwen3()
    ours = kernels.kernelize(copy.deepcopy(stock))
    assert isinstance(ours, TwinkleCausalLMLoss) and isinstance(ours, Qwen3ForCausalLM)
    assert all(isinstance(layer.mlp, TwinkleSwiGLUMLP) for layer in ours.model.layers)
    assert isinstance(ours.model.norm, TwinkleRMSNorm)
    assert_same_training_step(stock, ours, VOCAB)


def test_num_items_in_batch_normalisation_matches_hf():
    stock = tiny_qwen3(vocab=512)
    ours = kernels.kernelize(copy.deepcopy(stock))
    assert_same_training_step(stock, ours, 512, num_items_in_batch=torch.tensor(100))


def test_moe_model_keeps_router_aux_loss():
    stock = tiny_qwen3_moe()
    ours = kernels.kernelize(copy.deepcopy(stock))
    got = assert_same_training_step(stock, ours, 1024)
    assert got.aux_loss is not None


def test_logits_available_when_asked_for():
    ours = kernels.kernelize(tiny_qwen3(vocab=512))
    input_ids, labels = batch(512)
    ours.train()
    out = ours(input_ids=input_ids, labels=labels, skip_logits=False)
    assert out.logits.shape == (2, 24, 512) and out.loss is not None
    ours.eval()
    with torch.no_grad():
        assert ours(input_ids=input_ids, labels=labels).logits.shape == (2, 24, 512)
        assert ours(input_ids=input_ids).loss is None


def test_non_silu_mlp_is_not_replaced():
    model = tiny_qwen3(vocab=512)
    model.config.hidden_act = 'gelu'
    for layer in model.model.layers:
        layer.mlp.act_fn = torch.nn.GELU()
    kernels.kernelize(model)
    assert not any(isinstance(layer.mlp, TwinkleSwiGLUMLP) for layer in model.model.layers)


PEAK_PROBE = '''
    import json, sys, torch
    sys.path.insert(0, {root!r})
    from tests.kernels.test_kernelize_training import batch, tiny_qwen3, VOCAB
    from twinkle import backends, kernels
    cpu = backends.current()
    model = tiny_qwen3()
    if {kernelized}:
        kernels.kernelize(model)
    input_ids, labels = batch(VOCAB, shape=(4, 256))
    model(input_ids=input_ids[:, :8], labels=labels[:, :8]).loss.backward()  # warm up allocator/code paths
    model.zero_grad(set_to_none=False)
    cpu.reset_peak_memory()
    base = cpu.peak_memory()
    model(input_ids=input_ids, labels=labels).loss.backward()
    print(json.dumps({{'peak_above_start': cpu.peak_memory() - base}}))
'''


def peak_of_training_step(kernelized):
    import pathlib
    root = str(pathlib.Path(__file__).resolve().parents[2])
    code = textwrap.dedent(PEAK_PROBE.format(root=root, kernelized=kernelized))
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])['peak_above_start']


@cpu_only("the probe measures a CPU process's resident memory (VmHWM)")
def test_kernelized_training_step_uses_less_memory():
    stock, ours = peak_of_training_step(False), peak_of_training_step(True)
    print(f'training-step peak above start: stock {stock / 2**20:.0f} MiB, kernelized {ours / 2**20:.0f} MiB')
    # 1024 tokens x 32k vocab: stock builds 128 MiB logits, their fp32 copy and gradients.
    assert ours < 0.5 * stock
