"""vLLMSampler against a fake vllm module: argument mapping and output conversion."""
import sys
import types
from dataclasses import dataclass

import pytest
import torch

from twinkle import assets
from twinkle.data_format import SamplingParams


@dataclass
class Logprob:
    logprob: float
    rank: int


class FakeLLM:
    def __init__(self, model, **engine_args):
        self.model, self.engine_args, self.calls, self.resets, self.applied = model, engine_args, [], 0, []

    def generate(self, prompts, params, lora_request=None, use_tqdm=True):
        self.calls.append((prompts, params, lora_request))
        outputs = []
        for prompt in prompts:
            completions = []
            for k in range(params.n):
                tokens = [prompt['prompt_token_ids'][-1] + k, 7]
                # as vLLM at logprobs=1: the top-1 token, plus the chosen one when it is not the top
                ranked = [{tokens[0]: Logprob(-0.5, 2), 99: Logprob(-0.1, 1)}, {7: Logprob(-1.5, 1)}]
                completions.append(types.SimpleNamespace(token_ids=tokens, logprobs=ranked, finish_reason='length',
                                                         text=f'c{k}'))
            outputs.append(types.SimpleNamespace(outputs=completions))
        return outputs

    def reset_prefix_cache(self):
        self.resets += 1

    def apply_model(self, func):
        self.applied.append(func(types.SimpleNamespace(load_weights=lambda weights: [n for n, _ in weights])))


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType('vllm')
    module.LLM = FakeLLM
    module.SamplingParams = lambda **kwargs: types.SimpleNamespace(**kwargs)
    request = types.ModuleType('vllm.lora.request')
    request.LoRARequest = lambda name, lora_id, path: types.SimpleNamespace(name=name, id=lora_id, path=path)
    module.lora = types.SimpleNamespace(request=request)
    monkeypatch.setitem(sys.modules, 'vllm', module)
    return module


def test_sampling_params_and_outputs_map_like_torch_sampler(fake_vllm):
    from twinkle.sampler import vLLMSampler
    sampler = vLLMSampler(assets.tiny_model_path('qwen3'), engine_args={'max_model_len': 64, 'enable_lora': True})
    assert sampler.engine.engine_args == {'max_model_len': 64, 'enable_lora': True}
    params = SamplingParams(max_tokens=5, temperature=0.7, top_p=0.9, num_samples=2, logprobs=1, stop='x', seed=3)
    responses = sampler.sample([{'input_ids': [4, 5]}, {'input_ids': [6]}], params)
    prompts, mapped, lora = sampler.engine.calls[0]
    assert prompts == [{'prompt_token_ids': [4, 5]}, {'prompt_token_ids': [6]}] and lora is None
    assert vars(mapped) == {'n': 2, 'max_tokens': 5, 'temperature': 0.7, 'top_p': 0.9, 'top_k': -1, 'logprobs': 1,
                            'stop': ['x'], 'seed': 3}
    sequence = responses[1].sequences[1]
    assert sequence.tokens == [7, 7] and sequence.stop_reason == 'length' and sequence.text == 'c1'
    assert sequence.logprobs == [[(7, -0.5), (99, -0.1)], [(7, -1.5), (7, -1.5)]]  # TorchSampler's layout
    assert sequence.new_input_feature['labels'] == [-100, 7, 7]
    sampler.reset_prefix_cache()
    assert sampler.engine.resets == 1


def test_synced_adapter_is_served_through_a_lora_request(fake_vllm, tmp_path):
    from twinkle.sampler import vLLMSampler
    sampler = vLLMSampler(assets.tiny_model_path('qwen3'), engine_args={'enable_lora': True})
    with pytest.raises(ValueError, match="adapter_name 'default' is not loaded"):
        sampler.sample([{'input_ids': [1]}], SamplingParams(max_tokens=2), adapter_name='default')
    sampler.load_weights([('base_model.model.x.lora_A.weight', torch.ones(2, 3))], adapter_name='default',
                         peft_config={'r': 2, 'peft_type': 'LORA'})
    sampler.sample([{'input_ids': [1]}], SamplingParams(max_tokens=2), adapter_name='default')
    request = sampler.engine.calls[-1][2]
    assert request.name == 'default' and request.id == 1
    from safetensors.torch import load_file
    assert torch.equal(load_file(f'{request.path}/adapter_model.safetensors')['base_model.model.x.lora_A.weight'],
                       torch.ones(2, 3))
    sampler.load_weights([('model.norm.weight', torch.ones(3))])
    assert sampler.engine.applied == [['model.norm.weight']]


def test_missing_vllm_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, 'vllm', None)
    from twinkle.sampler import vLLMSampler
    with pytest.raises(ImportError, match=r'twinkle\[vllm\]'):
        vLLMSampler(assets.tiny_model_path('qwen3'))
