"""``twinkle serve`` / ``python -m twinkle.server``: build the config, the app, and run uvicorn."""
from __future__ import annotations

import argparse

from twinkle.utils.logger import get_logger

logger = get_logger(__name__)


def add_serve_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument('--config', help='server.yaml (the command-line flags below override it)')
    parser.add_argument('--model', help='base model id or path')
    parser.add_argument('--host', help='default 127.0.0.1')
    parser.add_argument('--port', type=int, help='default 8000')
    parser.add_argument('--api-key', action='append', default=[], metavar='KEY=TENANT',
                        help='a key and the tenant it belongs to (repeatable; hashed at once)')
    parser.add_argument('--checkpoint-dir', help="where tenants' checkpoints live (kept across restarts)")
    parser.add_argument('--max-queued', type=int, help='requests a tenant may have waiting (then 429)')
    return parser


def build_config(args):
    from .auth import Keyring
    from .config import ServerConfig, load_config
    overrides = {'model_id': args.model, 'host': args.host, 'port': args.port, 'checkpoint_dir': args.checkpoint_dir}
    if args.config:
        config = load_config(args.config, overrides)
    elif args.model:
        config = ServerConfig(**{key: value for key, value in overrides.items() if value is not None})
    else:
        raise SystemExit('twinkle serve: pass --model MODEL_ID or --config server.yaml')
    if args.api_key:
        config.api_keys.update(Keyring.from_pairs(args.api_key).digests())
    if args.max_queued:
        config.quotas.max_queued = args.max_queued
    if not config.api_keys:
        raise SystemExit('twinkle serve: no API keys; pass --api-key KEY=TENANT (repeatable) or api_keys: in the config')
    return config


def serve(args) -> int:
    try:
        import uvicorn
    except ImportError as error:
        raise SystemExit("twinkle serve needs the server extra: pip install 'twinkle[server]'") from error
    from .app import create_app
    config = build_config(args)
    app = create_app(config)
    logger.info('serving %s on http://%s:%d for %d key(s)', config.model_id, config.host, config.port,
                len(config.api_keys))
    try:
        uvicorn.run(app, host=config.host, port=config.port, log_level='warning')
    finally:
        app.state.service.close()
    return 0
