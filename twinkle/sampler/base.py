"""What every sampler does the same: templates, prompt encoding, training features of completions."""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence

from twinkle.data_format import SampledSequence, SampleResponse, SamplingParams
from twinkle.utils.labels import IGNORE_INDEX
from twinkle.utils.remote import RemoteCapable, remote_method


class Sampler(RemoteCapable):
    """``sample(prompts, sampling_params) -> [SampleResponse per prompt]``; prompts are
    trajectories (chats, encoded here with the generation prompt) or already encoded features
    (``input_ids``; their ``messages`` / ``user_data`` are carried into the training feature)."""

    template = None
    model_id: Optional[str] = None

    def set_template(self, template='Template', **kwargs) -> None:
        from twinkle.template import build_template
        self.template = build_template(template, self.model_id, **kwargs)

    @remote_method('slice', 'concat', sliced=('prompts',))
    def sample(self, prompts, sampling_params: Optional[SamplingParams] = None, adapter_name: Optional[str] = None,
               adapter_uri: Optional[str] = None) -> List[SampleResponse]:
        raise NotImplementedError

    def load_weights(self, weights, adapter_name: Optional[str] = None, peft_config: Optional[dict] = None) -> None:
        """Take trained weights by Hugging Face / peft name: the base model's (``adapter_name`` None)
        or an adapter's (created from ``peft_config`` if the sampler does not hold it yet)."""
        raise NotImplementedError

    def reset_prefix_cache(self) -> None:
        """Forget cached prompt prefixes (their K/V are stale after a weight sync)."""

    # -- shared ------------------------------------------------------------------------------------
    @staticmethod
    def _params(sampling_params: Optional[SamplingParams]) -> SamplingParams:
        params = sampling_params if sampling_params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f'sampling_params must be a SamplingParams, got {type(params).__name__}')
        return params

    def _prompt_ids(self, prompts: Sequence[Mapping[str, Any]]) -> List[List[int]]:
        if isinstance(prompts, Mapping) or not isinstance(prompts, Sequence) or not prompts:
            raise ValueError('prompts must be a non-empty list of trajectories or encoded features')
        encoded = []
        for index, prompt in enumerate(prompts):
            if not isinstance(prompt, Mapping):
                raise ValueError(f'prompts[{index}] must be a dict (a trajectory or a feature), got {type(prompt).__name__}')
            if prompt.get('input_ids') is not None:
                ids = list(prompt['input_ids'])
            elif prompt.get('messages'):
                if self.template is None:
                    raise ValueError('prompts are chats: call set_template(...) first, or pass encoded input_ids')
                ids = self.template.encode(prompt, add_generation_prompt=True, sample=index)['input_ids']
            else:
                raise ValueError(f'prompts[{index}] has neither input_ids nor messages')
            if not ids:
                raise ValueError(f'prompts[{index}] encodes to no tokens')
            encoded.append(ids)
        return encoded

    def _sequence(self, prompt: Mapping[str, Any], prompt_ids: List[int], tokens: List[int], logprobs,
                  stop_reason: str, text: str) -> SampledSequence:
        """The completion with its training feature: prompt + completion, labels on the completion."""
        if not tokens:
            raise RuntimeError('the sampler produced an empty completion (max_tokens >= 1 makes at least one token)')
        input_ids = prompt_ids + tokens
        messages = [dict(m) for m in prompt.get('messages') or []]
        if messages and messages[-1].get('role') == 'assistant':  # a reference answer is not the completion
            messages = messages[:-1]
        feature: Dict[str, Any] = {
            'input_ids': input_ids, 'labels': [IGNORE_INDEX] * len(prompt_ids) + tokens,
            'attention_mask': [1] * len(input_ids), 'position_ids': list(range(len(input_ids))),
            'length': len(input_ids), 'messages': messages + [{'role': 'assistant', 'content': text}]}
        if prompt.get('user_data') is not None:
            feature['user_data'] = prompt['user_data']
        return SampledSequence(tokens=tokens, logprobs=logprobs, stop_reason=stop_reason, text=text,
                               new_input_feature=feature)
