"""TorchSampler: batched generation with a KV cache, torch only (any device, CPU included).

Log-probs are those of the model's own distribution (before temperature / top-k / top-p), what
vLLM returns by default (``logprobs_mode='raw_logprobs'``) and what the training model computes
for the same tokens, so GRPO's importance ratio starts at exactly 1 on-policy. A completion ends
at an end-of-sequence token (kept: the model learns to stop), at a stop string (the tokens up to
the one completing it are kept, the text is cut before it) or at ``max_tokens``.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from twinkle import backends, hub
from twinkle.data_format import SampleResponse, SamplingParams
from twinkle.utils.logger import get_logger

from .base import Sampler

logger = get_logger(__name__)


class TorchSampler(Sampler):
    """Args: ``model_id`` (local path, ``ms://``, ``hf://``) or a loaded ``model``; ``device_mesh``
    (each rank samples the prompts it is given: data parallel only); ``dtype`` (default fp32)."""

    def __init__(self, model_id: Optional[str] = None, *, model=None, device_mesh=None, dtype=torch.float32,
                 remote_group: Optional[str] = None, **model_kwargs):
        if (model_id is None) == (model is None):
            raise ValueError('TorchSampler: pass exactly one of model_id and model')
        if device_mesh is not None:
            device_mesh.refuse_unapplied(('dp',), 'TorchSampler', {})
        self.model_id, self.device_mesh = model_id, device_mesh
        self.device = backends.current().local_device()
        if model is None:
            from transformers import AutoModelForCausalLM
            model = AutoModelForCausalLM.from_pretrained(hub.model_dir(model_id), dtype=dtype, **model_kwargs)
        self.model = model.to(self.device).eval()

    # -- weights ----------------------------------------------------------------------------------
    def load_weights(self, weights, adapter_name: Optional[str] = None, peft_config: Optional[dict] = None) -> None:
        if adapter_name is None:
            target = self.model.get_base_model() if hasattr(self.model, 'get_base_model') else self.model
            own = dict(target.named_parameters())
            unknown = []
            with torch.no_grad():
                for name, tensor in weights:
                    if name in own:
                        own[name].copy_(tensor)
                    else:
                        unknown.append(name)
            if unknown:
                raise ValueError(f'load_weights: {len(unknown)} weights the sampler\'s model lacks {unknown[:5]}')
            return
        import peft
        from peft.utils import set_peft_model_state_dict
        if adapter_name not in getattr(self.model, 'peft_config', {}):
            if peft_config is None:
                raise ValueError(f'load_weights: adapter {adapter_name!r} is new to the sampler; pass its peft_config')
            config = peft.LoraConfig(**{k: v for k, v in peft_config.items() if k in peft.LoraConfig.__dataclass_fields__})
            if isinstance(self.model, peft.PeftModel):
                self.model.add_adapter(adapter_name, config)
            else:
                self.model = peft.get_peft_model(self.model, config, adapter_name=adapter_name).eval()
        result = set_peft_model_state_dict(self.model, dict(weights), adapter_name=adapter_name)
        if result.unexpected_keys:
            raise ValueError(f'load_weights: adapter {adapter_name!r} lacks {list(result.unexpected_keys)[:5]}')

    def _use_adapter(self, adapter_name: Optional[str], adapter_uri: Optional[str]):
        """The context the completions run in: the named adapter active, or none (the base model)."""
        import contextlib
        if adapter_uri is not None:
            import peft
            adapter_name = adapter_name or adapter_uri
            if adapter_name not in getattr(self.model, 'peft_config', {}):
                if isinstance(self.model, peft.PeftModel):
                    self.model.load_adapter(hub.model_dir(adapter_uri), adapter_name=adapter_name)
                else:
                    self.model = peft.PeftModel.from_pretrained(self.model, hub.model_dir(adapter_uri),
                                                                adapter_name=adapter_name).eval()
        adapters = getattr(self.model, 'peft_config', {})
        if adapter_name is None:
            return self.model.disable_adapter() if adapters else contextlib.nullcontext()
        if adapter_name not in adapters:
            raise ValueError(f'adapter_name {adapter_name!r} is not loaded in the sampler (it has '
                             f'{sorted(adapters) or "none"}): sync it or pass adapter_uri=')
        self.model.set_adapter(adapter_name)
        return contextlib.nullcontext()

    # -- sampling ---------------------------------------------------------------------------------
    def sample(self, prompts, sampling_params: Optional[SamplingParams] = None, adapter_name: Optional[str] = None,
               adapter_uri: Optional[str] = None) -> List[SampleResponse]:
        params = self._params(sampling_params)
        prompt_ids = self._prompt_ids(prompts)
        rows = [ids for ids in prompt_ids for _ in range(params.num_samples)]
        generator = torch.Generator(device=self.device)
        generator.manual_seed(params.seed if params.seed is not None else int(torch.randint(2**62, ()).item()))
        with self._use_adapter(adapter_name, adapter_uri), torch.no_grad():
            completions = self._generate(rows, params, generator)
        responses = []
        for index, prompt in enumerate(prompts):
            start = index * params.num_samples
            responses.append(SampleResponse(sequences=[
                self._sequence(prompt, prompt_ids[index], *completions[start + k])
                for k in range(params.num_samples)]))
        return responses

    def _generate(self, rows: List[List[int]], params: SamplingParams, generator: torch.Generator):
        """(tokens, logprobs, stop_reason, text) per row; all rows advance together, left-padded."""
        eos = _eos_ids(self.model)
        longest = max(len(ids) for ids in rows)
        pad = eos[0] if eos else 0
        input_ids = torch.tensor([[pad] * (longest - len(ids)) + ids for ids in rows], device=self.device)
        mask = torch.tensor([[0] * (longest - len(ids)) + [1] * len(ids) for ids in rows], device=self.device)
        tokens: List[List[int]] = [[] for _ in rows]
        logprobs: List[list] = [[] for _ in rows]
        reasons: List[Optional[str]] = [None] * len(rows)
        texts = [''] * len(rows)
        cache, step_ids = None, input_ids
        for _ in range(params.max_tokens):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -step_ids.shape[1]:]
            out = self.model(input_ids=step_ids, attention_mask=mask, position_ids=positions, cache=cache,
                             use_cache=True, logits_to_keep=1)
            cache = out.cache
            raw = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
            chosen = _choose(raw, params, generator)
            chosen_logprobs = raw.gather(1, chosen[:, None])[:, 0]
            top = raw.topk(params.logprobs, dim=-1) if params.logprobs else None
            for row, (token, logprob) in enumerate(zip(chosen.tolist(), chosen_logprobs.tolist())):
                if reasons[row] is not None:
                    continue
                entry = [(token, logprob)]
                if top is not None:
                    entry += list(zip(top.indices[row].tolist(), top.values[row].tolist()))
                tokens[row].append(token)
                logprobs[row].append(entry)
                reasons[row], texts[row] = self._finished(tokens[row], token, eos, params)
            if all(reason is not None for reason in reasons):
                break
            step_ids = chosen[:, None]
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
        return [(tokens[r], logprobs[r], reasons[r] or 'length',
                 texts[r] if reasons[r] else self._decode(tokens[r])) for r in range(len(rows))]

    def _finished(self, tokens: List[int], token: int, eos: List[int], params: SamplingParams):
        if token in eos:
            return 'stop', self._decode(tokens[:-1])
        if params.stop:
            text = self._decode(tokens)
            hits = [text.find(stop) for stop in params.stop if stop in text]
            if hits:
                return 'stop', text[:min(hits)]
        return None, ''

    def _decode(self, tokens: List[int]) -> str:
        if self.template is not None:
            return self.template.decode(tokens, skip_special_tokens=True)
        tokenizer = getattr(self, '_tokenizer', None)
        if tokenizer is None and self.model_id is None:
            raise ValueError('TorchSampler built from a model: call set_template(...) so completions can be decoded')
        if tokenizer is None:
            from transformers import AutoTokenizer
            self._tokenizer = tokenizer = AutoTokenizer.from_pretrained(hub.model_dir(self.model_id))
        return tokenizer.decode(tokens, skip_special_tokens=True)


def _choose(raw: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> torch.Tensor:
    """The next token per row: greedy at temperature 0, else a draw after top-k and top-p."""
    if params.temperature == 0:
        return raw.argmax(dim=-1)
    scores = raw / params.temperature
    if params.top_k is not None and params.top_k < scores.shape[-1]:
        kth = scores.topk(params.top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float('-inf'))
    if params.top_p < 1:
        ordered, order = scores.sort(dim=-1, descending=True)
        before = ordered.softmax(-1).cumsum(-1) - ordered.softmax(-1)  # mass of the tokens ranked above
        scores = scores.scatter(1, order, ordered.masked_fill(before >= params.top_p, float('-inf')))
    return torch.multinomial(scores.softmax(-1), 1, generator=generator)[:, 0]


def _eos_ids(model) -> List[int]:
    config = getattr(model, 'generation_config', None) or model.config
    eos = getattr(config, 'eos_token_id', None)
    if eos is None:
        eos = getattr(model.config, 'eos_token_id', None)
    return [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
