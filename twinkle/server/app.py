"""The FastAPI application: /v1 routes over ``TrainingService``, keys, limits and error mapping.

Errors are the caller's to read, never a crashed worker: a bad field is 422 naming it (pydantic),
a bad value 400, a missing key 401, another tenant's path 403, an unknown name 404, a body over
``max_request_bytes`` 413, an unreachable hub 424 (a failed dependency, not a server fault), a full queue 429, a model that did not get to the request in time 504.
"""
from __future__ import annotations

import math
from typing import Any, Optional

from twinkle.utils.logger import get_logger

from . import schemas
from twinkle.hub import HubUnavailableError

from .auth import Keyring
from .config import ServerConfig
from .executor import QueueFull
from .service import Forbidden, NotFound, RequestFailed, TrainingService

logger = get_logger(__name__)


def create_app(config: ServerConfig, service: Optional[TrainingService] = None):
    from fastapi import Depends, FastAPI, HTTPException
    from fastapi.responses import JSONResponse
    from fastapi.security import APIKeyHeader, HTTPBearer

    bearer = HTTPBearer(auto_error=False, description='Authorization: Bearer KEY')
    api_key_header = APIKeyHeader(name='X-API-Key', auto_error=False)

    keyring = Keyring(config.api_keys)
    service = service or TrainingService(config)
    # No lifespan hook closes the service: an in-process client (a test transport) runs the app's
    # lifespan per session; whoever runs the server closes it (``twinkle.server.main.serve``).
    app = FastAPI(title='Twinkle training service', version='1', summary='Multi-tenant LoRA training on one base model')
    app.state.service = service
    app.add_middleware(BodyLimit, max_bytes=config.max_request_bytes)

    def tenant_of(credentials=Depends(bearer), x_api_key: Optional[str] = Depends(api_key_header)) -> str:
        key = x_api_key or (credentials.credentials if credentials is not None else None)
        tenant = keyring.tenant_of(key)
        if tenant is None:
            raise HTTPException(401, 'a valid API key is required (Authorization: Bearer KEY or X-API-Key)')
        return tenant

    for error_type, status in ((ValueError, 400), (TypeError, 400), (RequestFailed, 400), (Forbidden, 403),
                               (NotFound, 404), (HubUnavailableError, 424), (QueueFull, 429), (TimeoutError, 504)):
        app.add_exception_handler(error_type, _responder(status, JSONResponse))

    @app.get('/v1/health')
    def health():
        return {'status': 'ok'}

    @app.get('/v1/capabilities')
    def capabilities(tenant: str = Depends(tenant_of)):
        return {'model_id': config.model_id, 'sampler': config.sampler, 'quotas': config.quotas.model_dump(),
                'tenant': tenant}

    @app.post('/v1/adapters', status_code=201)
    def add_adapter(body: schemas.AddAdapter, tenant: str = Depends(tenant_of)):
        return service.add_adapter(tenant, body.name, body.lora.model_dump(), body.gradient_accumulation_steps,
                                   body.seed)

    @app.get('/v1/adapters')
    def list_adapters(tenant: str = Depends(tenant_of)):
        return {'adapters': service.list_adapters(tenant)}

    @app.delete('/v1/adapters/{name}')
    def remove_adapter(name: str, tenant: str = Depends(tenant_of)):
        service.remove_adapter(tenant, name)
        return {'removed': name}

    @app.post('/v1/adapters/{name}/configure')
    def configure(name: str, body: schemas.Configure, tenant: str = Depends(tenant_of)):
        service.configure(tenant, name, body.setter, body.value, dict(body.kwargs))
        return {'configured': body.setter}

    @app.post('/v1/adapters/{name}/forward_backward')
    def forward_backward(name: str, body: schemas.ForwardBackward, tenant: str = Depends(tenant_of)):
        loss_inputs = body.model_dump(include={'old_logps', 'advantages', 'ref_logps'})
        return _json(service.forward_backward(tenant, name, _features(body.inputs), body.micro_batch_size,
                                              **loss_inputs))

    @app.post('/v1/adapters/{name}/logprobs')
    def logprobs(name: str, body: schemas.Inputs, tenant: str = Depends(tenant_of)):
        return {'logprobs': _json(service.logprobs(tenant, name, _features(body.inputs)))}

    @app.post('/v1/adapters/{name}/call')
    def step_call(name: str, body: schemas.StepCall, tenant: str = Depends(tenant_of)):
        return {'result': _json(service.step_call(tenant, name, body.method, dict(body.kwargs)))}

    @app.post('/v1/adapters/{name}/save')
    def save(name: str, body: schemas.Save, tenant: str = Depends(tenant_of)):
        return {'path': service.save(tenant, name, body.name, body.save_optimizer)}

    @app.post('/v1/adapters/{name}/load')
    def load(name: str, body: schemas.Load, tenant: str = Depends(tenant_of)):
        service.load(tenant, name, body.path, body.load_optimizer)
        return {'loaded': body.path}

    @app.get('/v1/checkpoints')
    def list_checkpoints(tenant: str = Depends(tenant_of)):
        return {'checkpoints': [{'name': name, 'path': f'twinkle://{tenant}/{name}'}
                                for name in service.list_checkpoints(tenant)]}

    @app.delete('/v1/checkpoints/{name}')
    def delete_checkpoint(name: str, tenant: str = Depends(tenant_of)):
        service.delete_checkpoint(tenant, name)
        return {'deleted': name}

    @app.post('/v1/checkpoints/{name}/push')
    def push(name: str, body: schemas.Push, tenant: str = Depends(tenant_of)):
        return {'pushed': service.push(tenant, name, body.hub_model_id, body.private), 'private': body.private}

    @app.post('/v1/sample')
    def sample(body: schemas.Sample, tenant: str = Depends(tenant_of)):
        inputs = [item.model_dump(exclude_none=True) if isinstance(item, schemas.Feature) else item
                  for item in body.inputs]
        responses = service.sample(tenant, inputs, body.sampling_params.model_dump(exclude_none=True),
                                   body.adapter_uri, body.num_samples)
        return {'responses': [_json({'sequences': [_sequence(seq) for seq in response.sequences]})
                              for response in responses]}

    return app


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` is answered 413 before it is all read."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope['type'] != 'http':
            return await self.app(scope, receive, send)
        declared = dict(scope.get('headers') or {}).get(b'content-length')
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await _too_large(send, self.max_bytes)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get('body', b''))
            if seen > self.max_bytes:
                raise _TooLarge()
            return message
        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await _too_large(send, self.max_bytes)


class _TooLarge(Exception):
    pass


async def _too_large(send, max_bytes: int) -> None:
    import json
    body = json.dumps({'detail': f'request body over max_request_bytes={max_bytes}'}).encode()
    await send({'type': 'http.response.start', 'status': 413,
                'headers': [(b'content-type', b'application/json'), (b'content-length', str(len(body)).encode())]})
    await send({'type': 'http.response.body', 'body': body})


def _responder(status: int, response_cls):
    async def respond(request, error):
        if status >= 500 or status == 400:
            logger.warning('%s %s -> %d: %s', request.method, request.url.path, status, error)
        return response_cls(status_code=status, content={'detail': str(error)})
    return respond


def _features(inputs) -> list:
    return [feature.model_dump(exclude_none=True) for feature in inputs]


def _sequence(sequence) -> dict:
    return {'tokens': list(sequence.tokens), 'logprobs': [[list(pair) for pair in step] for step in sequence.logprobs],
            'stop_reason': sequence.stop_reason, 'text': sequence.text,
            'new_input_feature': dict(sequence.new_input_feature)}


def _json(value: Any) -> Any:
    """JSON-safe: tensors to lists, NaN / inf to None (JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(key): _json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json(item) for item in value]
    if hasattr(value, 'tolist'):
        return _json(value.tolist())
    return value
