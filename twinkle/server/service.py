"""What the server does for a tenant, independent of HTTP: adapters, training calls, checkpoints, sampling.

Every method takes the caller's tenant first and touches only that tenant's things: an adapter is
found by (tenant, name), a checkpoint lives under ``checkpoint_dir/<tenant>/`` and is addressed as
``twinkle://<tenant>/<name>``; another tenant's name is simply not found (404) and another tenant's
path is refused (403). All model work runs on the ``FairExecutor`` (one call at a time).
"""
from __future__ import annotations

import os
import shutil
import threading
from typing import Any, Dict, List, Optional

from twinkle.utils.logger import get_logger

from .auth import check_name
from .config import ServerConfig
from twinkle.hub import HubUnavailableError

from .executor import FairExecutor, QueueFull

logger = get_logger(__name__)

URI_PREFIX = 'twinkle://'
# What a tenant may configure by name (no code crosses the wire); their arguments are JSON values.
SETTERS = ('set_optimizer', 'set_lr_scheduler', 'set_loss', 'set_template', 'set_processor')
STEPS = ('clip_grad_norm', 'step', 'zero_grad', 'lr_step', 'clip_grad_and_step', 'calculate_metric',
         'get_train_configs')


class NotFound(KeyError):
    def __str__(self):
        return str(self.args[0])


class Forbidden(PermissionError):
    pass


class RequestFailed(RuntimeError):
    """A tenant's call raised inside the model: the tenant hears why, the server goes on serving."""


class TrainingService:
    def __init__(self, config: ServerConfig, model=None, sampler=None):
        from twinkle.model.multi_lora import MultiLoraTransformersModel
        self.config = config
        self.model = model if model is not None else MultiLoraTransformersModel(config.model_id, mixed_precision='fp32')
        self._sampler = sampler
        self.executor = FairExecutor(config.quotas.max_queued)
        self._lock = threading.Lock()  # guards the tables below (the executor thread and request threads)
        self._adapters: Dict[str, Dict[str, Dict[str, Any]]] = {}  # tenant -> name -> {'rank', 'internal'}
        self._sampler_adapters: Dict[str, str] = {}  # loaded adapter name -> checkpoint version

    # -- adapters -----------------------------------------------------------------------------------
    def add_adapter(self, tenant: str, name: str, lora: Dict[str, Any], gradient_accumulation_steps: int = 1,
                    seed: Optional[int] = None) -> Dict[str, Any]:
        from peft import LoraConfig
        check_name('adapter name', name)
        rank = lora.get('r', 8)
        quotas = self.config.quotas
        if rank > quotas.max_rank:
            raise ValueError(f'lora.r={rank} is above this server\'s max_rank={quotas.max_rank}')
        with self._lock:
            mine = self._adapters.setdefault(tenant, {})
            if name in mine:
                raise ValueError(f'adapter {name!r} already exists (delete it first)')
            if len(mine) >= quotas.max_adapters:
                raise ValueError(f'tenant {tenant!r} holds {len(mine)} adapters, the quota (max_adapters='
                                 f'{quotas.max_adapters}); delete one first')
            internal = f'{tenant}__{name}'
            mine[name] = {'rank': rank, 'internal': internal, 'adding': True}
        config = LoraConfig(**lora)
        try:
            self._run(tenant, lambda: self.model.add_adapter_to_model(
                internal, config, gradient_accumulation_steps,
                seed=self.config.seed if seed is None else seed))
        except BaseException:
            with self._lock:
                mine.pop(name, None)
            raise
        with self._lock:
            mine[name].pop('adding')
        return {'name': name, 'rank': rank, 'gradient_accumulation_steps': gradient_accumulation_steps}

    def list_adapters(self, tenant: str) -> List[Dict[str, Any]]:
        with self._lock:
            return [{'name': name, 'rank': entry['rank']} for name, entry in sorted(self._adapters.get(tenant, {}).items())
                    if 'adding' not in entry]

    def remove_adapter(self, tenant: str, name: str) -> None:
        internal = self._internal(tenant, name)
        self._run(tenant, lambda: self.model.remove_adapter(internal))
        with self._lock:
            self._adapters[tenant].pop(name, None)

    # -- training -----------------------------------------------------------------------------------
    def configure(self, tenant: str, name: str, setter: str, value: str, kwargs: Dict[str, Any]) -> None:
        if setter not in SETTERS:
            raise ValueError(f'{setter!r} is not one of {", ".join(SETTERS)}')
        internal = self._internal(tenant, name)
        method = getattr(self.model, setter)

        def call():
            with self.model.run_as(internal):
                if setter in ('set_template', 'set_processor'):
                    if setter == 'set_template':
                        kwargs.setdefault('model_id', self.config.model_id)
                    return method(value, **kwargs)
                return method(value, adapter_name=internal, **kwargs)
        self._run(tenant, call)

    def forward_backward(self, tenant: str, name: str, inputs: List[Dict[str, Any]], micro_batch_size=None,
                         **loss_inputs) -> Dict[str, float]:
        internal = self._internal(tenant, name)
        self.check_features(inputs)
        loss_inputs = {key: value for key, value in loss_inputs.items() if value is not None}

        def call():
            with self.model.run_as(internal):
                return self.model.forward_backward(inputs=inputs, adapter_name=internal,
                                                   micro_batch_size=micro_batch_size, **loss_inputs)
        return self._run(tenant, call)

    def logprobs(self, tenant: str, name: str, inputs: List[Dict[str, Any]]) -> List[List[float]]:
        """Per sample, the log-prob of each labelled token under the adapter (inference only)."""
        import torch
        internal = self._internal(tenant, name)
        self.check_features(inputs)

        def call():
            with self.model.run_as(internal):
                answers = []
                for feature in inputs:  # one at a time: no padding enters the numbers
                    logits = self.model.forward_only(inputs=[feature], adapter_name=internal).logits[0].float()
                    labels = torch.tensor(feature.get('labels', feature['input_ids']))
                    shifted = labels[1:]
                    logps = torch.log_softmax(logits[:-1], dim=-1).gather(1, shifted.clamp(min=0)[:, None])[:, 0]
                    answers.append([float(v) for v, label in zip(logps, shifted) if label >= 0])
                return answers
        return self._run(tenant, call)

    def step_call(self, tenant: str, name: str, method: str, kwargs: Dict[str, Any]):
        if method not in STEPS:
            raise ValueError(f'{method!r} is not one of {", ".join(STEPS)}')
        internal = self._internal(tenant, name)

        def call():
            with self.model.run_as(internal):
                return getattr(self.model, method)(adapter_name=internal, **kwargs)
        return self._run(tenant, call)

    # -- checkpoints --------------------------------------------------------------------------------
    def save(self, tenant: str, name: str, checkpoint: str, save_optimizer: bool = False) -> str:
        internal = self._internal(tenant, name)
        check_name('checkpoint name', checkpoint)
        if checkpoint not in self.list_checkpoints(tenant) and \
                len(self.list_checkpoints(tenant)) >= self.config.quotas.max_checkpoints:
            raise ValueError(f'tenant {tenant!r} holds max_checkpoints={self.config.quotas.max_checkpoints} '
                             f'checkpoints; delete one first')
        path = self._checkpoint_path(tenant, checkpoint)
        os.makedirs(os.path.dirname(path), exist_ok=True)

        def call():
            with self.model.run_as(internal):
                self.model.save(path, save_optimizer=save_optimizer, adapter_name=internal)
                with open(os.path.join(path, 'twinkle_adapter.txt'), 'w') as handle:
                    handle.write(internal)
        self._run(tenant, call)
        return f'{URI_PREFIX}{tenant}/{checkpoint}'

    def load(self, tenant: str, name: str, uri: str, load_optimizer: bool = False) -> None:
        internal = self._internal(tenant, name)
        path = self.resolve_uri(tenant, uri)
        saved_as = _saved_adapter(path)
        if saved_as != internal:
            raise ValueError(f'{uri} holds adapter {saved_as.split("__", 1)[-1]!r}; load it into that adapter')

        def call():
            with self.model.run_as(internal):
                self.model.load(path, adapter_name=internal, load_optimizer=load_optimizer)
        self._run(tenant, call)

    def list_checkpoints(self, tenant: str) -> List[str]:
        root = os.path.join(self.config.checkpoint_dir, tenant)
        if not os.path.isdir(root):
            return []
        return sorted(entry for entry in os.listdir(root)
                      if os.path.isfile(os.path.join(root, entry, 'twinkle_adapter.txt')))

    def delete_checkpoint(self, tenant: str, checkpoint: str) -> None:
        check_name('checkpoint name', checkpoint)
        if checkpoint not in self.list_checkpoints(tenant):
            raise NotFound(f'checkpoint {checkpoint!r} not found')
        self._run(tenant, lambda: shutil.rmtree(self._checkpoint_path(tenant, checkpoint)))

    def push(self, tenant: str, checkpoint: str, hub_model_id: str, private: bool = True) -> str:
        """Upload a checkpoint to a hub repository (private unless asked otherwise)."""
        from twinkle import hub
        path = self.resolve_uri(tenant, f'{URI_PREFIX}{tenant}/{checkpoint}')
        return self._run(tenant, lambda: hub.upload(path, hub_model_id, private=private))

    def resolve_uri(self, tenant: str, uri: str) -> str:
        if not isinstance(uri, str) or not uri.startswith(URI_PREFIX):
            raise ValueError(f'adapter_uri must be a {URI_PREFIX}<tenant>/<checkpoint> path from save(), got {uri!r}')
        owner, _, checkpoint = uri[len(URI_PREFIX):].partition('/')
        if owner != tenant:
            raise Forbidden(f'{uri} belongs to another tenant')
        check_name('checkpoint name', checkpoint)
        if checkpoint not in self.list_checkpoints(tenant):
            raise NotFound(f'checkpoint {checkpoint!r} not found')
        return self._checkpoint_path(tenant, checkpoint)

    # -- sampling -----------------------------------------------------------------------------------
    def sample(self, tenant: str, inputs: List[Any], sampling_params: Dict[str, Any], adapter_uri: Optional[str],
               num_samples: int):
        from twinkle.data_format import SamplingParams
        from twinkle.model.transformers.checkpoint import adapter_dir
        if not self.config.sampler:
            raise NotFound('this server does not serve sampling (sampler: false)')
        params = SamplingParams(**{**sampling_params, 'num_samples': num_samples})
        self.check_features([item for item in inputs if 'input_ids' in item])
        path = self.resolve_uri(tenant, adapter_uri) if adapter_uri else None

        def call():
            sampler = self._get_sampler()
            adapter = None
            if path is not None:
                saved_as = _saved_adapter(path)
                version = str(os.stat(os.path.join(adapter_dir(path, saved_as), 'adapter_model.safetensors')).st_mtime_ns)
                adapter = f'{saved_as}__{os.path.basename(path)}'
                self._load_sampler_adapter(sampler, adapter, adapter_dir(path, saved_as), version)
            return sampler.sample(inputs, params, adapter_name=adapter)
        return self._run(tenant, call)

    def _get_sampler(self):
        if self._sampler is None:
            from twinkle.sampler import TorchSampler
            self._sampler = TorchSampler(self.config.model_id)
            self._sampler.set_template('Template', model_id=self.config.model_id)  # decodes completions
        return self._sampler

    def _load_sampler_adapter(self, sampler, adapter: str, directory: str, version: str) -> None:
        """Load (or reload, when re-saved) a checkpoint's adapter into the sampler under ``adapter``."""
        import peft
        if self._sampler_adapters.get(adapter) == version:
            return
        if adapter in getattr(sampler.model, 'peft_config', {}):
            sampler.model.delete_adapter(adapter)
        if isinstance(sampler.model, peft.PeftModel):
            sampler.model.load_adapter(directory, adapter_name=adapter)
        else:
            sampler.model = peft.PeftModel.from_pretrained(sampler.model, directory, adapter_name=adapter).eval()
        self._sampler_adapters[adapter] = version

    # -- internals ----------------------------------------------------------------------------------
    def _internal(self, tenant: str, name: str) -> str:
        with self._lock:
            entry = self._adapters.get(tenant, {}).get(name)
        if entry is None or 'adding' in entry:
            raise NotFound(f'adapter {name!r} not found')
        return entry['internal']

    def _checkpoint_path(self, tenant: str, checkpoint: str) -> str:
        return os.path.join(self.config.checkpoint_dir, check_name('tenant', tenant), checkpoint)

    def _run(self, tenant: str, call):
        try:
            return self.executor.run(tenant, call, timeout=self.config.request_timeout)
        except (NotFound, Forbidden, ValueError, TypeError, TimeoutError, QueueFull, HubUnavailableError):
            raise
        except Exception as error:
            logger.warning('tenant %r: a call failed in the model', tenant, exc_info=True)
            raise RequestFailed(f'{type(error).__name__}: {error}') from error

    def check_features(self, features: List[Dict[str, Any]], what: str = 'inputs') -> List[Dict[str, Any]]:
        """Token ids within the vocabulary, labels / masks / positions as long as the ids (once per request)."""
        vocab = self.model.model.config.vocab_size
        for index, feature in enumerate(features):
            ids = feature.get('input_ids')
            if not isinstance(ids, list) or not ids:
                raise ValueError(f'{what}[{index}].input_ids must be a non-empty list of token ids')
            if not all(isinstance(token, int) and 0 <= token < vocab for token in ids):
                raise ValueError(f'{what}[{index}].input_ids holds ids outside [0, {vocab})')
            for key, valid in (('labels', lambda v: v == -100 or 0 <= v < vocab), ('attention_mask', lambda v: v in (0, 1)),
                               ('position_ids', lambda v: 0 <= v < 2**31)):
                values = feature.get(key)
                if values is None:
                    continue
                if not isinstance(values, list) or len(values) != len(ids):
                    raise ValueError(f'{what}[{index}].{key} must have one entry per input id ({len(ids)})')
                if not all(isinstance(v, int) and valid(v) for v in values):
                    raise ValueError(f'{what}[{index}].{key} holds invalid values')
        return features

    def close(self) -> None:
        self.executor.shutdown()


def _saved_adapter(path: str) -> str:
    with open(os.path.join(path, 'twinkle_adapter.txt')) as handle:
        return handle.read().strip()
