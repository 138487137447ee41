"""``MultiLoraTransformersModel``: an adapter of yours on the service's base model, the local methods."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from .http import TwinkleClient, get_client


class MultiLoraTransformersModel:
    def __init__(self, model_id: Optional[str] = None, client: Optional[TwinkleClient] = None, **_ignored):
        self.client = get_client(client)
        served = self.client.get_server_capabilities()['model_id']
        if model_id is not None and model_id != served:
            raise ValueError(f'model_id={model_id!r}: this service trains adapters on {served!r}')
        self.model_id = served
        self.adapter_name: Optional[str] = None

    # -- set-up -------------------------------------------------------------------------------------
    def add_adapter_to_model(self, adapter_name: str, config, gradient_accumulation_steps: int = 1,
                             seed: Optional[int] = None, **_ignored) -> None:
        body = {'name': adapter_name, 'lora': _lora_spec(config),
                'gradient_accumulation_steps': gradient_accumulation_steps}
        if seed is not None:
            body['seed'] = seed
        self.client.request('POST', '/v1/adapters', body)
        self.adapter_name = adapter_name

    def remove_adapter(self, adapter_name: Optional[str] = None) -> None:
        self.client.request('DELETE', f'/v1/adapters/{self._name(adapter_name)}')

    def set_optimizer(self, optimizer_cls='AdamW', adapter_name: Optional[str] = None, **kwargs) -> None:
        self._configure('set_optimizer', optimizer_cls, adapter_name, kwargs)

    def set_lr_scheduler(self, scheduler_cls='CosineWarmupScheduler', adapter_name: Optional[str] = None,
                         **kwargs) -> None:
        self._configure('set_lr_scheduler', scheduler_cls, adapter_name, kwargs)

    def set_loss(self, loss_cls='CrossEntropyLoss', adapter_name: Optional[str] = None, **kwargs) -> None:
        self._configure('set_loss', loss_cls, adapter_name, kwargs)

    def set_template(self, template='Template', adapter_name: Optional[str] = None, **kwargs) -> None:
        kwargs.pop('model_id', None)  # the service's base model
        self._configure('set_template', template, adapter_name, kwargs)

    def set_processor(self, processor='InputProcessor', adapter_name: Optional[str] = None, **kwargs) -> None:
        self._configure('set_processor', processor, adapter_name, kwargs)

    # -- compute ------------------------------------------------------------------------------------
    def forward_backward(self, inputs, adapter_name: Optional[str] = None, micro_batch_size: Optional[int] = None,
                         **loss_inputs) -> Dict[str, float]:
        body = {'inputs': _features(inputs), 'micro_batch_size': micro_batch_size}
        for key, value in loss_inputs.items():
            body[key] = _plain_logps(value) if key in ('old_logps', 'ref_logps') else _plain(value)
        return self._post(adapter_name, 'forward_backward', body)

    def compute_logprobs(self, inputs, adapter_name: Optional[str] = None) -> List[List[float]]:
        """Per sample, the log-prob of each labelled token (inference only)."""
        return self._post(adapter_name, 'logprobs', {'inputs': _features(inputs)})['logprobs']

    def clip_grad_norm(self, max_grad_norm: float = 1.0, adapter_name: Optional[str] = None):
        return self._call('clip_grad_norm', adapter_name, max_grad_norm=max_grad_norm)

    def step(self, adapter_name: Optional[str] = None):
        return self._call('step', adapter_name)

    def zero_grad(self, adapter_name: Optional[str] = None) -> None:
        self._call('zero_grad', adapter_name)

    def lr_step(self, adapter_name: Optional[str] = None) -> None:
        self._call('lr_step', adapter_name)

    def clip_grad_and_step(self, max_grad_norm: float = 1.0, adapter_name: Optional[str] = None):
        return self._call('clip_grad_and_step', adapter_name, max_grad_norm=max_grad_norm)

    def calculate_metric(self, is_training: bool = True, adapter_name: Optional[str] = None) -> Dict[str, float]:
        return self._call('calculate_metric', adapter_name, is_training=is_training)

    def get_train_configs(self, adapter_name: Optional[str] = None) -> Dict[str, Any]:
        return self._call('get_train_configs', adapter_name)

    # -- checkpoints --------------------------------------------------------------------------------
    def save(self, name: str, save_optimizer: bool = False, adapter_name: Optional[str] = None, **_ignored) -> str:
        """Returns the checkpoint's ``twinkle://`` path (a sampler's ``adapter_uri``, ``load``'s path)."""
        return self._post(adapter_name, 'save', {'name': name, 'save_optimizer': save_optimizer})['path']

    def load(self, path: str, adapter_name: Optional[str] = None, load_optimizer: bool = False) -> None:
        self._post(adapter_name, 'load', {'path': path, 'load_optimizer': load_optimizer})

    def resume_from_checkpoint(self, path: str, adapter_name: Optional[str] = None) -> None:
        self.load(path, adapter_name, load_optimizer=True)

    def upload_to_hub(self, checkpoint_dir: str, hub_model_id: str, private: bool = True, **_ignored) -> str:
        """Push a saved checkpoint (its ``twinkle://`` path) to ``ms://org/name`` / ``hf://org/name``."""
        name = checkpoint_dir.rstrip('/').rsplit('/', 1)[-1]
        return self.client.request('POST', f'/v1/checkpoints/{name}/push',
                                   {'hub_model_id': hub_model_id, 'private': private})['pushed']

    # -- internals ----------------------------------------------------------------------------------
    def _name(self, adapter_name: Optional[str]) -> str:
        name = adapter_name or self.adapter_name
        if name is None:
            raise ValueError('add an adapter first (add_adapter_to_model), or pass adapter_name=')
        return name

    def _post(self, adapter_name, route: str, body: dict):
        return self.client.request('POST', f'/v1/adapters/{self._name(adapter_name)}/{route}', body)

    def _configure(self, setter: str, value, adapter_name, kwargs) -> None:
        if not isinstance(value, str):
            raise ValueError(f'{setter}: pass a name (a class cannot be sent to the service), got {value!r}')
        self._post(adapter_name, 'configure', {'setter': setter, 'value': value, 'kwargs': _plain(kwargs)})

    def _call(self, method: str, adapter_name, **kwargs):
        return self._post(adapter_name, 'call', {'method': method, 'kwargs': kwargs})['result']


def _lora_spec(config) -> dict:
    if isinstance(config, dict):
        return dict(config)
    targets = config.target_modules
    spec = {'r': config.r, 'lora_alpha': config.lora_alpha, 'lora_dropout': config.lora_dropout,
            'target_modules': targets if isinstance(targets, str) else sorted(targets)}
    return spec


def _features(inputs) -> list:
    items = inputs if isinstance(inputs, (list, tuple)) else [inputs]
    return [_plain(dict(item)) for item in items]


def _plain(value):
    """JSON-ready: numpy / torch values to Python lists and numbers."""
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if hasattr(value, 'tolist'):
        return value.tolist()
    return value


def _plain_logps(rows):
    """Per-token log-probs as numbers; a sampler's ``[[token, logprob], ...]`` per step is accepted too."""
    plain = _plain(rows)
    return [[step[0][1] if isinstance(step, list) and step and isinstance(step[0], list) else step for step in row]
            for row in plain]
