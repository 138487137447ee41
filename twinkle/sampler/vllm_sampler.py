"""vLLMSampler: the same requests and ``SampleResponse`` through a vLLM engine (extra ``vllm``).

Mapping: ``SamplingParams`` -> ``vllm.SamplingParams`` (num_samples -> n, top_k None -> -1,
logprobs None -> 0: the chosen token's log-prob is always returned); prompts go as token ids, so
both samplers see the same tokens. LoRA (``engine_args={'enable_lora': True, ...}``): an adapter
synced by name is written as a peft directory and served through ``LoRARequest``; base weights
are loaded into the engine's model with ``LLM.apply_model``. Log-probs are vLLM's default
``raw_logprobs`` (the model's distribution before sampling transforms), as TorchSampler's.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Dict, List, Optional

from twinkle import hub
from twinkle.data_format import SampleResponse, SamplingParams

from .base import Sampler


def _vllm():
    try:
        import vllm
    except ImportError as error:
        raise ImportError('vLLMSampler needs vLLM: pip install "twinkle[vllm]" (or use TorchSampler, '
                          'torch only)') from error
    return vllm


class vLLMSampler(Sampler):  # noqa: N801  (the seeds' name)
    """Args: ``model_id``; ``engine_args`` for ``vllm.LLM`` (gpu_memory_utilization, max_model_len,
    enable_lora, max_lora_rank, ...); ``device_mesh``: data-parallel copies only."""

    def __init__(self, model_id: str, engine_args: Optional[Dict[str, Any]] = None, device_mesh=None,
                 remote_group: Optional[str] = None):
        if device_mesh is not None:
            device_mesh.refuse_unapplied(('dp',), 'vLLMSampler', {})
        if engine_args is not None and not isinstance(engine_args, dict):
            raise ValueError(f'engine_args must be a dict of vllm.LLM arguments, got {type(engine_args).__name__}')
        self.vllm = _vllm()
        self.model_id, self.engine_args = model_id, dict(engine_args or {})
        self.engine = self.vllm.LLM(model=hub.model_dir(model_id), **self.engine_args)
        self._adapters: Dict[str, Any] = {}  # name -> LoRARequest
        self._adapter_dir = tempfile.mkdtemp(prefix='twinkle-vllm-lora-')

    def sample(self, prompts, sampling_params: Optional[SamplingParams] = None, adapter_name: Optional[str] = None,
               adapter_uri: Optional[str] = None) -> List[SampleResponse]:
        params = self._params(sampling_params)
        prompt_ids = self._prompt_ids(prompts)
        request = self._lora_request(adapter_name, adapter_uri)
        vllm_params = self.vllm.SamplingParams(
            n=params.num_samples, max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
            top_k=-1 if params.top_k is None else params.top_k, logprobs=params.logprobs or 0, stop=params.stop or None,
            seed=params.seed)
        outputs = self.engine.generate([{'prompt_token_ids': ids} for ids in prompt_ids], vllm_params,
                                       lora_request=request, use_tqdm=False)
        responses = []
        for prompt, ids, output in zip(prompts, prompt_ids, outputs):
            responses.append(SampleResponse(sequences=[
                self._sequence(prompt, ids, list(c.token_ids), _logprobs(c, params.logprobs or 0),
                               _reason(c.finish_reason), c.text)
                for c in output.outputs]))
        return responses

    def reset_prefix_cache(self) -> None:
        self.engine.reset_prefix_cache()

    def load_weights(self, weights, adapter_name: Optional[str] = None, peft_config: Optional[dict] = None) -> None:
        if adapter_name is None:
            weights = list(weights)
            self.engine.apply_model(lambda model: model.load_weights(weights=weights))
            return
        if not self.engine_args.get('enable_lora'):
            raise ValueError("load_weights: an adapter needs engine_args={'enable_lora': True, 'max_lora_rank': r}")
        if peft_config is None:
            raise ValueError(f'load_weights: adapter {adapter_name!r} needs its peft_config to be served by vLLM')
        from safetensors.torch import save_file
        version = len(self._adapters) + 1  # a new id per sync: vLLM caches adapters by id
        path = os.path.join(self._adapter_dir, f'{adapter_name}-{version}')
        os.makedirs(path)
        save_file({name: tensor.contiguous().cpu() for name, tensor in weights},
                  os.path.join(path, 'adapter_model.safetensors'))
        with open(os.path.join(path, 'adapter_config.json'), 'w') as handle:
            json.dump(peft_config, handle, default=str)
        self._adapters[adapter_name] = self.vllm.lora.request.LoRARequest(adapter_name, version, path)

    def _lora_request(self, adapter_name: Optional[str], adapter_uri: Optional[str]):
        if adapter_uri is not None:
            name = adapter_name or adapter_uri
            self._adapters.setdefault(name, self.vllm.lora.request.LoRARequest(
                name, len(self._adapters) + 1, hub.model_dir(adapter_uri)))
            return self._adapters[name]
        if adapter_name is None:
            return None
        if adapter_name not in self._adapters:
            raise ValueError(f'adapter_name {adapter_name!r} is not loaded in the sampler (it has '
                             f'{sorted(self._adapters) or "none"}): sync it or pass adapter_uri=')
        return self._adapters[adapter_name]


def _logprobs(completion, top: int) -> list:
    """vLLM's per-token {token_id: Logprob} (the ``top`` most likely, plus the chosen one when it is not
    among them) -> [(chosen, logprob), then the ``top`` most likely by rank], as TorchSampler's."""
    entries = []
    for token, ranked in zip(completion.token_ids, completion.logprobs or []):
        alternatives = sorted(ranked.items(), key=lambda item: item[1].rank)[:top]
        entries.append([(token, ranked[token].logprob)] + [(t, p.logprob) for t, p in alternatives])
    if len(entries) != len(completion.token_ids):
        raise RuntimeError('vLLM returned no log-probs for some tokens (logprobs=0 should give the chosen one)')
    return entries


def _reason(finish_reason: Optional[str]) -> str:
    return 'length' if finish_reason == 'length' else 'stop'
