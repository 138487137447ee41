"""Samplers: prompts in, ``SampleResponse`` out (completions, per-token log-probs, a training feature).

``TorchSampler`` runs any Hugging Face causal LM with torch alone (any device, CPU included);
``vLLMSampler`` hands the same requests to a vLLM engine (the ``vllm`` extra, imported on use).
Both take trained weights through ``load_weights`` (what ``CheckpointEngineManager`` calls).
"""
from .base import Sampler
from .torch_sampler import TorchSampler

__all__ = ['Sampler', 'TorchSampler', 'vLLMSampler']


def __getattr__(name):
    if name == 'vLLMSampler':
        from .vllm_sampler import vLLMSampler
        return vLLMSampler
    raise AttributeError(name)
