"""The server's configuration: a YAML file (``twinkle serve --config``) or the command line."""
from __future__ import annotations

import os
from typing import Dict, Optional

from pydantic import BaseModel, ConfigDict, Field


class Quotas(BaseModel):
    model_config = ConfigDict(extra='forbid')
    max_adapters: int = Field(4, ge=1, description='adapters a tenant may hold at once')
    max_rank: int = Field(64, ge=1, description='largest LoRA rank a tenant may ask for')
    max_queued: int = Field(8, ge=1, description='requests a tenant may have waiting for the model')
    max_checkpoints: int = Field(16, ge=1)


class ServerConfig(BaseModel):
    model_config = ConfigDict(extra='forbid')
    model_id: str
    host: str = '127.0.0.1'
    port: int = Field(8000, ge=0, le=65535)
    api_keys: Dict[str, str] = Field(default_factory=dict, description='hash_key(key) -> tenant')
    quotas: Quotas = Field(default_factory=Quotas)
    checkpoint_dir: str = Field(default_factory=lambda: os.path.join(os.getcwd(), 'twinkle-server-checkpoints'))
    max_request_bytes: int = Field(16 * 2**20, ge=1024)
    request_timeout: float = Field(600.0, gt=0, description='seconds a request may wait for the model')
    sampler: bool = Field(True, description='serve sampling (a second copy of the base model)')
    seed: int = 42


def load_config(path: str, overrides: Optional[dict] = None) -> ServerConfig:
    import yaml
    with open(path, encoding='utf-8') as handle:
        data = yaml.safe_load(handle) or {}
    if not isinstance(data, dict):
        raise ValueError(f'{path}: the server config must be a mapping, got {type(data).__name__}')
    data.update({key: value for key, value in (overrides or {}).items() if value is not None})
    return ServerConfig(**data)
