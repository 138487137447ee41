"""Packed batches train exactly like padded ones: on the tiny Qwen3 (fp32), the summed loss and
every gradient of a padding-free packed batch (``twinkle_varlen`` attention) equal those of the
same samples right-padded (Hugging Face's SDPA). Tolerance: 1e-5 relative on the loss, 1e-5
absolute on gradients (largest ~10; only summation order differs)."""
import pytest
import torch
from transformers import AttentionInterface, AutoModelForCausalLM

from twinkle import assets
from twinkle.kernels.varlen_attention import HF_ATTENTION_NAME, hf_attention, register_hf_attention
from twinkle.processor import InputProcessor
from twinkle.template import Template

CHATS = [
    [{'role': 'user', 'content': 'Who are you?'}, {'role': 'assistant', 'content': 'I am a tiny model.'}],
    [{'role': 'system', 'content': 'Be kind.'}, {'role': 'user', 'content': '你好'},
     {'role': 'assistant', 'content': '你好！我是一个很小的模型，可以回答问题。'},
     {'role': 'user', 'content': 'And?'}, {'role': 'assistant', 'content': 'That is all.'}],
    [{'role': 'user', 'content': 'x'}, {'role': 'assistant', 'content': 'y'}],
]


@pytest.fixture(scope='module')
def features():
    template = Template(assets.tiny_model_path('qwen3'))
    return [template.encode({'messages': chat}) for chat in CHATS]


@pytest.fixture(scope='module')
def model():
    register_hf_attention()
    return AutoModelForCausalLM.from_pretrained(assets.tiny_model_path('qwen3'), attn_implementation='sdpa',
                                                dtype=torch.float32)


@pytest.fixture(scope='module')
def padded(model, features):
    """The expectation: the same samples right-padded, through Hugging Face's SDPA."""
    return summed_loss_and_grads(model, InputProcessor()(features), 'sdpa')


@pytest.fixture
def attention_calls():
    """Counts calls of twinkle_varlen (registered globally, so restored after the test)."""
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs.get('position_ids'))
        return hf_attention.hf_varlen_attention(*args, **kwargs)

    AttentionInterface.register(HF_ATTENTION_NAME, spy)
    yield calls
    register_hf_attention()


def summed_loss_and_grads(model, batch, attention):
    """Summed next-token cross entropy of a collated batch, and the gradients of every parameter."""
    model.config._attn_implementation = attention
    model.zero_grad()
    extra = {key: batch[key] for key in ('attention_mask', 'cu_seq_lens_q') if key in batch}
    logits = model(input_ids=batch['input_ids'], position_ids=batch['position_ids'], **extra).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch['labels'][:, 1:].flatten(),
                                             ignore_index=-100, reduction='sum')
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_same_training(actual, expected):
    torch.testing.assert_close(actual[0], expected[0], rtol=1e-5, atol=0)
    for name, grad in expected[1].items():
        torch.testing.assert_close(actual[1][name], grad, rtol=0, atol=1e-5, msg=name)


def test_packed_equals_padded(model, features, padded, attention_calls):
    batch = InputProcessor(padding_free=True)(features)
    packed = summed_loss_and_grads(model, batch, HF_ATTENTION_NAME)
    assert len(attention_calls) == model.config.num_hidden_layers  # the packed pass really used the op
    assert batch['input_ids'].shape[0] == 1 and (batch['labels'] != -100).sum() == sum(
        (torch.tensor(f['labels'][1:]) != -100).sum() for f in features)
    assert_same_training(packed, padded)


def test_position_ids_alone_mark_the_boundaries(model, features, padded, attention_calls):
    """Without cu_seq_lens_q the op derives the boundaries from position_ids restarting at 0."""
    batch = InputProcessor(padding_free=True)(features)
    del batch['cu_seq_lens_q']
    assert_same_training(summed_loss_and_grads(model, batch, HF_ATTENTION_NAME), padded)


def test_without_boundaries_the_samples_mix(model, features, padded, attention_calls):
    """The control that makes the tests above able to fail: one long sequence attends across samples."""
    batch = InputProcessor(padding_free=True)(features)
    del batch['cu_seq_lens_q']
    batch['position_ids'] = torch.arange(batch['input_ids'].shape[1])[None]
    mixed_loss, _ = summed_loss_and_grads(model, batch, HF_ATTENTION_NAME)
    assert abs(mixed_loss - padded[0]) > 1e-3


@pytest.mark.parametrize('padding_side', ['right', 'left'])
def test_padded_batches_through_twinkle_varlen(model, features, padded, padding_side, attention_calls):
    """A padding mask reaches the op as 2-D and pads are dropped, so padded rows work too."""
    batch = InputProcessor(padding_side=padding_side)(features)
    assert_same_training(summed_loss_and_grads(model, batch, HF_ATTENTION_NAME), padded)
    assert attention_calls


def test_hf_loss_matches_too(model, features):
    """Hugging Face's own mean loss (which shifts labels across the whole packed row) agrees,
    because the collator masks the label of every sample's first token."""
    model.config._attn_implementation = 'sdpa'
    with torch.no_grad():
        padded = model(**InputProcessor()(features)).loss
        model.config._attn_implementation = HF_ATTENTION_NAME
        packed = model(**InputProcessor(padding_free=True)(features)).loss
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=0)


def test_loads_by_name():
    register_hf_attention()
    loaded = AutoModelForCausalLM.from_pretrained(assets.tiny_model_path('qwen3'),
                                                  attn_implementation=HF_ATTENTION_NAME)
    assert loaded.config._attn_implementation == HF_ATTENTION_NAME


def test_rejects_what_it_cannot_do(model):
    layer = model.model.layers[0].self_attn
    q = torch.randn(1, 4, 5, 16)
    kv = torch.randn(1, 2, 5, 16)
    with pytest.raises(ValueError, match='dropout'):
        hf_attention.hf_varlen_attention(layer, q, kv, kv, None, dropout=0.1)
    with pytest.raises(ValueError, match='KV cache'):
        hf_attention.hf_varlen_attention(layer, q, torch.randn(1, 2, 7, 16), torch.randn(1, 2, 7, 16), None)
    with pytest.raises(ValueError, match='sliding window'):
        hf_attention.hf_varlen_attention(layer, q, kv, kv, None, sliding_window=4)
    with pytest.raises(ValueError, match='takes a 2-D padding mask'):
        hf_attention.hf_varlen_attention(layer, q, kv, kv, torch.ones(1, 1, 5, 5, dtype=torch.bool))
