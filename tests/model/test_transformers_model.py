"""TransformersModel: the seeds' training API on CPU, with a tiny Qwen3."""
import copy

import pytest
import torch

from tests.model.conftest import token_batch
from twinkle.model import TransformersModel


def make_model(config, seed=0, **kwargs):
    torch.manual_seed(seed)
    return TransformersModel(config=copy.deepcopy(config), **kwargs)


def train(model, batches, ga=1, lr=1e-2):
    model.set_optimizer('AdamW', lr=lr)
    losses = []
    for batch in batches:
        losses.append(model.forward_backward(inputs=batch)['loss'])
        model.clip_grad_and_step()
    return losses


def test_loss_falls_full_parameter(tiny_config):
    model = make_model(tiny_config)
    batch = token_batch()
    losses = train(model, [batch] * 6)
    assert losses[-1] < losses[0] - 0.5


def test_kernels_auto_and_none_give_the_same_trajectory(tiny_config):
    batches = [token_batch(seed=s) for s in range(5)]
    ours = train(make_model(tiny_config, kernels='auto'), batches)
    stock = train(make_model(tiny_config, kernels=None), batches)
    # fp32; only the order of fp32 reductions differs (fused CE, RMSNorm, SwiGLU, RoPE kernels).
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(stock), rtol=1e-5, atol=0)


def parameters_after_one_step(config, micro_batches, ga):
    model = make_model(config)
    model.set_optimizer('SGD', lr=1.0)  # SGD: parameters move by exactly the gradient
    model._state(None).gradient_accumulation_steps = ga
    for batch in micro_batches:
        model.forward_backward(inputs=batch)
        model.clip_grad_and_step(max_grad_norm=1e9)
    assert model._state(None).optimizer_steps == 1
    return {n: p.detach().clone() for n, p in model.model.named_parameters()}


def test_gradient_accumulation_normalises_by_total_tokens(tiny_config):
    batch = token_batch(size=8)
    one = parameters_after_one_step(tiny_config, [batch], ga=1)
    two = parameters_after_one_step(tiny_config, [batch[:4], batch[4:]], ga=2)
    for name, value in one.items():
        torch.testing.assert_close(two[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_micro_batch_size_gives_the_gradients_of_the_whole_batch(tiny_config):
    """forward_backward(batch, micro_batch_size=3): 8 samples in 3 micro-batches of one call, one
    step -- the parameters of one 8-sample micro-batch."""
    batch = token_batch(size=8)
    whole = make_model(tiny_config)
    whole.set_optimizer('SGD', lr=1.0)
    whole.forward_backward(inputs=batch)
    whole.clip_grad_and_step(max_grad_norm=1e9)
    split = make_model(tiny_config)
    split.set_optimizer('SGD', lr=1.0)
    result = split.forward_backward(inputs=batch, micro_batch_size=3)
    split.clip_grad_and_step(max_grad_norm=1e9)
    assert result['num_tokens'] == sum(sum(label != -100 for label in row['labels'][1:]) for row in batch)
    for (name, expected), got in zip(whole.model.named_parameters(), split.model.parameters()):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize('value', [0, 2.5, True])
def test_a_bad_micro_batch_size_is_named(tiny_config, value):
    with pytest.raises(ValueError, match='micro_batch_size'):
        make_model(tiny_config).forward_backward(inputs=token_batch(size=2), micro_batch_size=value)


def test_gradient_accumulation_waits_for_all_micro_batches(tiny_config):
    model = make_model(tiny_config)
    model.set_optimizer('AdamW', lr=1e-3)
    model._state(None).gradient_accumulation_steps = 2
    model.forward_backward(inputs=token_batch(size=2))
    assert model.clip_grad_and_step() is None
    model.forward_backward(inputs=token_batch(size=2, seed=1))
    assert isinstance(model.clip_grad_and_step(), float)


def test_lora_and_schedule_and_metrics(tiny_config):
    from peft import LoraConfig
    model = make_model(tiny_config)
    model.add_adapter_to_model('default', LoraConfig(r=4, lora_alpha=8, target_modules='all-linear'))
    model.set_optimizer('AdamW', lr=1e-2)
    model.set_lr_scheduler('LinearWarmupScheduler', num_warmup_steps=1, num_training_steps=4)
    model.forward_backward(inputs=token_batch())
    model.clip_grad_and_step()
    metric = model.calculate_metric(is_training=True)
    assert set(metric) >= {'loss', 'grad_norm', 'lr', 'tokens', 'tokens_per_second', 'steps'}
    assert all(isinstance(v, (int, float)) for v in metric.values())
    assert metric['steps'] == 1 and metric['lr'] == pytest.approx(1e-2)
    configs = model.get_train_configs()
    assert configs['adapter'] == 'default' and configs['trainable_parameters'] > 0
    assert all(not p.requires_grad for n, p in model.model.named_parameters() if 'lora_' not in n)


def test_forward_backward_before_set_optimizer_works_but_step_does_not(tiny_config):
    model = make_model(tiny_config)
    assert model.forward_backward(inputs=token_batch(size=2))['num_tokens'] > 0
    with pytest.raises(RuntimeError, match='set_optimizer'):
        model.step()


@pytest.mark.parametrize('method,name,valid', [('set_optimizer', 'Adamm', 'AdamW'),
                                               ('set_lr_scheduler', 'Cosine', 'CosineWarmupScheduler'),
                                               ('set_loss', 'CE', 'CrossEntropyLoss')])
def test_unknown_names_list_the_valid_ones(tiny_config, method, name, valid):
    model = make_model(tiny_config)
    model.set_optimizer('AdamW')
    with pytest.raises(ValueError, match=valid):
        getattr(model, method)(name)


def test_batch_without_input_ids_is_rejected(tiny_config):
    model = make_model(tiny_config)
    with pytest.raises(ValueError, match='input_ids'):
        model.forward_backward(inputs={'labels': torch.zeros(1, 4, dtype=torch.long)})
    with pytest.raises(ValueError, match='input_ids'):
        model.forward_backward(inputs=[{'labels': [1, 2]}])


def test_chunked_cross_entropy_loss_matches(tiny_config):
    batch = token_batch()
    plain = make_model(tiny_config, kernels=None)
    chunked = make_model(tiny_config, kernels=None)
    chunked.set_loss('ChunkedCrossEntropyLoss', chunk_size=7)
    a, b = plain.forward_backward(inputs=batch), chunked.forward_backward(inputs=batch)
    assert a['loss'] == pytest.approx(b['loss'], rel=1e-6)
    for (name, p), q in zip(plain.model.named_parameters(), chunked.model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_forward_only_returns_logits_and_eval_metrics(tiny_config):
    model = make_model(tiny_config)
    outputs = model.forward_only(inputs=token_batch(size=2))
    assert outputs.logits.shape[-1] == tiny_config.vocab_size
    metric = model.calculate_metric(is_training=False)
    assert metric['loss'] > 0 and 0 <= metric['accuracy'] <= 1


def test_packed_batches_train_like_padded_ones(tiny_config):
    from twinkle.processor import InputProcessor
    batch = token_batch(size=6)
    padded = make_model(tiny_config)
    packed = make_model(tiny_config)
    packed.set_processor(InputProcessor(padding_free=True))
    a, b = padded.forward_backward(inputs=batch), packed.forward_backward(inputs=batch)
    assert packed._base_model().config._attn_implementation == 'twinkle_varlen'
    # the padding-free layout masks each sample's first label, the padded one has no such token
    # to mask beyond the prompt (prompts are >= 1 token), so both count the same tokens.
    assert a['num_tokens'] == b['num_tokens']
    assert b['loss'] == pytest.approx(a['loss'], rel=1e-5)
    for (name, p), q in zip(padded.model.named_parameters(), packed.model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
