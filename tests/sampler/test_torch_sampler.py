"""TorchSampler against the training model and against its own contract."""
import pytest
import torch
from peft import LoraConfig

from twinkle import assets
from twinkle.checkpoint_engine import CheckpointEngineManager
from twinkle.data_format import SamplingParams
from twinkle.model import TransformersModel
from twinkle.sampler import TorchSampler

PROMPTS = [{'messages': [{'role': 'user', 'content': 'What is 2 + 3?'}], 'user_data': [{'ground_truth': '5'}]},
           {'input_ids': [11, 22, 33]}]


@pytest.fixture(scope='module')
def sampler():
    sampler = TorchSampler(assets.tiny_model_path('qwen3'))
    sampler.set_template('Template')
    return sampler


def test_logprobs_equal_the_training_models_log_softmax(sampler):
    """Train-sample consistency: the sampled tokens' log-probs are the trainer's, fp32 1e-5."""
    responses = sampler.sample(PROMPTS, SamplingParams(max_tokens=6, num_samples=2, seed=3, temperature=0.8))
    model = TransformersModel(model_id=assets.tiny_model_path('qwen3'), mixed_precision='fp32', kernels=None)
    for response in responses:
        for sequence in response.sequences:
            feature = sequence.new_input_feature
            logits = model.forward_only(inputs=[{'input_ids': feature['input_ids']}]).logits[0].float()
            prompt_length = len(feature['input_ids']) - len(sequence.tokens)
            want = torch.log_softmax(logits, -1)[prompt_length - 1:-1].gather(1, torch.tensor(sequence.tokens)[:, None])
            got = torch.tensor([entry[0][1] for entry in sequence.logprobs])
            torch.testing.assert_close(got, want[:, 0], rtol=0, atol=1e-5)
            assert feature['labels'][prompt_length:] == sequence.tokens
            assert set(feature['labels'][:prompt_length]) == {-100}


def test_seeded_calls_repeat_and_greedy_is_argmax(sampler):
    params = SamplingParams(max_tokens=5, num_samples=3, seed=7)
    first, again = sampler.sample(PROMPTS, params), sampler.sample(PROMPTS, params)
    assert [[s.tokens for s in r.sequences] for r in first] == [[s.tokens for s in r.sequences] for r in again]
    greedy = sampler.sample(PROMPTS, SamplingParams(max_tokens=5, temperature=0))
    top1 = sampler.sample(PROMPTS, SamplingParams(max_tokens=5, top_k=1, seed=1))
    assert [r.sequences[0].tokens for r in greedy] == [r.sequences[0].tokens for r in top1]
    sequence = sampler.sample([PROMPTS[1]], SamplingParams(max_tokens=3, temperature=0, logprobs=2))[0].sequences[0]
    assert all(len(entry) == 3 and entry[0] == entry[1] for entry in sequence.logprobs)  # greedy = the top one


def test_max_tokens_stop_strings_and_the_training_feature(sampler):
    response = sampler.sample([PROMPTS[0]], SamplingParams(max_tokens=4, seed=0))[0]
    sequence = response.sequences[0]
    assert len(sequence.tokens) == 4 and sequence.stop_reason == 'length'
    assert sequence.get('tokens') == sequence['tokens'] == sequence.tokens and response['sequences'] == [sequence]
    feature = sequence.new_input_feature
    assert feature['messages'][-1] == {'role': 'assistant', 'content': sequence.text}
    assert feature['user_data'] == [{'ground_truth': '5'}]
    stop = sequence.text[1:3] or sequence.text
    stopped = sampler.sample([PROMPTS[0]], SamplingParams(max_tokens=4, seed=0, stop=[stop]))[0].sequences[0]
    assert stopped.stop_reason == 'stop' and stop not in stopped.text and len(stopped.tokens) <= 4


def test_synced_adapter_samples_and_unknown_adapter_is_named(sampler):
    model = TransformersModel(model_id=assets.tiny_model_path('qwen3'), mixed_precision='fp32')
    model.add_adapter_to_model('default', LoraConfig(target_modules='all-linear', r=4, init_lora_weights=False))
    fresh = TorchSampler(assets.tiny_model_path('qwen3'))
    fresh.set_template('Template')
    CheckpointEngineManager(model=model, sampler=fresh).sync_weights()
    params = SamplingParams(max_tokens=3, seed=5)
    with_adapter = fresh.sample([PROMPTS[1]], params, adapter_name='default')[0].sequences[0]
    base = fresh.sample([PROMPTS[1]], params)[0].sequences[0]
    assert with_adapter.logprobs[0][0][1] != base.logprobs[0][0][1]
    for name, tensor in model.model.named_parameters():
        if 'lora_' in name:
            assert torch.equal(dict(fresh.model.named_parameters())[name], tensor), name
    with pytest.raises(ValueError, match="adapter_name 'other' is not loaded"):
        fresh.sample([PROMPTS[1]], params, adapter_name='other')


@pytest.mark.parametrize('call, match', [
    (lambda: SamplingParams(max_tokens=0), 'max_tokens must be an int >= 1'),
    (lambda: SamplingParams(temperature=-1), 'temperature'),
    (lambda: SamplingParams(top_p=0), 'top_p'),
    (lambda: SamplingParams(stop=['']), 'stop'),
    (lambda: SamplingParams(num_samples=1.5), 'num_samples'),
])
def test_bad_sampling_params_are_named(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_bad_prompts_are_named(sampler):
    with pytest.raises(ValueError, match='non-empty list'):
        sampler.sample([], SamplingParams())
    with pytest.raises(ValueError, match=r'prompts\[0\] has neither'):
        sampler.sample([{'text': 'x'}], SamplingParams())
    with pytest.raises(ValueError, match='sampling_params must be'):
        sampler.sample(PROMPTS, {'max_tokens': 3})


def test_unknown_template_name_is_refused(sampler):
    with pytest.raises(ValueError, match="unknown template 'Llama9Template'"):
        sampler.set_template('Llama9Template')


def test_set_template_takes_the_seeds_model_id_keyword(sampler):
    sampler.set_template('Qwen3_5Template', model_id=assets.tiny_model_path('qwen3'))
    assert sampler.template.tokenizer is not None
