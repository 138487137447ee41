"""``vLLMSampler`` / ``TorchSampler``: the service's sampler, with the local ``sample`` arguments."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from .http import TwinkleClient, get_client


class Record(dict):
    """A dict whose keys read as attributes too (``seq.tokens`` and ``seq.get('tokens')``)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class vLLMSampler:  # noqa: N801  (the seeds' name)
    """Whichever engine the service runs; ``engine_args`` are the service's to choose and are ignored."""

    def __init__(self, model_id: Optional[str] = None, engine_args: Optional[dict] = None,
                 client: Optional[TwinkleClient] = None, **_ignored):
        self.client = get_client(client)
        self.model_id = model_id
        self.template = None

    def set_template(self, template='Template', **kwargs) -> None:
        """Recorded only: send encoded prompts (``dataset.encode(add_generation_prompt=True)``)."""
        self.template = template

    def reset_prefix_cache(self) -> None:
        """Nothing to do on the client (the service's engine manages its cache)."""

    def sample(self, inputs=None, sampling_params=None, adapter_uri: Optional[str] = None, num_samples: int = 1,
               prompts=None, **_ignored) -> Record:
        """``Record(sequences=[...])``: every prompt's ``num_samples`` sequences, prompt by prompt."""
        from .model import _features
        items = inputs if inputs is not None else prompts
        params = _params(sampling_params)
        num_samples = params.pop('num_samples', None) or num_samples
        body = {'inputs': _features(items), 'sampling_params': params, 'num_samples': num_samples,
                'adapter_uri': adapter_uri}
        answers = self.client.request('POST', '/v1/sample', body)['responses']
        return Record(sequences=[Record(sequence) for answer in answers for sequence in answer['sequences']])


TorchSampler = vLLMSampler


def _params(sampling_params) -> Dict[str, Any]:
    if sampling_params is None:
        return {}
    if hasattr(sampling_params, 'to_dict'):
        return {key: value for key, value in sampling_params.to_dict().items() if value is not None}
    return {key: value for key, value in dict(sampling_params).items() if value is not None}


__all__: List[str] = ['TorchSampler', 'vLLMSampler']
