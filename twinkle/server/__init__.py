"""The training service: many tenants train LoRA adapters on one base model over HTTP (extra ``server``).

``twinkle serve --model MODEL_ID --api-key KEY=TENANT`` (or ``--config server.yaml``); the routes
are in ``app.py``, what they do in ``service.py``, the tenant adapter pool in
``twinkle.model.multi_lora``. FastAPI and uvicorn are imported only when a server is built.
"""
from .config import Quotas, ServerConfig, load_config

__all__ = ['Quotas', 'ServerConfig', 'load_config']
